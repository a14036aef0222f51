"""Shared loader plumbing for the embedded in-memory data sets."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.data.resumable import train_sampler

__all__ = ["TensorDataModule"]


class TensorDataModule(LightningDataModule):
    """A ``LightningDataModule`` over in-memory tensors, split once into train/val/test.

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
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        """Return the (train, val, test) data sets; called once."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the splits once; every stage shares them."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build()

    def _require(self, split: TensorDataset | None, name: str) -> TensorDataset:
        if split is None:
            self.setup()
            split = getattr(self, name)
        assert split is not None  # setup() always fills every split
        return split

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``(seed, epoch)``, resumable mid-epoch, sharded by rank under DDP."""
        dataset = self._require(self.train_set, "train_set")
        sampler = train_sampler(
            dataset, self.trainer, self.batch_size, shuffle=True, seed=self.seed
        )
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """The validation split, in a fixed order."""
        return self._loader(self._require(self.val_set, "val_set"))

    def test_dataloader(self) -> DataLoader:
        """The test split, in a fixed order."""
        return self._loader(self._require(self.test_set, "test_set"))

    def _loader(self, dataset: TensorDataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


def as_dataset(inputs: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """Inputs as float32, labels as int64: what the models and losses expect."""
    return TensorDataset(inputs.to(torch.float32), labels.to(torch.int64))
