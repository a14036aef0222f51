"""Which weights matter: pruning scores from the weights alone or from calibration activations.

- ``magnitude``: ``|W|``.
- ``wanda`` (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): ``|W_ij| * ||X_j||``, the weight's magnitude times the root mean square of the input
  it multiplies, gathered by forward hooks over calibration batches. A weight on an input that is
  usually near zero contributes little to the output, however large it is. For a Conv the input
  of weight ``W[o, c, i, j]`` is the pixel of channel ``c`` at kernel offset ``(i, j)`` of every
  receptive field, so the norm is taken per ``(channel, offset)`` (stride, padding, dilation and
  groups as the layer applies them).

Scores are non-negative tensors shaped like their weights. :func:`criterion_masks` turns them into
keep-masks with the structures of :mod:`lightning_sparse.masks` (per layer or global,
unstructured, N:M, blocks, channels): the mask math ranks ``|tensor|``, and ``|score| == score``,
so the same code that ranks magnitudes ranks these scores. Input norms are root *mean* squares
(not sums), so global ranking does not favour layers that see more positions per sample.

Pure torch: no Lightning, usable on any ``nn.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.core.batch import model_inputs, to_device
from lightning_sparse.core.layers import Layout, kind_of, type_name
from lightning_sparse.core.masks import MaskType, compute_masks

__all__ = [
    "CRITERIA",
    "criterion_masks",
    "criterion_scores",
    "input_rms",
    "needs_calibration",
]

CRITERIA = ("magnitude", "wanda")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def needs_calibration(criterion: str) -> bool:
    """Whether ``criterion`` reads calibration activations."""
    return criterion == "wanda"


class _SquareSums:
    """Running sum of squared inputs per input element of one layer's weight, and their count."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, sums: torch.Tensor, count: int) -> None:
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += count


def _linear_square_sums(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.detach().reshape(-1, x.shape[-1]).double()
    return flat.square().sum(dim=0), flat.shape[0]


def _conv_square_sums(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over samples and output positions of ``x**2`` at each ``(channel, kernel offset)``.

    A depthwise conv of ``x**2`` with one one-hot kernel per offset picks, for every output
    position, exactly the input element that offset's weight multiplies (same stride, padding,
    dilation), so summing its output gives the per-element sums the Wanda norm needs.
    """
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    x = x.detach().double()
    dims = x.dim() - 2
    padding: Any = layer.padding
    if layer.padding_mode != "zeros":
        # Non-zero padding modes pad explicitly before a padding-free conv, as nn.Conv does.
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    channels, kernel = x.shape[1], tuple(layer.kernel_size)
    offsets = math.prod(kernel)
    one_hot = torch.eye(offsets, dtype=x.dtype, device=x.device).reshape(offsets, 1, *kernel)
    one_hot = one_hot.repeat(channels, *([1] * (dims + 1)))
    picked = _CONV[dims](
        x.square(),
        one_hot,
        stride=layer.stride,
        padding=padding,
        dilation=layer.dilation,
        groups=channels,
    )
    sums = picked.transpose(0, 1).reshape(channels * offsets, -1).sum(dim=1)
    count = picked.shape[0] * math.prod(picked.shape[2:])
    return sums.reshape(channels, *kernel), count


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _expand_to_weight(layer: nn.Module, weight: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """Per-input-element norms broadcast to the weight's shape.

    Conv: ``[out, in / groups, *kernel]``; other kinds: along the kind's input dimension.
    """
    if not isinstance(layer, _CONV_TYPES):
        kind = kind_of(layer)
        input_dim = kind.input_dim if kind is not None else 1
        shape = [1] * weight.dim()
        shape[input_dim] = -1
        return rms.reshape(shape).expand_as(weight)
    groups = int(getattr(layer, "groups", 1))
    per_group = rms.reshape(groups, rms.shape[0] // groups, *rms.shape[1:])
    return per_group.repeat_interleave(weight.shape[0] // groups, dim=0)


def input_rms(
    model: nn.Module, names: Iterable[str], batches: Iterable[Any], max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Root mean square of the input each weight element multiplies, over calibration batches.

    The model runs in eval mode under ``torch.no_grad`` (its training flag is restored after), on
    the device of its first parameter; forward hooks on the layers owning ``names`` record their
    inputs.

    Args:
        model: the model; called as ``model(inputs)``.
        names: weights (as in ``model.named_parameters()``) of layers of a known kind (Conv,
            Linear, Conv1D, registered types) whose input is a float tensor.
        batches: calibration batches; the model input of each is
            :func:`~lightning_sparse.core.batch.model_inputs`.
        max_batches: use at most this many batches (None: all).

    Returns:
        ``{name: tensor shaped like the weight}``, in float32 on the weight's device.

    Raises:
        ValueError: no batch was seen (an empty calibration set), a layer never ran, or a
            layer's input is not float features (an embedding's token ids).
    """
    names = list(names)
    params = dict(model.named_parameters())
    layers = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in names}
    sums = {name: _SquareSums() for name in names}

    def hook_for(name: str) -> Any:
        layer = layers[name]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if isinstance(layer, _CONV_TYPES):
                sums[name].add(*_conv_square_sums(layer, x))
                return
            kind = kind_of(layer)
            weight = params[name]
            features = weight.shape[kind.input_dim] if kind is not None else None
            if (
                not isinstance(x, torch.Tensor)
                or not x.is_floating_point()
                or x.shape[-1] != features
            ):
                got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x)
                raise ValueError(
                    f"`{name}` ({type_name(type(layer))}): Wanda needs the float features the "
                    f"weight multiplies ({features} in the last dimension), but the layer got "
                    f"{got} (an embedding's token ids?); leave it out of `params`."
                )
            sums[name].add(*_linear_square_sums(x))

        return hook

    handles = [layers[name].register_forward_pre_hook(hook_for(name)) for name in names]
    was_training = model.training
    device = next(model.parameters()).device
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                model(to_device(model_inputs(batch), device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError(
            "The calibration set is empty: the data gave no batch, and a data-aware criterion "
            "needs at least one. Give training data with samples (or more `calibration_batches`)."
        )
    result = {}
    for name in names:
        entry = sums[name]
        if entry.sums is None or entry.count == 0:
            raise ValueError(
                f"`{name}` got no input from {seen} calibration batches: its layer never ran in "
                "the model's forward; leave it out of `params`."
            )
        rms = (entry.sums / entry.count).sqrt()
        result[name] = _expand_to_weight(layers[name], params[name], rms).to(
            params[name].device, torch.float32
        )
    return result


def criterion_scores(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    criterion: str,
    batches: Iterable[Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Importance scores (higher = keep) of ``params`` by ``criterion``.

    Args:
        model: the model the weights belong to (run on ``batches`` for ``wanda``).
        params: ``{name: weight}`` as in ``model.named_parameters()``.
        criterion: one of :data:`CRITERIA`.
        batches: calibration batches (``wanda`` only).
        max_batches: use at most this many calibration batches.

    Raises:
        ValueError: unknown ``criterion``; ``wanda`` without batches or with an empty set.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"`criterion`={criterion!r} is not allowed; choose one of {CRITERIA}.")
    magnitudes = {name: weight.detach().abs().float() for name, weight in params.items()}
    if not needs_calibration(criterion):
        return magnitudes
    if batches is None:
        raise ValueError(f"`criterion`={criterion!r} needs calibration batches; none were given.")
    norms = input_rms(model, params, batches, max_batches)
    return {name: magnitudes[name] * norms[name] for name in params}


def criterion_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    mask_type: MaskType,
    global_sparsity: bool = False,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the lowest-scored weights (groups) to ``sparsity`` fraction of zeros.

    Exactly :func:`lightning_sparse.masks.compute_masks` with scores in place of the weights: it
    ranks ``|tensor|`` by group, and scores are non-negative.
    """
    negative = [name for name, score in scores.items() if bool((score < 0).any())]
    if negative:
        raise ValueError(f"Scores must be non-negative; {negative[0]!r} has negative entries.")
    return compute_masks(scores, sparsity, mask_type, global_sparsity, layouts)
