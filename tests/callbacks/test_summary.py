"""ModelSummary: Lightning's summary as plain text, once, without a FLOPs column of zeros."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_sparse.callbacks import ModelSummary
from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.models import MLP
from lightning_sparse.module import ClassificationModule


def test_the_summary_lists_layers_and_totals_without_unmeasured_flops(
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = ClassificationModule(MLP(input_dim=16, hidden=(32,), num_classes=4), num_classes=4)
    data = SyntheticDataModule(
        num_classes=4, input_shape=(16,), train_size=32, val_size=16, test_size=16, batch_size=16
    )
    pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelSummary(max_depth=1)],
    ).fit(module, datamodule=data)
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if "Name" in line)
    assert header.split() == ["Name", "Type", "Params", "Mode"]
    assert any(line.split()[:3] == ["0", "model", "MLP"] for line in lines)
    assert "Total params: " in out
    assert "FLOPs" not in out  # no example_input_array: Lightning would show 0
    assert repr(ModelSummary(max_depth=2)) == "ModelSummary(max_depth=2)"
