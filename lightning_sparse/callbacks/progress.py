"""Progress for logs and pipes: one line per epoch, where a live bar would only add noise."""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from typing_extensions import override

from lightning_sparse.callbacks.base import MASKS, compression_callbacks
from lightning_sparse.core.console import echo

__all__ = ["EpochLine", "progress_bar"]


class EpochLine(ProgressBar):
    """A progress "bar" that prints one line per training epoch: loss, val accuracy, sparsity.

    When it acts: ``on_train_epoch_end`` (after that epoch's validation), on rank zero only. The
    line reads what the module logged (``train/loss``, ``val/acc`` by default) and measures the
    sparsity of the weights the masking techniques prune, so a run that writes to a file or a pipe
    shows a sign of life every epoch::

        epoch 3/60  loss 0.2141  val acc 96.67%  sparsity 0.00%

    Args:
        loss_key: the logged metric shown as loss.
        accuracy_key: the logged metric shown as validation accuracy.

    Example::

        Trainer(callbacks=[EpochLine()], enable_progress_bar=True)
    """

    def __init__(self, loss_key: str = "train/loss", accuracy_key: str = "val/acc") -> None:
        super().__init__()
        self.loss_key = loss_key
        self.accuracy_key = accuracy_key
        self._enabled = True

    def __repr__(self) -> str:
        return f"EpochLine(loss_key={self.loss_key!r}, accuracy_key={self.accuracy_key!r})"

    @property
    def is_enabled(self) -> bool:
        """Whether it prints (Lightning disables it on ranks other than zero)."""
        return self._enabled

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled and trainer.is_global_zero:
            echo(self.line(trainer, pl_module))

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """The text for the epoch that just ended."""
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        parts = [f"epoch {trainer.current_epoch + 1}{f'/{total}' if total else ''}"]
        metrics = trainer.callback_metrics
        for label, key, percent in (
            ("loss", self._epoch_key(metrics, self.loss_key), False),
            ("val acc", self.accuracy_key, True),
        ):
            value = _number(metrics.get(key))
            if value is not None:
                parts.append(f"{label} {100 * value:.2f}%" if percent else f"{label} {value:.4f}")
        sparsity = _pruned_sparsity(trainer, pl_module)
        if sparsity is not None:
            parts.append(f"sparsity {100 * sparsity:.2f}%")
        return "  ".join(parts)

    @staticmethod
    def _epoch_key(metrics: Any, key: str) -> str:
        # A metric logged on_step and on_epoch appears as `<key>_epoch`, the mean over the epoch.
        return f"{key}_epoch" if f"{key}_epoch" in metrics else key


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _pruned_sparsity(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """Zeros over the weights that masking techniques hold; None when none does."""
    names: dict[str, None] = {}
    for technique in compression_callbacks(trainer.callbacks):  # type: ignore[attr-defined]
        if MASKS in technique.changes:
            names.update(dict.fromkeys(technique.target_names))
    if not names:
        return None
    params = dict(pl_module.named_parameters())
    zeros = total = 0
    for name in names:
        if name in params:
            weight = params[name].detach()
            zeros += int((weight == 0).sum().item())
            total += weight.numel()
    return zeros / total if total else None


def progress_bar() -> ProgressBar:
    """A rich progress bar when stdout is a terminal, else :class:`EpochLine`.

    Example (``conf/callbacks/default.yaml``)::

        progress_bar:
          _target_: lightning_sparse.callbacks.progress_bar
    """
    return RichProgressBar() if sys.stdout.isatty() else EpochLine()
