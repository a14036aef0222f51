"""lightning_sparse: neural-network compression as PyTorch Lightning callbacks and Hydra recipes.

Techniques are callbacks (``MagnitudePruning``, ``ConstantPruning``,
``QuantizationAwareTraining``, ``KnowledgeDistillation``); a LightningModule that takes
loss terms from techniques mixes in ``CompressionModule``; ``recipe.load`` builds the callbacks of a
shipped recipe without a Hydra app; ``register_layer_kind`` tells every technique how to read the
weight of a layer type of your own (which dimension is input, which output).
"""

from lightning_sparse import recipe
from lightning_sparse.callbacks import (
    CompressionCallback,
    ConstantPruning,
    GradualPruning,
    KnowledgeDistillation,
    MagnitudePruning,
    MaskPruning,
    QuantizationAwareTraining,
)
from lightning_sparse.core.layers import register_layer_kind
from lightning_sparse.module import ClassificationModule, CompressionModule

__all__ = [
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
    "register_layer_kind",
]
__version__ = "0.1.0"
