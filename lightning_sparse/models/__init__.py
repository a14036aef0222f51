"""Backbones: plain ``nn.Module``s, no Lightning inside.

``SmallCNN`` and ``MLP`` are the embedded defaults; ``LeNet5`` is Caffe's, the model Deep
Compression reports on; ``resnet18`` and ``mobilenet_v3_small`` adapt torchvision's (imported only
when called). Any other ``nn.Module`` works too: name it by
``_target_`` in the ``model.model`` node of a model config.
"""

from lightning_sparse.models.cnn import SmallCNN
from lightning_sparse.models.lenet import LeNet5
from lightning_sparse.models.mlp import MLP
from lightning_sparse.models.vision import mobilenet_v3_small, resnet18

__all__ = ["MLP", "LeNet5", "SmallCNN", "mobilenet_v3_small", "resnet18"]
