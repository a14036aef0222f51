"""A small CNN for 8x8 images (the digits default); a plain ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv(3x3) - ReLU - conv(3x3) - ReLU - maxpool(2) - linear(128) - ReLU - linear(classes).

    Submodules are named ``conv1``, ``conv2``, ``fc1``, ``fc2`` so recipes can address them
    (``re:model\\.conv2\\.weight`` when wrapped as ``ClassificationModule.model``). With
    ``depth`` > 2, ``conv3`` ... ``conv<depth>`` (as wide as ``conv2``) follow ``conv2`` before the
    pool; with ``batch_norm``, each ``conv<i>`` is followed by ``bn<i>`` (and has no bias), which
    BatchNorm-scale techniques (Network Slimming) need. The defaults build the original network,
    with the same parameter names.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the last layer.
        width: channels of ``conv1``; the other convolutions have twice as many.
        input_size: height and width of the (square) input images; must be even.
        depth: number of 3x3 convolutions, >= 2.
        hidden: outputs of ``fc1``.
        batch_norm: a BatchNorm after every convolution.

    Example::

        model = SmallCNN(in_channels=1, num_classes=10)
        logits = model(torch.zeros(4, 1, 8, 8))  # [4, 10]
        slim = SmallCNN(width=16, depth=3, batch_norm=True)  # conv1 bn1 conv2 bn2 conv3 bn3
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        input_size: int = 8,
        depth: int = 2,
        hidden: int = 128,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for field, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
            ("hidden", hidden),
        ):
            if int(value) < 1:
                raise ValueError(f"`{field}`={value!r} is not allowed; it must be >= 1.")
        if int(depth) < 2:
            raise ValueError(f"`depth`={depth!r} is not allowed; it must be >= 2.")
        if int(input_size) < 2 or int(input_size) % 2:
            raise ValueError(
                f"`input_size`={input_size!r} is not allowed; it must be even and >= 2 "
                "(the 2x2 max-pool halves it)."
            )
        width = int(width)
        pooled = int(input_size) // 2
        self.depth = int(depth)
        widths = [int(in_channels), width] + [2 * width] * (self.depth - 1)
        # Attributes conv1, bn1, conv2, ... in forward order (the order named_modules lists them).
        for index in range(1, self.depth + 1):
            conv = nn.Conv2d(widths[index - 1], widths[index], 3, padding=1, bias=not batch_norm)
            setattr(self, f"conv{index}", conv)
            if batch_norm:
                setattr(self, f"bn{index}", nn.BatchNorm2d(widths[index]))
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * pooled * pooled, int(hidden))
        self.fc2 = nn.Linear(int(hidden), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_classes]`` for images ``[batch, in_channels, size, size]``."""
        for index in range(1, self.depth + 1):
            x = getattr(self, f"conv{index}")(x)
            norm = getattr(self, f"bn{index}", None)
            x = torch.relu(x if norm is None else norm(x))
        x = self.pool(x)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
