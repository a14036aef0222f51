from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
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
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        **kwargs,
    )


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
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassificationModule(SmallCNN(), **kwargs)
