"""Run by tests/examples/test_taylor_pruning.py: the README's TaylorPruning under 2-process DDP.

Usage, from the repository root: python -m tests.examples.ddp_taylor_script OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from examples.taylor_pruning import TaylorPruning
from tests.helpers import TinyData, TinyModule, end_ddp, quiet_trainer


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    pruning = TaylorPruning(final_sparsity=0.75, start_epoch=0.5, end_epoch=2, update_frequency=0.5)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[pruning])
    module = TinyModule()
    trainer.fit(module, TinyData())
    torch.save(
        {
            "masks": {n: m.cpu() for n, m in pruning.masks.items()},
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "world_size": trainer.world_size,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
