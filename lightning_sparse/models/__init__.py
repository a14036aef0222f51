"""Backbones: plain ``nn.Module``s, no Lightning inside.

``SmallCNN`` and ``MLP`` are the embedded defaults; ``resnet18`` and ``mobilenet_v3_small`` adapt
torchvision's (imported only when called). Any other ``nn.Module`` works too: name it by
``_target_`` in the ``model.model`` node of a model config.
"""

from lightning_sparse.models.cnn import SmallCNN
from lightning_sparse.models.mlp import MLP
from lightning_sparse.models.vision import mobilenet_v3_small, resnet18

__all__ = ["MLP", "SmallCNN", "mobilenet_v3_small", "resnet18"]
