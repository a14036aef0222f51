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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from typing_extensions import override

from lightning_sparse.callbacks.base import compression_callbacks, fractional_epoch
from lightning_sparse.core.structure import applied_changes, replay
from lightning_sparse.module import copy_without_trainer, drop_instance_forwards

__all__ = [
    "BASELINES",
    "DenseSnapshot",
    "compression_start",
    "dense_factory",
    "dense_reference",
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
    When a technique changes the structure later (channels removed), :meth:`model` builds the
    architecture the weights fit: a fresh model with the changes made before the snapshot.

    Args:
        epoch: fractional epoch of the snapshot, > 0 (where compression begins).
    """

    def __init__(self, epoch: float) -> None:
        if not epoch > 0:
            raise ValueError(f"`epoch`={epoch!r} is not allowed; a dense snapshot needs > 0.")
        self.epoch = float(epoch)
        self.taken_at: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        # How many structure changes the model had when the snapshot was taken.
        self.structure_changes = 0

    def __repr__(self) -> str:
        return f"DenseSnapshot(epoch={self.epoch:g})"

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_take(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # A technique may act right after the step that reaches its start_epoch (channel removal
        # does), before the next batch starts: the snapshot, called first, is taken before it.
        self._maybe_take(trainer, pl_module)

    def _maybe_take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.weights is not None:
            return
        now = fractional_epoch(trainer)
        if now >= self.epoch:
            self.taken_at = now
            self.weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            self.structure_changes = len(applied_changes(pl_module))

    def model(
        self,
        pl_module: pl.LightningModule,
        build: Callable[[], pl.LightningModule] | None = None,
    ) -> pl.LightningModule | None:
        """A float copy of ``pl_module`` holding the snapshot's weights; None before it is taken.

        Args:
            pl_module: the trained module.
            build: makes a fresh module of the same config, needed when the structure changed
                after the snapshot (None: then there is no snapshot model).
        """
        if self.weights is None:
            return None
        changes = applied_changes(pl_module)
        if len(changes) > self.structure_changes:
            if build is None:
                return None
            clone = drop_instance_forwards(build())
            replay(clone, changes[: self.structure_changes])
        else:
            clone = drop_instance_forwards(copy_without_trainer(pl_module))
        clone.load_state_dict(self.weights, strict=True)
        return clone

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "taken_at": self.taken_at,
            "weights": self.weights,
            "structure_changes": self.structure_changes,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.taken_at = state_dict.get("taken_at")
        self.weights = state_dict.get("weights")
        self.structure_changes = int(state_dict.get("structure_changes", 0))


def dense_factory(model_config: DictConfig) -> Callable[[], pl.LightningModule]:
    """Builds a fresh module of the run's ``model`` config, without ``init_from`` weights."""

    def build() -> pl.LightningModule:
        overrides: dict[str, Any] = {}
        if "init_from" in model_config:
            overrides["init_from"] = None
        if "reset_head" in model_config:
            overrides["reset_head"] = False
        module: pl.LightningModule = instantiate(model_config, **overrides)
        return module

    return build


def dense_reference(
    snapshot: DenseSnapshot | None,
    pl_module: pl.LightningModule,
    build: Callable[[], pl.LightningModule],
) -> pl.LightningModule:
    """The dense model a run's compressed one is timed against (``export_model(dense=)``).

    The snapshot's model when there is one, else a fresh one built from the same config without
    ``init_from`` (its weights do not matter for latency or MACs).
    """
    dense = snapshot.model(pl_module, build) if snapshot is not None else None
    return dense if dense is not None else build()


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
