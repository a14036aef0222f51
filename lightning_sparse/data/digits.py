"""scikit-learn's handwritten digits: the embedded default data set (no download)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from lightning_sparse.data.base import (
    TensorDataModule,
    as_dataset,
    check_classes,
    check_fractions,
    select_classes,
)

__all__ = ["DIGITS_SHAPE", "DigitsDataModule"]

DIGITS_SHAPE = (1, 8, 8)


class DigitsDataModule(TensorDataModule):
    """The 1797 8x8 digit images of ``sklearn.datasets.load_digits`` as ``[1, 8, 8]`` tensors.

    Pixels (0..16) are scaled to [0, 1]. The train/val/test split is stratified by class and fixed
    by ``split_seed`` alone, so runs with different ``seed`` values are evaluated on the same test
    images; ``seed`` only drives the training shuffle.

    Args:
        batch_size: samples per batch (per process under DDP).
        val_fraction: share of all images held out for validation, in (0, 1).
        test_fraction: share of all images held out for testing, in (0, 1).
        split_seed: seed of the split; keep it fixed to compare runs.
        seed: seed of the training shuffle (set to the run's seed by the configs).
        num_workers: ``DataLoader`` worker processes.
        num_classes: use the digits ``0..num_classes-1`` only (2 to 10); with ``classes``, it
            must equal ``len(classes)`` (None: taken from ``classes``, else 10).
        input_shape: must be ``(1, 8, 8)``; stated so that model configs can interpolate it.
        classes: keep only these digits, relabelled ``0..len(classes)-1`` in the order given,
            e.g. ``[5, 6, 7, 8, 9]`` for a transfer task whose label 0 is the digit 5. None keeps
            ``0..num_classes-1``.
        max_shift: translate every training image by up to this many pixels per axis (zeros
            shifted in), a fresh draw per epoch that is a pure function of ``(seed, epoch,
            sample)``; 0 (the default) trains on the images as they are. Val/test are never moved.

    Example::

        datamodule = DigitsDataModule(batch_size=64)
        Trainer(max_epochs=5).fit(ClassificationModule(SmallCNN()), datamodule=datamodule)
        upper = DigitsDataModule(classes=[5, 6, 7, 8, 9])  # 5 classes: digit 5 is label 0
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        num_classes: int | None = None,
        input_shape: Sequence[int] = DIGITS_SHAPE,
        classes: Sequence[int] | None = None,
        max_shift: int = 0,
    ) -> None:
        if tuple(int(d) for d in input_shape) != DIGITS_SHAPE:
            raise ValueError(
                f"`input_shape`={list(input_shape)} is not allowed; the digits are "
                f"{list(DIGITS_SHAPE)} images."
            )
        if int(max_shift) < 0:
            raise ValueError(f"`max_shift`={max_shift!r} is not allowed; it must be >= 0.")
        chosen = check_classes(classes, num_classes, available=10)
        check_fractions(val_fraction, test_fraction)
        count = len(chosen) if chosen is not None else 10
        super().__init__(count, DIGITS_SHAPE, batch_size, seed, num_workers)
        self.classes = chosen
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.max_shift = int(max_shift)

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        digits = load_digits()
        keep, labels = select_classes(np.asarray(digits.target, dtype=np.int64), self.classes)
        images = np.asarray(digits.images, dtype=np.float32)[keep] / 16.0
        index = np.arange(len(labels))
        rest, test = train_test_split(
            index,
            test_size=self.test_fraction,
            stratify=labels,
            random_state=self.split_seed,
        )
        # val_fraction is a share of all images, so rescale it to the share of what is left.
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1.0 - self.test_fraction),
            stratify=labels[rest],
            random_state=self.split_seed,
        )
        inputs = torch.from_numpy(images).unsqueeze(1)
        targets = torch.from_numpy(labels)
        # Sorted indices keep each split in the data set's own order; the sampler shuffles.
        train_set, val_set, test_set = (
            as_dataset(inputs[np.sort(split)], targets[np.sort(split)])
            for split in (train, val, test)
        )
        return train_set, val_set, test_set
