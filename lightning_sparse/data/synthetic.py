"""Class-conditional Gaussian blobs shaped like images: a data set for fast tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from lightning_sparse.data.base import TensorDataModule, as_dataset

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(TensorDataModule):
    """Each class is a random "prototype image"; samples are prototypes plus Gaussian noise.

    The data are a pure function of ``data_seed`` (and the sizes), so every run and every process
    sees the same samples; ``seed`` only drives the training shuffle. With the default ``noise``
    a small CNN separates the classes within an epoch or two.

    Args:
        num_classes: number of classes.
        input_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        train_size: training samples.
        val_size: validation samples.
        test_size: test samples.
        noise: standard deviation of the noise around each unit-variance prototype.
        batch_size: samples per batch (per process under DDP).
        data_seed: seed of the prototypes and samples.
        seed: seed of the training shuffle (set to the run's seed by the configs).
        num_workers: ``DataLoader`` worker processes.

    Example::

        datamodule = SyntheticDataModule(num_classes=4, input_shape=(1, 8, 8), train_size=256)
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 8, 8),
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        noise: float = 1.0,
        batch_size: int = 64,
        data_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes`={num_classes!r} is not allowed; it must be >= 2.")
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(
                f"`input_shape`={list(input_shape)} is not allowed; give positive dimensions."
            )
        for field, value in (("train_size", train_size), ("val_size", val_size)):
            if int(value) < 1:
                raise ValueError(f"`{field}`={value!r} is not allowed; it must be >= 1.")
        if int(test_size) < 1:
            raise ValueError(f"`test_size`={test_size!r} is not allowed; it must be >= 1.")
        if noise < 0:
            raise ValueError(f"`noise`={noise!r} is not allowed; it must be >= 0.")
        super().__init__(int(num_classes), shape, batch_size, seed, num_workers)
        self.train_size = int(train_size)
        self.val_size = int(val_size)
        self.test_size = int(test_size)
        self.noise = float(noise)
        self.data_seed = int(data_seed)

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        # A private generator: building the data must not consume the global RNG, or the run's
        # seeded initialisation would depend on whether the data were built first.
        generator = torch.Generator().manual_seed(self.data_seed)
        prototypes = torch.randn((self.num_classes, *self.input_shape), generator=generator)

        def sample(size: int) -> TensorDataset:
            labels = torch.randint(self.num_classes, (size,), generator=generator)
            noise = torch.randn((size, *self.input_shape), generator=generator)
            return as_dataset(prototypes[labels] + self.noise * noise, labels)

        return sample(self.train_size), sample(self.val_size), sample(self.test_size)
