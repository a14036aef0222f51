"""EpochLine: a line per epoch for logs and pipes; progress_bar picks it outside a terminal."""

from __future__ import annotations

import io
import re
import sys

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import RichProgressBar

from lightning_sparse.callbacks import EpochLine, MagnitudePruning, progress_bar
from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.models import MLP
from lightning_sparse.module import ClassificationModule

LINE = re.compile(r"^epoch (\d+)/3  loss \d+\.\d{4}  val acc \d+\.\d{2}%  sparsity (\d+\.\d{2})%$")


def _fit(callbacks: list[pl.Callback]) -> None:
    module = ClassificationModule(MLP(input_dim=16, hidden=(32,), num_classes=4), num_classes=4)
    data = SyntheticDataModule(
        num_classes=4, input_shape=(16,), train_size=64, val_size=32, test_size=32, batch_size=16
    )
    pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        callbacks=callbacks,
    ).fit(module, datamodule=data)


def test_one_line_per_epoch_with_loss_accuracy_and_the_pruned_sparsity(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=2)
    _fit([pruning, EpochLine()])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches if m] == [1, 2, 3]
    # The sparsity the schedule reached at each epoch's end: rising, then held at the target.
    sparsities = [float(m.group(2)) for m in matches if m]
    assert sparsities[0] < sparsities[1] == pytest.approx(50.0, abs=0.1) == sparsities[2]


def test_no_sparsity_without_a_masking_technique(capsys: pytest.CaptureFixture[str]) -> None:
    _fit([EpochLine()])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3
    assert all("sparsity" not in line for line in lines)


def test_a_disabled_line_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    line = EpochLine()
    line.disable()
    _fit([line])
    assert "epoch 1/3" not in capsys.readouterr().out


def test_progress_bar_is_rich_in_a_terminal_and_a_line_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert isinstance(progress_bar(), EpochLine)
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert isinstance(progress_bar(), RichProgressBar)


def test_repr_shows_the_settings() -> None:
    assert repr(EpochLine()) == "EpochLine(loss_key='train/loss', accuracy_key='val/acc')"
