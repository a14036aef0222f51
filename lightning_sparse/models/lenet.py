"""Caffe's LeNet-5, the model Deep Compression (Han et al., 2016) reports on: a plain module."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5"]

_KERNEL = 5


def _features_side(input_size: int, padding: int) -> int:
    """Height (= width) of ``conv2``'s pooled output, 0 when the input is too small.

    Without padding the smallest input that fits is 16: 16 -> 12 -> 6 -> 2 -> 1.
    """
    side = input_size
    for _ in range(2):
        side = side + 2 * padding - (_KERNEL - 1)
        if side < 2:
            return 0
        side //= 2
    return side


def _smallest_input(padding: int) -> int:
    size = 1
    while _features_side(size, padding) < 1:
        size += 1
    return size


class LeNet5(nn.Module):
    """conv(5x5, 20) - maxpool(2) - conv(5x5, 50) - maxpool(2) - linear(500) - ReLU - linear.

    Caffe's ``lenet_train_test.prototxt``, layer for layer: no activation after the convolutions,
    one ReLU after the first fully connected layer. On ``1x28x28`` with 10 classes it has 431 080
    parameters (``conv1`` 520, ``conv2`` 25 050, ``fc1`` 400 500, ``fc2`` 5 010). Submodules are
    named ``conv1``, ``conv2``, ``fc1``, ``fc2`` (Caffe's ``ip1``/``ip2`` are ``fc1``/``fc2``), as
    in :class:`~lightning_sparse.models.SmallCNN`, so the same recipes address them. Pooling
    rounds down (PyTorch's default; Caffe rounds up), which differs only on odd sizes.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the last layer.
        input_size: height and width of the (square) input images.
        padding: zero padding of both convolutions. None: 0 (Caffe's) whenever the input has at
            least 16 pixels, else the least padding that fits (2 for 8x8 digits), so the model
            also runs on small images; the 28x28 model is never padded.

    Raises:
        ValueError: a size or count below 1, or an input too small for ``padding``; the message
            gives the smallest input size and the padding that fits.

    Example::

        model = LeNet5(in_channels=1, num_classes=10, input_size=28)
        logits = model(torch.zeros(4, 1, 28, 28))  # [4, 10]
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        for field, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("input_size", input_size),
        ):
            if int(value) < 1:
                raise ValueError(f"`{field}`={value!r} is not allowed; it must be >= 1.")
        size = int(input_size)
        if padding is None:
            padding = 0
            while _features_side(size, padding) < 1:
                padding += 1
        elif int(padding) < 0:
            raise ValueError(f"`padding`={padding!r} is not allowed; it must be >= 0.")
        padding = int(padding)
        side = _features_side(size, padding)
        if side < 1:
            fits = next(p for p in range(padding + 1, size + _KERNEL) if _features_side(size, p))
            raise ValueError(
                f"model=lenet5: `input_size`={size} is too small for LeNet-5 with "
                f"`padding`={padding}; it needs inputs of at least {_smallest_input(padding)} "
                f"pixels. Set padding={fits} (with Hydra: model.model.padding={fits}) or null "
                "(the least that fits), or use 28x28 data (data=mnist5k, data=mnist)."
            )
        self.padding = padding
        self.conv1 = nn.Conv2d(int(in_channels), 20, kernel_size=_KERNEL, padding=padding)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=_KERNEL, padding=padding)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_classes]`` for images ``[batch, in_channels, size, size]``."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
