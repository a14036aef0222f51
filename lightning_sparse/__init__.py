"""lightning_sparse: neural-network compression as PyTorch Lightning callbacks and Hydra recipes.

Techniques are callbacks (``MagnitudePruning``, ``ConstantPruning``, ``ChannelPruning``,
``QuantizationAwareTraining``, ``KnowledgeDistillation``, ``WeightClustering``,
``SparsityRegularization``, ``EarlyExit``, ``LowRankFactorization``); a LightningModule that takes
loss terms from techniques mixes in ``CompressionModule``; ``recipe.load`` builds the callbacks of a
shipped recipe without a Hydra app; ``register_layer_kind`` tells every technique how to read the
weight of a layer type of your own (which dimension is input, which output).

The names below are imported on first use, not with the package: ``python -m
lightning_sparse.train --help`` (or a misspelled override) then answers without importing torch and
Lightning, which take seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_sparse.callbacks import (
        ChannelPruning,
        CompressionCallback,
        ConstantPruning,
        EarlyExit,
        GradualPruning,
        KnowledgeDistillation,
        LowRankFactorization,
        MagnitudePruning,
        MaskPruning,
        QuantizationAwareTraining,
        SparsityRegularization,
        WeightClustering,
    )
    from lightning_sparse.core.layers import register_layer_kind
    from lightning_sparse.module import ClassificationModule, CompressionModule

# Public name -> the module that defines it (the module itself for `recipe`, the recipe API:
# `lightning_sparse.recipe.load`, which type checkers find as a submodule).
_LAZY = {
    "ChannelPruning": "lightning_sparse.callbacks",
    "ClassificationModule": "lightning_sparse.module",
    "CompressionCallback": "lightning_sparse.callbacks",
    "CompressionModule": "lightning_sparse.module",
    "ConstantPruning": "lightning_sparse.callbacks",
    "EarlyExit": "lightning_sparse.callbacks",
    "GradualPruning": "lightning_sparse.callbacks",
    "KnowledgeDistillation": "lightning_sparse.callbacks",
    "LowRankFactorization": "lightning_sparse.callbacks",
    "MagnitudePruning": "lightning_sparse.callbacks",
    "MaskPruning": "lightning_sparse.callbacks",
    "QuantizationAwareTraining": "lightning_sparse.callbacks",
    "SparsityRegularization": "lightning_sparse.callbacks",
    "WeightClustering": "lightning_sparse.callbacks",
    "recipe": "lightning_sparse.recipe",
    "register_layer_kind": "lightning_sparse.core.layers",
}

__all__ = [
    "ChannelPruning",
    "ClassificationModule",
    "CompressionCallback",
    "CompressionModule",
    "ConstantPruning",
    "EarlyExit",
    "GradualPruning",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "MagnitudePruning",
    "MaskPruning",
    "QuantizationAwareTraining",
    "SparsityRegularization",
    "WeightClustering",
    "recipe",
    "register_layer_kind",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_sparse' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "recipe" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
