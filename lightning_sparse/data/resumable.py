"""Training samplers whose order survives a mid-epoch resume.

Lightning resumes the loop counters of an interrupted epoch, but a plain shuffled ``DataLoader``
restarts the epoch from its first batch with a new permutation, so the resumed run sees other
batches than the uninterrupted one. ``ResumableSampler`` fixes both halves: its permutation is a
pure function of ``(seed, epoch)`` (as ``DistributedSampler``'s is), and ``train_sampler`` skips the
batches the interrupted epoch had already consumed. Being a ``DistributedSampler`` it also shards by
rank, so Lightning keeps it under DDP instead of replacing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import lightning.pytorch as pl
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableSampler", "batches_done_in_epoch", "train_sampler"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first samples of its next pass.

    ``len()`` stays the full epoch so Lightning's batch counters stay consistent; only the
    iteration is shortened.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip_next = 0

    def skip_once(self, num_samples: int) -> None:
        """Skip ``num_samples`` of this rank's samples in the next pass only."""
        self._skip_next = max(int(num_samples), 0)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip_next = self._skip_next, 0
        return iter(indices[skip:])


def batches_done_in_epoch(trainer: pl.Trainer | None, batches_per_epoch: int) -> int:
    """Training batches the interrupted epoch had consumed when its checkpoint was saved.

    0 when not resuming, or when the checkpoint was saved after the epoch's last batch (the
    resumed run then starts the next epoch afresh).
    """
    if trainer is None or not trainer.fit_loop.restarting:
        return 0
    # `ready` counts batches fetched and handed to the step, including one whose
    # `on_train_batch_end` saved the checkpoint (where `completed` still lags by one).
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    return done if done < batches_per_epoch else 0


def _limited_batches(trainer: pl.Trainer | None, batches: int) -> int:
    """Batches per epoch after the trainer's ``limit_train_batches``."""
    limit = trainer.limit_train_batches if trainer is not None else 1.0
    if isinstance(limit, int):
        return min(batches, limit)
    return batches if limit is None else max(int(batches * float(limit)), 1)


def train_sampler(
    dataset: Sized, trainer: pl.Trainer | None, batch_size: int, shuffle: bool, seed: int
) -> ResumableSampler:
    """A sampler for ``trainer``'s rank that resumes mid-epoch where the checkpoint left off."""
    world_size = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    sampler = ResumableSampler(dataset, world_size, rank, shuffle, seed)  # type: ignore[arg-type]
    batches = _limited_batches(trainer, math.ceil(len(sampler) / batch_size))
    sampler.skip_once(batches_done_in_epoch(trainer, batches) * batch_size)
    return sampler
