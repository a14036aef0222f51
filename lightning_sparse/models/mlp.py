"""A multi-layer perceptron over flattened inputs; a plain ``nn.Module``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then ``Linear - ReLU`` per hidden layer, then a ``Linear`` to the classes.

    The Linear layers are named ``fc1``, ``fc2``, ... in order (``fc1`` takes the input,
    ``fc<len(hidden)+1>`` produces the logits).

    Args:
        input_dim: features per sample, or the input shape (e.g. ``[1, 8, 8]``), whose product is
            taken, so a config can pass a data set's ``input_shape`` directly.
        hidden: widths of the hidden layers.
        num_classes: outputs of the last layer.

    Example::

        model = MLP(input_dim=[1, 8, 8], hidden=(256, 256))  # fc1: 64 -> 256, ..., fc3: 256 -> 10
    """

    def __init__(
        self,
        input_dim: int | Sequence[int] = 64,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        features = int(input_dim) if isinstance(input_dim, int) else math.prod(map(int, input_dim))
        widths = [int(h) for h in hidden]
        if features < 1 or int(num_classes) < 1 or any(w < 1 for w in widths):
            raise ValueError(
                f"`input_dim`={input_dim!r}, `hidden`={list(hidden)!r} and `num_classes`="
                f"{num_classes!r} must all be >= 1."
            )
        sizes = [features, *widths, int(num_classes)]
        # Named attributes (not an nn.Sequential) give the readable names fc1, fc2, ...
        self.layer_names: list[str] = []
        for index, (fan_in, fan_out) in enumerate(pairwise(sizes), start=1):
            setattr(self, f"fc{index}", nn.Linear(fan_in, fan_out))
            self.layer_names.append(f"fc{index}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_classes]`` for inputs ``[batch, *input_shape]``."""
        x = x.flatten(1)
        layers = [getattr(self, name) for name in self.layer_names]
        for layer in layers[:-1]:
            x = torch.relu(layer(x))
        return layers[-1](x)
