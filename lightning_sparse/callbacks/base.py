"""The base every compression technique builds on: the clock, strategy checks and mask plumbing.

The clock is Lightning's own: a fractional epoch is optimizer steps taken divided by optimizer steps
per epoch, both read from the trainer, so gradient accumulation, ``limit_train_batches`` and
``max_steps`` are accounted for without a user-supplied ``steps_per_epoch``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from typing_extensions import override

__all__ = [
    "CompressionCallback",
    "broadcast_masks",
    "check_strategy",
    "fractional_epoch",
    "steps_per_epoch",
]


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one training epoch, as the trainer will take them.

    Lightning steps at the end of every ``accumulate_grad_batches`` window and once more at the end
    of an epoch whose batch count the window does not divide, hence the ceiling.

    Raises:
        ValueError: the train dataloader has no length, so an epoch has no fixed number of steps.
    """
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "Compression schedules are in epochs and need a train dataloader with a length; "
            "this one has none (an IterableDataset?). Give the dataset a `__len__`."
        )
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))


def fractional_epoch(trainer: pl.Trainer) -> float:
    """Optimizer steps taken so far, in epochs."""
    return trainer.global_step / steps_per_epoch(trainer)


def check_strategy(trainer: pl.Trainer, technique: str) -> None:
    """Refuse strategies that shard parameters: masks need every weight whole on every rank."""
    strategy = trainer.strategy
    supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(
        strategy, DeepSpeedStrategy
    )
    if not supported:
        raise ValueError(
            f"{technique} does not support strategy {type(strategy).__name__}: it needs every "
            "parameter whole on each process. Supported: single device, 'ddp', 'ddp_spawn' "
            "(DDPStrategy)."
        )


class CompressionCallback(Callback):
    """Common ground of the techniques: a state key per instance, the clock and the strategy check.

    Args:
        name: tells two instances of one technique apart in checkpoints and logs; defaults to the
            class name.
    """

    def __init__(self, name: str | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"`name`={name!r} must be a non-empty string or None.")
        self.name = name

    @property
    @override
    def state_key(self) -> str:
        # A readable, stable key (not a hash of the settings), so a recipe may change a value and
        # still resume, and two named instances coexist in one checkpoint.
        return f"{type(self).__qualname__}[{self.name}]" if self.name else type(self).__qualname__

    @property
    def log_name(self) -> str:
        """Prefix under ``compression/`` for this instance's logged metrics."""
        return self.name or type(self).__name__

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, type(self).__name__)


def broadcast_masks(trainer: pl.Trainer, tensors: list[torch.Tensor]) -> None:
    """Overwrite bool ``tensors`` in place with rank 0's (one collective for all of them)."""
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.uint8) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].reshape(tensor.shape).to(tensor.dtype))
        offset += count


def to_plain(value: Any) -> Any:
    """Hydra hands lists as ``ListConfig``; keep callback attributes plain Python."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "__iter__") and not isinstance(value, dict):
        return [to_plain(v) for v in value]
    return value
