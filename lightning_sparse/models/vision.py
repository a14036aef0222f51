"""torchvision's ResNet-18 and MobileNetV3-small as backbones, untrained and reshaped for our data.

Both are built with ``weights=None``: this project never downloads weights behind the user's back.
To start from pretrained weights, save them once (``torch.save(resnet18(weights=...).state_dict(),
"r18.pt")``) and pass the file as ``ClassificationModule(init_from="r18.pt")``; the 1000-class
head is swapped for one with this model's classes.

``small_inputs`` replaces the ImageNet stem, which shrinks the input 4x (ResNet: 7x7 stride-2 conv
and a max-pool; MobileNet: a stride-2 conv) before the first block, by a stride-1 stem, as is usual
for 32x32 CIFAR images; on 8x8 digits or 28x28 MNIST the ImageNet stem would leave almost nothing
to convolve. Parameter names stay torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``,
``fc.weight``; ``features.0.0.weight``, ``classifier.3.weight``), so torchvision state dicts load.
"""

from __future__ import annotations

from torch import nn

from lightning_sparse.core.vision_backend import torchvision_module

__all__ = ["mobilenet_v3_small", "resnet18"]


def _check(num_classes: int, in_channels: int) -> None:
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if int(value) < 1:
            raise ValueError(f"`{field}`={value!r} is not allowed; it must be >= 1.")


def resnet18(num_classes: int = 10, in_channels: int = 3, small_inputs: bool = True) -> nn.Module:
    """torchvision's ResNet-18 (``weights=None``) with ``num_classes`` outputs.

    Args:
        num_classes: outputs of the head ``fc``.
        in_channels: channels of the input images (the stem conv is rebuilt when not 3).
        small_inputs: a 3x3 stride-1 stem conv and no max-pool (CIFAR-style), for images of about
            64 pixels or fewer; ``False`` keeps the ImageNet stem.

    Example::

        model = resnet18(num_classes=10, in_channels=1)  # MNIST
        logits = model(torch.zeros(2, 1, 28, 28))  # [2, 10]
    """
    _check(num_classes, in_channels)
    models = torchvision_module("The ResNet-18 adapter").models
    model = models.resnet18(weights=None, num_classes=int(num_classes))
    channels = int(in_channels)
    if small_inputs:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if small_inputs or int(in_channels) != 3:
        # The stem was replaced after torchvision's init; give it the same (Kaiming, fan-out) init.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def mobilenet_v3_small(
    num_classes: int = 10, in_channels: int = 3, small_inputs: bool = True, dropout: float = 0.2
) -> nn.Module:
    """torchvision's MobileNetV3-small (``weights=None``) with ``num_classes`` outputs.

    Args:
        num_classes: outputs of the head ``classifier.3``.
        in_channels: channels of the input images (the stem conv is rebuilt when not 3).
        small_inputs: a stride-1 stem conv (CIFAR-style) instead of the ImageNet stride-2 one.
        dropout: dropout before the head.

    Example::

        model = mobilenet_v3_small(num_classes=10)
        logits = model(torch.zeros(2, 3, 32, 32))  # [2, 10]
    """
    _check(num_classes, in_channels)
    if not 0 <= dropout < 1:
        raise ValueError(f"`dropout`={dropout!r} is not allowed; it must be in [0, 1).")
    models = torchvision_module("The MobileNetV3 adapter").models
    model = models.mobilenet_v3_small(weights=None, num_classes=int(num_classes), dropout=dropout)
    stem = model.features[0][0]
    if small_inputs or int(in_channels) != 3:
        model.features[0][0] = nn.Conv2d(
            int(in_channels),
            stem.out_channels,
            kernel_size=3,
            stride=1 if small_inputs else 2,
            padding=1,
            bias=False,
        )
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model
