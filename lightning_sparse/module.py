"""LightningModules that cooperate with compression callbacks.

A Lightning callback cannot add a term to the training loss, so techniques that need one
(distillation, regularisation) implement ``loss_term(trainer, pl_module, batch, outputs)`` and the
module adds :meth:`CompressionModule.compression_loss` to its loss (DESIGN.md, contract 7).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

__all__ = ["OPTIMIZERS", "ClassificationModule", "CompressionModule"]

OPTIMIZERS = ("adam", "adamw", "sgd")


class CompressionModule:
    """Mixin for a ``LightningModule``: sums the loss terms of the trainer's compression callbacks.

    Call :meth:`compression_loss` from ``training_step`` and add it to the task loss. Callbacks that
    contribute a loss check for this mixin in ``setup`` so that a module without it fails loudly
    instead of silently training without the term.

    Example::

        class MyModule(CompressionModule, LightningModule):
            def training_step(self, batch, batch_idx):
                logits = self.net(batch[0])
                loss = F.cross_entropy(logits, batch[1])
                return loss + self.compression_loss(batch, logits)
    """

    def compression_loss(self, batch: Any, outputs: Any) -> torch.Tensor:
        """Sum of ``loss_term(trainer, self, batch, outputs)`` over the trainer's callbacks.

        Args:
            batch: the training batch as given to ``training_step``.
            outputs: the model's forward output on ``batch`` (logits for classification).

        Returns:
            A scalar tensor on the module's device; zero when no callback defines ``loss_term`` or
            the module is not attached to a trainer.
        """
        if not isinstance(self, pl.LightningModule):
            raise TypeError(
                f"{type(self).__name__} uses CompressionModule without being a LightningModule; "
                "declare it as `class M(CompressionModule, LightningModule)`."
            )
        total = torch.zeros((), device=self.device)
        for loss_term in self._loss_terms():
            total = total + loss_term(self._trainer, self, batch, outputs)
        return total

    def has_compression_loss(self) -> bool:
        """Whether any of the trainer's callbacks contributes a loss term."""
        return bool(self._loss_terms())

    def _loss_terms(self) -> list[Any]:
        # `self.trainer` raises when detached; a detached module (plain forward, unit tests) has
        # no callbacks and so no loss terms.
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        terms = (getattr(callback, "loss_term", None) for callback in trainer.callbacks)
        return [term for term in terms if callable(term)]


class ClassificationModule(CompressionModule, pl.LightningModule):
    """Cross-entropy classification around any backbone, with accuracy for every split.

    The backbone is ``self.model``, so parameters are named ``model.<layer>.weight`` (what recipe
    ``params`` patterns match), and a checkpoint's ``state_dict`` with the ``model.`` prefix removed
    loads into the plain backbone. Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc`` (plain accuracy, micro-averaged), plus
    ``train/compression_loss`` when a callback contributes one.

    Args:
        model: the backbone: images in, logits out (built by Hydra from the nested ``model:`` node).
        num_classes: number of classes the backbone predicts.
        lr: learning rate.
        weight_decay: weight decay (decoupled for ``adamw``).
        optimizer: ``adam``, ``adamw`` or ``sgd`` (with ``momentum``).
        momentum: momentum for ``sgd``.

    Example::

        module = ClassificationModule(SmallCNN(), num_classes=10)
        Trainer(callbacks=[MagnitudePruning(final_sparsity=0.9, end_epoch=10)], max_epochs=12).fit(
            module, datamodule=DigitsDataModule()
        )
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"`optimizer`={optimizer!r} is not allowed; choose one of {OPTIMIZERS}."
            )
        if not lr > 0:
            raise ValueError(f"`lr`={lr!r} is not allowed; it must be > 0.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay`={weight_decay!r} is not allowed; it must be >= 0.")
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes`={num_classes!r} is not allowed; it must be >= 2.")
        # The backbone is a module, not a hyperparameter; checkpoints hold its weights instead.
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = int(num_classes)
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @override
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        extra = self.compression_loss(batch, logits)
        if self.has_compression_loss():
            self.log("train/compression_loss", extra, on_step=False, on_epoch=True)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss + extra, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss + extra

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], split: str, metric: MulticlassAccuracy
    ) -> None:
        inputs, labels = batch
        logits = self(inputs)
        metric(logits, labels)
        # sync_dist averages the loss over DDP ranks; the metric object syncs itself.
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log(f"{split}/acc", metric, prog_bar=split == "val")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()
        lr, decay = self.hparams["lr"], self.hparams["weight_decay"]
        name = self.hparams["optimizer"]
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.hparams["momentum"], weight_decay=decay)
