"""Compression techniques as Lightning callbacks."""

from lightning_sparse.callbacks.base import CompressionCallback
from lightning_sparse.callbacks.distillation import KnowledgeDistillation
from lightning_sparse.callbacks.pruning import ConstantPruning, MagnitudePruning
from lightning_sparse.callbacks.quantization import QuantizationAwareTraining

__all__ = [
    "CompressionCallback",
    "ConstantPruning",
    "KnowledgeDistillation",
    "MagnitudePruning",
    "QuantizationAwareTraining",
]
