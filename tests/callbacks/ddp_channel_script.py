"""Run by tests/callbacks/test_channel_ddp.py: channel removal under real 2-process CPU DDP (gloo).

A standalone module: each rank runs this command (tests.helpers.run_ddp_script starts both,
as torchrun does; alone, Lightning's launcher would start rank 1 by re-running it).
Usage, from the repository root: python -m tests.callbacks.ddp_channel_script OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with the changes it applied, what it proposed, whether the DDP
wrapper held the module's parameters after each removal, and its final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_sparse import ChannelPruning
from lightning_sparse.module import CompressionModule
from tests.helpers import TinyData, TinyModule, end_ddp, quiet_trainer


class TinyChannelModule(CompressionModule, TinyModule):
    pass


class RecordingChannelPruning(ChannelPruning):
    """Rank 1 proposes other channels (the highest ranked), to prove that rank 0's win."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proposed: list[dict[str, Any] | None] = []
        self.wrapped: list[bool] = []

    def propose_change(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsity: float
    ) -> dict[str, Any] | None:
        change = super().propose_change(trainer, pl_module, sparsity)
        if change is not None and trainer.global_rank == 1:
            widths = {
                n: m.weight.shape for n, m in pl_module.named_modules() if hasattr(m, "weight")
            }
            for layer, sides in change["layers"].items():
                for side, idxs in sides.items():
                    size = widths[layer][0 if side == "out" else 1]
                    sides[side] = [size - 1 - i for i in idxs]
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
    pruning = RecordingChannelPruning(
        final_sparsity=0.6, init_sparsity=0.2, start_epoch=0.5, end_epoch=2, update_frequency=0.5
    )
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[pruning])
    module = TinyChannelModule()
    trainer.fit(module, TinyData())
    torch.save(
        {
            "changes": pruning.structure_changes,
            "proposed": pruning.proposed,
            "wrapped": pruning.wrapped,
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "world_size": trainer.world_size,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
