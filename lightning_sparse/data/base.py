"""Shared loader plumbing for the data modules: fixed splits, resumable shuffling, class subsets."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import cast

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_sparse.data.augment import RandomShift
from lightning_sparse.data.resumable import train_sampler

__all__ = [
    "TensorDataModule",
    "check_classes",
    "check_fractions",
    "select_classes",
    "stratified_split",
]


class TensorDataModule(LightningDataModule):
    """A ``LightningDataModule`` over data sets with a length, split once into train/val/test.

    The embedded sets are in-memory ``TensorDataset``s; the torchvision sets and image folders
    bring their own map-style ``Dataset``s.

    Subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``_build``. The
    train loader draws from :func:`lightning_sparse.data.resumable.train_sampler`, so a mid-epoch
    resume sees exactly the batches an uninterrupted run would, and DDP keeps the sampler (it is a
    ``DistributedSampler``). Val/test loaders are unshuffled; no loader drops its last batch, so
    every sample counts.

    Args:
        num_classes: number of classes in the labels.
        input_shape: shape of one input, e.g. ``(1, 8, 8)``.
        batch_size: samples per batch (per process under DDP).
        seed: seed of the training shuffle (the run's seed); the split does not depend on it.
        num_workers: ``DataLoader`` worker processes.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        batch_size: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size`={batch_size!r} is not allowed; it must be >= 1.")
        if int(num_workers) < 0:
            raise ValueError(f"`num_workers`={num_workers!r} is not allowed; it must be >= 0.")
        self.num_classes = int(num_classes)
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in input_shape)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        # Subclasses that take a `max_shift` argument set it; 0 trains on the images as they are.
        self.max_shift = 0
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return the (train, val, test) data sets; called once."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the splits once; every stage shares them."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build()

    def _require(self, split: Dataset | None, name: str) -> Dataset:
        if split is None:
            self.setup()
            split = getattr(self, name)
        assert split is not None  # setup() always fills every split
        return split

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``(seed, epoch)``, resumable mid-epoch, sharded by rank under DDP."""
        dataset = self._require(self.train_set, "train_set")
        sampler = train_sampler(
            cast(Sized, dataset), self.trainer, self.batch_size, shuffle=True, seed=self.seed
        )
        if self.max_shift:
            dataset = RandomShift(dataset, self.max_shift, self.seed, sampler)
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """The validation split, in a fixed order."""
        return self._loader(self._require(self.val_set, "val_set"))

    def test_dataloader(self) -> DataLoader:
        """The test split, in a fixed order."""
        return self._loader(self._require(self.test_set, "test_set"))

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


def as_dataset(inputs: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """Inputs as float32, labels as int64: what the models and losses expect."""
    return TensorDataset(inputs.to(torch.float32), labels.to(torch.int64))


def check_classes(
    classes: Sequence[int] | None, num_classes: int | None, available: int
) -> list[int] | None:
    """Validate a class subset and the class count that goes with it.

    Args:
        classes: labels to keep (in the order of their new labels ``0..len-1``), or None for all.
        num_classes: the stated class count; None to take it from ``classes`` (or ``available``).
        available: how many classes the data set has (labels ``0..available-1``).

    Returns:
        The subset as a list of ints, or None for every class.

    Raises:
        ValueError: a label out of range or repeated, fewer than 2 classes, or ``num_classes``
            disagreeing with the subset (the message gives the value to set).
    """
    if classes is None:
        count = available if num_classes is None else int(num_classes)
        if not 2 <= count <= available:
            raise ValueError(
                f"`num_classes`={num_classes!r} is not allowed; it must be in 2..{available}."
            )
        return None if count == available else list(range(count))
    chosen = [int(c) for c in classes]
    if len(chosen) < 2:
        raise ValueError(f"`classes`={chosen} is not allowed; keep at least 2 classes.")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"`classes`={chosen} is not allowed; a class is listed twice.")
    outside = [c for c in chosen if not 0 <= c < available]
    if outside:
        raise ValueError(
            f"`classes`={chosen} is not allowed; {outside} are not labels of this data set "
            f"(0..{available - 1})."
        )
    if num_classes is not None and int(num_classes) != len(chosen):
        raise ValueError(
            f"`num_classes`={num_classes} does not match `classes`={chosen} ({len(chosen)} "
            f"classes); set num_classes={len(chosen)} (with Hydra: data.num_classes={len(chosen)})."
        )
    return chosen


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validate the shares of all samples held out for validation and for testing.

    Raises:
        ValueError: a share outside (0, 1), or both together leaving nothing to train on.
    """
    for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"`{field}`={value!r} is not allowed; it must be in (0, 1).")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"`val_fraction` + `test_fraction` = {val_fraction + test_fraction:g} leaves no "
            "training data; their sum must be < 1."
        )


def select_classes(
    labels: np.ndarray, classes: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the samples whose label is in ``classes``, and their labels renumbered.

    ``classes[i]`` becomes label ``i``, so ``[5, 6, 7, 8, 9]`` maps digit 5 to 0. With
    ``classes=None`` every sample is kept with its label.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if classes is None:
        return np.arange(len(labels)), labels
    new_label = np.full(int(max(labels.max(initial=0), max(classes))) + 1, -1, dtype=np.int64)
    new_label[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes))
    index = np.flatnonzero(new_label[labels] >= 0)
    return index, new_label[labels[index]]


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split sample indices by class: each part gets ``fraction`` of every class, rest to the first.

    Deterministic in ``seed``; every part is sorted, so it keeps the data set's own order. Unlike
    scikit-learn's stratified split it accepts tiny classes (small image folders): a part with a
    fraction above 0 gets at least one sample of a class as long as one is left for the first part.

    Args:
        labels: one label per sample.
        fractions: shares of the later parts (e.g. ``[val, test]``); the first part (train) takes
            what is left.
        seed: seed of the per-class shuffle.

    Returns:
        ``len(fractions) + 1`` index arrays: the remainder first, then one per fraction.
    """
    generator = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    labels = np.asarray(labels)
    for label in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == label))
        start = 0
        for position, fraction in enumerate(fractions, start=1):
            count = round(fraction * len(members))
            if fraction > 0 and count == 0 and len(members) - start > 1:
                # Tiny classes still give every part a sample, as long as training keeps one.
                count = 1
            parts[position].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(part)) if part else np.zeros(0, np.int64) for part in parts]
