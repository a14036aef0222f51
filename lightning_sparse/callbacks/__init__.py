"""Compression techniques as Lightning callbacks, and the interface they declare."""

from lightning_sparse.callbacks.base import CompressionCallback, ScheduleLimit
from lightning_sparse.callbacks.channel import ChannelPruning
from lightning_sparse.callbacks.distillation import KnowledgeDistillation
from lightning_sparse.callbacks.pruning import (
    ConstantPruning,
    GradualPruning,
    MagnitudePruning,
    MaskPruning,
)
from lightning_sparse.callbacks.quantization import QuantizationAwareTraining
from lightning_sparse.callbacks.structure import StructuralCompression

__all__ = [
    "ChannelPruning",
    "CompressionCallback",
    "ConstantPruning",
    "GradualPruning",
    "KnowledgeDistillation",
    "MagnitudePruning",
    "MaskPruning",
    "QuantizationAwareTraining",
    "ScheduleLimit",
    "StructuralCompression",
]
