"""Run by tests/callbacks/test_distillation_features.py: feature distillation under 2-process DDP.

A standalone module: each rank runs this command (tests.helpers.run_ddp_script starts both,
as torchrun does; alone, Lightning's launcher would start rank 1 by re-running it).
Usage, from the repository root: python -m tests.callbacks.ddp_distillation_script OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with its final weights and its projection before and after.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sparse import KnowledgeDistillation
from tests.callbacks.test_distillation import DistilModule
from tests.helpers import TinyData, end_ddp, quiet_trainer


class FirstProjection(pl.Callback):
    """The projection's weights right after it is built (step 0, before its first update)."""

    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.start: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start is None and self.kd.projections:
            self.start = self.kd.projections["model.conv1"].weight.detach().clone()


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    kd = KnowledgeDistillation(
        teacher=None,
        teacher_model={"_target_": "tests.callbacks.test_distillation_features.seeded_teacher"},
        features=["model.conv1"],
    )
    first = FirstProjection(kd)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=2, callbacks=[kd, first])
    module = DistilModule()
    trainer.fit(module, TinyData())
    torch.save(
        {
            "world_size": trainer.world_size,
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "start": first.start,
            "projection": kd.projections["model.conv1"].weight.detach().clone(),
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
