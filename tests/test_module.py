from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule, CompressionModule


class ConstantLoss(pl.Callback):
    """A callback that contributes a fixed loss term and records what it was called with."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.calls: list[tuple[Any, Any]] = []

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        self.calls.append((batch, outputs))
        return torch.tensor(self.value)


def _trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
    }
    return pl.Trainer(callbacks=callbacks, **options, **kwargs)


def _data() -> SyntheticDataModule:
    return SyntheticDataModule(num_classes=4, train_size=32, val_size=16, test_size=16)


def test_compression_loss_is_zero_when_detached() -> None:
    module = ClassificationModule(SmallCNN(num_classes=4), num_classes=4)
    loss = module.compression_loss(None, None)
    assert loss.shape == ()
    assert float(loss) == 0.0


def test_compression_loss_sums_loss_terms_into_the_training_loss() -> None:
    terms = [ConstantLoss(0.5), ConstantLoss(0.25)]
    module = ClassificationModule(SmallCNN(num_classes=4), num_classes=4)
    trainer = _trainer([*terms, pl.Callback()], max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=_data())
    assert all(len(term.calls) == 1 for term in terms)
    batch, outputs = terms[0].calls[0]
    assert outputs.shape == (len(batch[1]), 4)  # logits for the batch
    assert float(trainer.callback_metrics["train/compression_loss"]) == pytest.approx(0.75)


def test_mixin_requires_a_lightning_module() -> None:
    class NotLightning(CompressionModule, nn.Module):
        pass

    with pytest.raises(TypeError, match="LightningModule"):
        NotLightning().compression_loss(None, None)


def test_fit_and_test_log_metrics() -> None:
    module = ClassificationModule(SmallCNN(num_classes=4), num_classes=4, lr=0.01)
    trainer = _trainer([], max_epochs=2)
    trainer.fit(module, datamodule=_data())
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics
    assert "train/compression_loss" not in metrics
    (result,) = trainer.test(module, datamodule=_data(), verbose=False)
    assert 0.0 <= result["test/acc"] <= 1.0
    assert "test/loss" in result


def test_parameter_names_and_hyperparameters() -> None:
    module = ClassificationModule(SmallCNN(), num_classes=10, lr=0.01, optimizer="sgd")
    assert "model.conv1.weight" in dict(module.named_parameters())
    assert "model" not in module.hparams
    assert module.hparams["lr"] == 0.01
    assert module.hparams["optimizer"] == "sgd"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_optimizers(name: str, expected: type) -> None:
    module = ClassificationModule(SmallCNN(), optimizer=name, lr=0.1, weight_decay=1e-4)
    optimizer = module.configure_optimizers()
    assert type(optimizer) is expected
    assert optimizer.defaults["lr"] == 0.1
    assert optimizer.defaults["weight_decay"] == 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "lamb"}, "`optimizer`='lamb'"),
        ({"lr": 0.0}, "`lr`=0.0"),
        ({"weight_decay": -1.0}, "`weight_decay`=-1.0"),
        ({"num_classes": 1}, "`num_classes`=1"),
        ({"lr_schedule": "step"}, r"`lr_schedule`='step' is not allowed; choose one of"),
        ({"min_lr_ratio": 1.5}, r"`min_lr_ratio`=1.5 is not allowed; it must be in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassificationModule(SmallCNN(), **kwargs)


class LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_cosine_schedule_runs_over_every_optimizer_step(accumulate: int) -> None:
    pl.seed_everything(0)
    data = SyntheticDataModule(train_size=160, batch_size=16)
    module = ClassificationModule(
        SmallCNN(num_classes=data.num_classes),
        num_classes=data.num_classes,
        lr=0.1,
        lr_schedule="cosine",
        min_lr_ratio=0.1,
    )
    rates = LearningRates()
    _trainer([rates], max_epochs=4, accumulate_grad_batches=accumulate).fit(module, data)
    batches = len(rates.rates)
    steps = batches // accumulate  # optimizer steps: the schedule's length
    per_step = rates.rates[::accumulate]
    assert per_step[0] == pytest.approx(0.1)
    # Half a cosine from 0.1 down to 0.01 over the optimizer steps, updated every step.
    for step, rate in enumerate(per_step):
        expected = 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * step / steps))
        assert rate == pytest.approx(expected), step
    assert all(a > b for a, b in itertools.pairwise(per_step))


def test_cosine_schedule_stretches_when_a_resumed_run_trains_longer(tmp_path: Path) -> None:
    def fit(max_epochs: int, ckpt: str | None) -> LearningRates:
        pl.seed_everything(0)
        data = SyntheticDataModule(train_size=160, batch_size=16)
        module = ClassificationModule(
            SmallCNN(num_classes=data.num_classes), lr=0.1, lr_schedule="cosine"
        )
        rates = LearningRates()
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = _trainer([rates, checkpoint], max_epochs=max_epochs)
        trainer.fit(module, data, ckpt_path=ckpt)
        return rates

    first = fit(2, None)  # 10 steps per epoch: 20 steps, cosine over 20
    assert first.rates[10] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    extended = fit(4, str(tmp_path / "last.ckpt"))  # steps 20..39 on a cosine over 40
    assert len(extended.rates) == 20
    for offset, rate in enumerate(extended.rates):
        step = 20 + offset
        assert rate == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * step / 40))), step


PHASES = [
    {"start_epoch": 0, "lr": 0.1, "schedule": "linear", "end_epoch": 1, "min_lr_ratio": 0.5},
    {"start_epoch": 1.5, "lr": 0.05, "schedule": "cosine", "min_lr_ratio": 0.2},
    {"start_epoch": 3, "lr": 0.02},
]


def _phase_rate(epoch: float) -> float:
    """The rate PHASES give at fractional ``epoch``, written out by hand."""
    if epoch < 1:
        return 0.1 * (1 - 0.5 * epoch)
    if epoch < 1.5:
        return 0.05  # the first phase's curve ended at epoch 1: its last rate holds
    if epoch < 3:
        progress = (epoch - 1.5) / 1.5
        return 0.05 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)))
    return 0.02


@pytest.mark.parametrize("accumulate", [1, 3])
def test_lr_phases_follow_the_optimizer_step_clock(accumulate: int) -> None:
    pl.seed_everything(0)
    data = SyntheticDataModule(train_size=160, batch_size=16)  # 10 batches per epoch
    module = ClassificationModule(
        SmallCNN(num_classes=data.num_classes),
        num_classes=data.num_classes,
        lr=0.1,
        lr_schedule="cosine",  # not used: lr_phases win
        lr_phases=PHASES,
    )
    rates = LearningRates()
    _trainer([rates], max_epochs=4, accumulate_grad_batches=accumulate).fit(module, data)
    per_epoch = math.ceil(10 / accumulate)  # the last window of an epoch steps too
    batches_seen = 0
    for epoch in range(4):
        for batch in range(10):
            step = epoch * per_epoch + batch // accumulate
            expected = _phase_rate(step / per_epoch)
            assert rates.rates[batches_seen] == pytest.approx(expected), (epoch, batch)
            batches_seen += 1


def test_lr_scale_and_an_empty_phase() -> None:
    pl.seed_everything(0)
    data = SyntheticDataModule(train_size=160, batch_size=16)
    module = ClassificationModule(
        SmallCNN(num_classes=data.num_classes),
        lr=0.1,
        lr_phases=[
            {"start_epoch": 0, "lr_scale": 0.5},
            {"start_epoch": 1, "lr": 0.3},  # empty: the next phase starts here too
            {"start_epoch": 1, "lr_scale": 0.2, "schedule": "linear"},
        ],
    )
    rates = LearningRates()
    _trainer([rates], max_epochs=2).fit(module, data)
    assert rates.rates[:10] == pytest.approx([0.05] * 10)
    assert rates.rates[10:] == pytest.approx([0.02 * (1 - i / 10) for i in range(10)])


def test_lr_phases_before_the_first_phase_use_lr() -> None:
    pl.seed_everything(0)
    data = SyntheticDataModule(train_size=160, batch_size=16)
    module = ClassificationModule(
        SmallCNN(num_classes=data.num_classes),
        lr=0.1,
        lr_phases=[{"start_epoch": 1, "lr": 0.01, "schedule": "cosine"}],
    )
    rates = LearningRates()
    _trainer([rates], max_epochs=2).fit(module, data)
    assert rates.rates[:10] == pytest.approx([0.1] * 10)
    assert rates.rates[10] == pytest.approx(0.01)
    assert rates.rates[15] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_lr_phases_resume_exactly_and_load_weights_only(tmp_path: Path) -> None:
    from tests.helpers import Crash

    def fit(crash_at: int | None, ckpt: str | None) -> LearningRates:
        pl.seed_everything(0)
        data = SyntheticDataModule(train_size=160, batch_size=16)
        module = ClassificationModule(
            SmallCNN(num_classes=data.num_classes), lr=0.1, lr_phases=PHASES
        )
        rates = LearningRates()
        every = ModelCheckpoint(
            dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}"
        )
        crash = [Crash(crash_at)] if crash_at is not None else []
        trainer = _trainer([rates, every, *crash], max_epochs=4, deterministic=True)
        if crash_at is None:
            trainer.fit(module, data, ckpt_path=ckpt)
        else:
            with pytest.raises(RuntimeError, match="crash on purpose"):
                trainer.fit(module, data, ckpt_path=ckpt)
        return rates

    whole = fit(None, None)
    fit(17, None)
    # The rate is a function of the step count alone, which the checkpoint holds.
    resumed = fit(None, str(tmp_path / "step=15.ckpt"))
    assert resumed.rates == whole.rates[15:]
    checkpoint = torch.load(tmp_path / "step=15.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["lr_phases"][1]["schedule"] == "cosine"


def test_an_lr_phase_past_the_end_of_training_names_the_field() -> None:
    data = SyntheticDataModule(train_size=160, batch_size=16)
    module = ClassificationModule(
        SmallCNN(num_classes=data.num_classes),
        lr_phases=[{"start_epoch": 0, "lr": 0.1}, {"start_epoch": 2.5, "lr": 0.01}],
    )
    with pytest.raises(ValueError, match=r"`lr_phases\[1\].start_epoch`=2.5 is past the end"):
        _trainer([], max_epochs=2).fit(module, data)
    # One that starts as training ends never applies, and is no error.
    module = ClassificationModule(
        SmallCNN(num_classes=data.num_classes),
        lr_phases=[{"start_epoch": 0, "lr": 0.1}, {"start_epoch": 2, "lr": 0.01}],
    )
    _trainer([], max_epochs=2, limit_val_batches=0).fit(module, data)


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ("cosine", r"`lr_phases`='cosine' is not allowed; give a list of phases"),
        ([], r"`lr_phases` is empty"),
        ([0.1], r"`lr_phases\[0\]`=0.1 is not a mapping"),
        ([{"start_epoch": 0, "lr": 0.1, "gamma": 2}], r"unknown keys \['gamma'\]"),
        ([{"lr": 0.1}], r"`lr_phases\[0\]` has no `start_epoch`"),
        ([{"start_epoch": 0}], r"`lr_phases\[0\]` needs exactly one of `lr` \(a rate\) and"),
        ([{"start_epoch": 0, "lr": 0.1, "lr_scale": 1}], r"needs exactly one of `lr`"),
        ([{"start_epoch": 0, "lr_scale": -1}], r"`lr_phases\[0\].lr_scale`=-1 is not allowed"),
        ([{"start_epoch": -1, "lr": 0.1}], r"`lr_phases\[0\].start_epoch`=-1 is not allowed"),
        ([{"start_epoch": 0, "lr": 0}], r"`lr_phases\[0\].lr`=0 is not allowed; it must be > 0"),
        (
            [{"start_epoch": 2, "lr": 0.1, "end_epoch": 2}],
            r"`lr_phases\[0\].end_epoch`=2 is not allowed; it must be null or > its start_epoch",
        ),
        ([{"start_epoch": 0, "lr": 0.1, "schedule": "step"}], r"`lr_phases\[0\].schedule`='step'"),
        (
            [{"start_epoch": 0, "lr": 0.1, "min_lr_ratio": 2}],
            r"`lr_phases\[0\].min_lr_ratio`=2 is not allowed; it must be in \[0, 1\]",
        ),
        (
            [{"start_epoch": 1, "lr": 0.1}, {"start_epoch": 0.5, "lr": 0.1}],
            r"`lr_phases\[1\].start_epoch`=0.5 is before the previous phase's start_epoch=1",
        ),
        (
            [{"start_epoch": 0, "lr": 0.1, "end_epoch": 3}, {"start_epoch": 2, "lr": 0.1}],
            r"`lr_phases\[0\].end_epoch`=3 is after the next phase's start_epoch=2",
        ),
    ],
)
def test_bad_lr_phases_name_the_entry_and_key(phases: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassificationModule(SmallCNN(), lr_phases=phases)
