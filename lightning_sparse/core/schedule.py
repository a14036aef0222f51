"""Sparsity schedules: when a technique acts and how strongly, as a pure function of the clock.

The clock is a fractional epoch (optimizer steps taken / optimizer steps per epoch); the callback
derives it from the trainer. Nothing here imports Lightning or ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["INTERPOLATIONS", "SparsitySchedule", "interpolate"]


def _linear(progress: float) -> float:
    return progress


def _cubic(progress: float) -> float:
    # Zhu & Gupta (2017): prune fast while many redundant weights remain, slow down near the end.
    return 1.0 - (1.0 - progress) ** 3


def _inverse_cubic(progress: float) -> float:
    return progress**3


INTERPOLATIONS: dict[str, Callable[[float], float]] = {
    "linear": _linear,
    "cubic": _cubic,
    "inverse_cubic": _inverse_cubic,
}

# Tolerance for comparing fractional epochs: 1e-9 epochs is far below one optimizer step.
_EPS = 1e-9


def interpolate(inter_func: str, start: float, end: float, progress: float) -> float:
    """Value between ``start`` and ``end`` at ``progress`` in [0, 1] along ``inter_func``."""
    shape = INTERPOLATIONS[inter_func](min(max(progress, 0.0), 1.0))
    return start + (end - start) * shape


@dataclass(frozen=True)
class SparsitySchedule:
    """Sparsity rising from ``init_sparsity`` to ``final_sparsity`` over an epoch range.

    Updates happen at ``start_epoch + k * update_frequency`` for ``k = 0, 1, ...`` and at
    ``end_epoch`` itself, so the final target is always reached exactly at ``end_epoch``.
    Update ``k`` is identified by its index, which makes "has this update been applied?" a
    comparison of ints.
    """

    init_sparsity: float
    final_sparsity: float
    start_epoch: float
    end_epoch: float
    update_frequency: float
    inter_func: str = "cubic"

    @property
    def num_updates(self) -> int:
        """Number of mask updates, the first at ``start_epoch`` and the last at ``end_epoch``."""
        span = self.end_epoch - self.start_epoch
        if span <= _EPS:
            return 1
        return math.ceil(span / self.update_frequency - _EPS) + 1

    def update_epoch(self, index: int) -> float:
        """Fractional epoch at which update ``index`` is due."""
        return min(self.start_epoch + index * self.update_frequency, self.end_epoch)

    def due_index(self, epoch: float) -> int:
        """Index of the latest update due at ``epoch``; -1 before ``start_epoch``."""
        if epoch < self.start_epoch - _EPS:
            return -1
        if epoch >= self.end_epoch - _EPS:
            return self.num_updates - 1
        return min(
            math.floor((epoch - self.start_epoch) / self.update_frequency + _EPS),
            self.num_updates - 1,
        )

    def sparsity_at_index(self, index: int) -> float:
        """Target sparsity (absolute fraction of zeros) applied by update ``index``."""
        if index < 0:
            return 0.0
        if self.end_epoch - self.start_epoch <= _EPS:
            return self.final_sparsity
        progress = (self.update_epoch(index) - self.start_epoch) / (
            self.end_epoch - self.start_epoch
        )
        return interpolate(self.inter_func, self.init_sparsity, self.final_sparsity, progress)

    def sparsity_at(self, epoch: float) -> float:
        """Target sparsity in force at ``epoch`` (what the last due update applied)."""
        return self.sparsity_at_index(self.due_index(epoch))
