"""A small CNN for 8x8 images (the digits default); a plain ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv(3x3) - ReLU - conv(3x3) - ReLU - maxpool(2) - linear(128) - ReLU - linear(classes).

    Submodules are named ``conv1``, ``conv2``, ``fc1``, ``fc2`` so recipes can address them
    (``re:model\\.conv2\\.weight`` when wrapped as ``ClassificationModule.model``).

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the last layer.
        width: channels of ``conv1``; ``conv2`` has twice as many.
        input_size: height and width of the (square) input images; must be even.

    Example::

        model = SmallCNN(in_channels=1, num_classes=10)
        logits = model(torch.zeros(4, 1, 8, 8))  # [4, 10]
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, input_size: int = 8
    ) -> None:
        super().__init__()
        for field, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
        ):
            if int(value) < 1:
                raise ValueError(f"`{field}`={value!r} is not allowed; it must be >= 1.")
        if int(input_size) < 2 or int(input_size) % 2:
            raise ValueError(
                f"`input_size`={input_size!r} is not allowed; it must be even and >= 2 "
                "(the 2x2 max-pool halves it)."
            )
        width = int(width)
        pooled = int(input_size) // 2
        self.conv1 = nn.Conv2d(int(in_channels), width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * pooled * pooled, 128)
        self.fc2 = nn.Linear(128, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_classes]`` for images ``[batch, in_channels, size, size]``."""
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
