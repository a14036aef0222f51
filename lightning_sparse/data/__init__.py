"""Data modules: the embedded sets, torchvision's sets, image folders, and the resumable sampler.

``DigitsDataModule`` and ``SyntheticDataModule`` need nothing but scikit-learn; the others read
files under a ``root`` (and download them when allowed) through the optional ``vision`` extra.
"""

from lightning_sparse.data.base import TensorDataModule
from lightning_sparse.data.digits import DigitsDataModule
from lightning_sparse.data.synthetic import SyntheticDataModule
from lightning_sparse.data.vision import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
]
