"""lightning_sparse: neural-network compression as PyTorch Lightning callbacks and Hydra recipes.

Techniques are callbacks (``MagnitudePruning``, ``ConstantPruning``, ``ChannelPruning``,
``QuantizationAwareTraining``, ``KnowledgeDistillation``); a LightningModule that takes
loss terms from techniques mixes in ``CompressionModule``; ``recipe.load`` builds the callbacks of a
shipped recipe without a Hydra app.
"""

from lightning_sparse import recipe
from lightning_sparse.callbacks import (
    ChannelPruning,
    CompressionCallback,
    ConstantPruning,
    GradualPruning,
    KnowledgeDistillation,
    MagnitudePruning,
    MaskPruning,
    QuantizationAwareTraining,
)
from lightning_sparse.module import ClassificationModule, CompressionModule

__all__ = [
    "ChannelPruning",
    "ClassificationModule",
    "CompressionCallback",
    "CompressionModule",
    "ConstantPruning",
    "GradualPruning",
    "KnowledgeDistillation",
    "MagnitudePruning",
    "MaskPruning",
    "QuantizationAwareTraining",
    "recipe",
]
__version__ = "0.1.0"
