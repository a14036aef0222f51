"""The dense accuracy a run's summary compares its compressed model with (``baseline`` config key).

- ``snapshot`` (default): the model as it was when compression began (the earliest
  ``start_epoch`` of the recipe's techniques, e.g. the end of the main job's dense warm-up),
  kept by :class:`DenseSnapshot` and tested at the end on the same test split. It costs one test
  pass, but it is the dense model after *that many* epochs, not after a whole run; a recipe that
  compresses from epoch 0 has none.
- ``train``: a dense model trained in the same job with the same data, model, trainer settings and
  seed, no compression callbacks: the same as a ``recipe=dense`` run of that seed. Fair, and it
  costs one more training (single-process runs only).
- ``null``: no baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_sparse.callbacks.base import compression_callbacks, fractional_epoch
from lightning_sparse.module import copy_without_trainer, drop_instance_forwards

__all__ = [
    "BASELINES",
    "DenseSnapshot",
    "compression_start",
    "evaluate_accuracy",
    "quiet_kwargs",
]

log = logging.getLogger(__name__)

BASELINES = ("snapshot", "train")
_STATE_VERSION = 1


def compression_start(callbacks: Iterable[Callback]) -> float:
    """The earliest ``start_epoch`` of the techniques (0 for one that acts from the start)."""
    starts = [technique.start_epoch for technique in compression_callbacks(list(callbacks))]
    return min(starts, default=0.0)


class DenseSnapshot(Callback):
    """Keeps the module's weights at the first training batch at or after ``epoch``.

    Put it before the compression callbacks so that it sees the weights before their first step.
    The weights are in the callback's checkpoint state, so a resumed run keeps the same snapshot.

    Args:
        epoch: fractional epoch of the snapshot, > 0 (where compression begins).
    """

    def __init__(self, epoch: float) -> None:
        if not epoch > 0:
            raise ValueError(f"`epoch`={epoch!r} is not allowed; a dense snapshot needs > 0.")
        self.epoch = float(epoch)
        self.taken_at: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"DenseSnapshot(epoch={self.epoch:g})"

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.weights is not None:
            return
        now = fractional_epoch(trainer)
        if now >= self.epoch:
            self.taken_at = now
            self.weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def model(self, pl_module: pl.LightningModule) -> pl.LightningModule | None:
        """A float copy of ``pl_module`` holding the snapshot's weights; None before it is taken."""
        if self.weights is None:
            return None
        clone = drop_instance_forwards(copy_without_trainer(pl_module))
        clone.load_state_dict(self.weights, strict=True)
        return clone

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "taken_at": self.taken_at, "weights": self.weights}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.taken_at = state_dict.get("taken_at")
        self.weights = state_dict.get("weights")


def evaluate_accuracy(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule
) -> float | None:
    """``test/acc`` of ``module`` on ``trainer`` (every DDP rank must call it), loggers muted.

    The run's own trainer, so DDP ranks test their shards together as for the final model; its
    loggers are muted so that the run's logged ``test/acc`` stays the compressed model's.
    """
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.loggers = loggers
    value = (results[0] if results else {}).get("test/acc")
    return None if value is None else float(value)


def quiet_kwargs(trainer_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's trainer settings without loggers, checkpoints, progress bar or summary."""
    kwargs = {
        **trainer_kwargs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return kwargs
