"""Run by tests/callbacks/test_quantization.py: QAT with pruning under real 2-process CPU DDP.

A standalone module: each rank runs this command (tests.helpers.run_ddp_script starts both,
as torchrun does; alone, Lightning's launcher would start rank 1 by re-running it).
Usage, from the repository root: python -m tests.callbacks.ddp_quantization_script OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with its final weights, its quantization state, and the input
ranges it held after every training step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sparse import MagnitudePruning
from lightning_sparse.callbacks import QuantizationAwareTraining
from tests.helpers import TinyData, TinyModule, end_ddp, quiet_trainer


class RangeRecorder(pl.Callback):
    """After every step (and QAT's observer sync), the input ranges this rank holds."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat = qat
        self.history: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.qat.quantized is not None and self.qat.fake_quant_enabled:
            self.history.append(torch.stack(self.qat.quantized.observer_tensors()).clone())


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=0.4, disable_quantization_observer_epoch=1.6)
    recorder = RangeRecorder(qat)
    # QAT first, so the recorder sees the ranges after the sync
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[
            MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=1, update_frequency=0.5),
            qat,
            recorder,
        ],
    )
    module = TinyModule()
    trainer.fit(module, TinyData())
    torch.save(
        {
            "world_size": trainer.world_size,
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "quantization": qat.state_dict()["quantization"],
            "history": recorder.history,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
