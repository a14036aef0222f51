"""lightning_sparse: neural-network compression as PyTorch Lightning callbacks and Hydra recipes.

Techniques are callbacks (``MagnitudePruning``, ``ConstantPruning``,
``QuantizationAwareTraining``, ``KnowledgeDistillation``, ``SparsityRegularization``,
``EarlyExit``); a LightningModule that takes
loss terms from techniques mixes in ``CompressionModule``; ``recipe.load`` builds the callbacks of a
shipped recipe without a Hydra app.
"""

from lightning_sparse import recipe
from lightning_sparse.callbacks import (
    CompressionCallback,
    ConstantPruning,
    EarlyExit,
    GradualPruning,
    KnowledgeDistillation,
    MagnitudePruning,
    MaskPruning,
    QuantizationAwareTraining,
    SparsityRegularization,
)
from lightning_sparse.module import ClassificationModule, CompressionModule

__all__ = [
    "ClassificationModule",
    "CompressionCallback",
    "CompressionModule",
    "ConstantPruning",
    "EarlyExit",
    "GradualPruning",
    "KnowledgeDistillation",
    "MagnitudePruning",
    "MaskPruning",
    "QuantizationAwareTraining",
    "SparsityRegularization",
    "recipe",
]
__version__ = "0.1.0"
