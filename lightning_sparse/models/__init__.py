"""Embedded default backbones: plain ``nn.Module``s, no Lightning inside."""

from lightning_sparse.models.cnn import SmallCNN
from lightning_sparse.models.mlp import MLP

__all__ = ["MLP", "SmallCNN"]
