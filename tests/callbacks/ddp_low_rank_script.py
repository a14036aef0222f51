"""Run by tests/callbacks/test_low_rank_ddp.py: factorization under real 2-process CPU DDP (gloo).

A standalone module: each rank runs this command (tests.helpers.run_ddp_script starts both,
as torchrun does; alone, Lightning's launcher would start rank 1 by re-running it).
Usage, from the repository root: python -m tests.callbacks.ddp_low_rank_script OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with the change it applied, what it proposed, whether the DDP
wrapper held the module's parameters after the factorization, and its final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_sparse import LowRankFactorization
from lightning_sparse.module import CompressionModule
from tests.helpers import TinyData, TinyModule, end_ddp, quiet_trainer


class TinyLowRankModule(CompressionModule, TinyModule):
    pass


class RecordingLowRank(LowRankFactorization):
    """Rank 1 proposes other ranks (one less each), to prove that rank 0's win."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proposed: list[dict[str, Any] | None] = []
        self.wrapped: list[bool] = []

    def propose_change(self, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        change = super().propose_change(pl_module)
        if change is not None and pl_module.trainer.global_rank == 1:
            for data in change["layers"].values():
                data["rank"] -= 1
        self.proposed.append(change)
        return change

    def apply_structure_change(self, trainer: pl.Trainer, pl_module: Any, propose: Any) -> Any:
        change = super().apply_structure_change(trainer, pl_module, propose)
        model = trainer.strategy.model
        held = isinstance(model, DistributedDataParallel) and {
            id(p) for p in model.parameters()
        } == {id(p) for p in pl_module.parameters()}
        self.wrapped.append(held)
        return change


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    factorize = RecordingLowRank(start_epoch=1.0, rank_ratio=0.5)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=2, callbacks=[factorize])
    module = TinyLowRankModule()
    trainer.fit(module, TinyData())
    torch.save(
        {
            "changes": factorize.structure_changes,
            "proposed": factorize.proposed,
            "wrapped": factorize.wrapped,
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "world_size": trainer.world_size,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
