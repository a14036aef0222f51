"""Run by tests/callbacks/test_pruning_ddp.py: gradual pruning under real 2-process CPU DDP (gloo).

A standalone module: each rank runs this command (tests.helpers.run_ddp_script starts both,
as torchrun does; alone, Lightning's launcher would start rank 1 by re-running it).
Usage, from the repository root: python -m tests.callbacks.ddp_pruning_script OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with the weights it saw before each mask update, the masks it
ended up with after each update, and its final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sparse import MagnitudePruning
from tests.helpers import TinyData, TinyModule, end_ddp, quiet_trainer


class RecordingPruning(MagnitudePruning):
    """Records every update; rank 1 proposes deliberately wrong masks to prove rank 0 wins."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, Any]] = []
        self._trainer: pl.Trainer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        super().on_train_start(trainer, pl_module)

    def should_update(self, trainer: pl.Trainer) -> int | None:
        due = super().should_update(trainer)
        if due is not None:
            self._due = (due, {n: p.detach().clone() for n, p in self.targets.items()})
        return due

    def set_masks(self, trainer: pl.Trainer, masks: dict[str, torch.Tensor]) -> None:
        if trainer.global_rank == 1:
            masks = {name: ~mask for name, mask in masks.items()}
        super().set_masks(trainer, masks)
        index, before = self._due
        self.history.append(
            {
                "index": index,
                "weights_before": before,
                "masks": {n: m.clone() for n, m in self.masks.items()},
            }
        )


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    pruning = RecordingPruning(
        final_sparsity=0.8, start_epoch=0.5, end_epoch=2, update_frequency=0.5, global_sparsity=True
    )
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[pruning])
    module = TinyModule()
    trainer.fit(module, TinyData())
    torch.save(
        {
            "history": pruning.history,
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "world_size": trainer.world_size,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
