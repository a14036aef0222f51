"""Compression techniques as Lightning callbacks, and the interface they declare."""

from lightning_sparse.callbacks.base import CompressionCallback, ScheduleLimit
from lightning_sparse.callbacks.distillation import KnowledgeDistillation
from lightning_sparse.callbacks.early_exit import EarlyExit
from lightning_sparse.callbacks.pruning import (
    ConstantPruning,
    GradualPruning,
    MagnitudePruning,
    MaskPruning,
)
from lightning_sparse.callbacks.quantization import QuantizationAwareTraining
from lightning_sparse.callbacks.regularization import SparsityRegularization

__all__ = [
    "CompressionCallback",
    "ConstantPruning",
    "EarlyExit",
    "GradualPruning",
    "KnowledgeDistillation",
    "MagnitudePruning",
    "MaskPruning",
    "QuantizationAwareTraining",
    "ScheduleLimit",
    "SparsityRegularization",
]
