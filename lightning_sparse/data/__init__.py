"""Embedded data sets as ``LightningDataModule``s and the resumable training sampler."""

from lightning_sparse.data.base import TensorDataModule
from lightning_sparse.data.digits import DigitsDataModule
from lightning_sparse.data.synthetic import SyntheticDataModule

__all__ = ["DigitsDataModule", "SyntheticDataModule", "TensorDataModule"]
