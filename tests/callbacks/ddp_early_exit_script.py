"""Run by tests/callbacks/test_early_exit.py: EarlyExit under 2-process DDP.

A standalone module: each rank runs this command (tests.helpers.run_ddp_script starts both,
as torchrun does; alone, Lightning's launcher would start rank 1 by re-running it).
Usage, from the repository root: python -m tests.callbacks.ddp_early_exit_script OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with its heads, thresholds and what it calibrated on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_sparse import ClassificationModule, EarlyExit
from tests.helpers import TinyData, TinyNet, end_ddp, quiet_trainer


class TinyDataWithVal(TinyData):
    """TinyData, validated on the same samples (each rank sees half of them)."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    early_exit = EarlyExit(exits=["model.conv1", "model.fc1"], max_accuracy_drop=0.05)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=2, callbacks=[early_exit])
    module = ClassificationModule(TinyNet(), num_classes=4)
    trainer.fit(module, TinyDataWithVal())
    torch.save(
        {
            "world_size": trainer.world_size,
            "heads": [
                {k: v.detach().clone() for k, v in head.state_dict().items()}
                for head in early_exit.heads
            ],
            "thresholds": early_exit.thresholds,
            "inputs": early_exit.last_calibration["inputs"],
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
