"""Compression techniques as Lightning callbacks, the interface they declare, and the trainer's
own callbacks this package ships (progress for logs and pipes, a quieter model summary)."""

from lightning_sparse.callbacks.base import CompressionCallback, ScheduleLimit
from lightning_sparse.callbacks.channel import ChannelPruning
from lightning_sparse.callbacks.clustering import WeightClustering
from lightning_sparse.callbacks.distillation import KnowledgeDistillation
from lightning_sparse.callbacks.early_exit import EarlyExit
from lightning_sparse.callbacks.lowrank import LowRankFactorization
from lightning_sparse.callbacks.progress import EpochLine, progress_bar
from lightning_sparse.callbacks.pruning import (
    ConstantPruning,
    GradualPruning,
    MagnitudePruning,
    MaskPruning,
)
from lightning_sparse.callbacks.quantization import QuantizationAwareTraining
from lightning_sparse.callbacks.regularization import SparsityRegularization
from lightning_sparse.callbacks.structure import StructuralCompression
from lightning_sparse.callbacks.summary import ModelSummary

__all__ = [
    "ChannelPruning",
    "CompressionCallback",
    "ConstantPruning",
    "EarlyExit",
    "EpochLine",
    "GradualPruning",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "MagnitudePruning",
    "MaskPruning",
    "ModelSummary",
    "QuantizationAwareTraining",
    "ScheduleLimit",
    "SparsityRegularization",
    "StructuralCompression",
    "WeightClustering",
    "progress_bar",
]
