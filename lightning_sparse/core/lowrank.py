"""Low-rank factorization of Linear and Conv2d layers by truncated SVD.

A weight seen as a matrix ``W`` (``[out, fan_in]``, where ``fan_in`` is ``in * kh * kw`` for a
convolution) becomes ``(U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``: a layer to ``r`` features followed by
a layer from ``r`` to ``out``. Splitting ``sqrt(S)`` over both factors keeps their scales equal,
which fine-tuning with one learning rate and weight decay for both prefers over putting ``S`` in
one of them. A convolution becomes a ``kh x kw`` convolution to ``r`` channels (the original
stride, padding and dilation) and a ``1 x 1`` convolution to ``out`` channels carrying the bias.

Both factors run at the output's spatial size, so for Linear and Conv2d alike a layer costs
``out * fan_in`` multiply-accumulates per output position before and ``r * (fan_in + out)``
after: factorizing pays only when ``r * (fan_in + out) < fan_in * out``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "factorize_conv2d",
    "factorize_linear",
    "layer_dims",
    "macs_saving",
    "rank_for_energy",
    "rank_for_ratio",
    "replace_module",
    "singular_values",
    "worth_factorizing",
]


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(fan_in, out)`` of the matrix a Linear or Conv2d weight factorizes as.

    Raises:
        TypeError: For any other module.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        kernel_h, kernel_w = module.kernel_size
        return module.in_channels // module.groups * kernel_h * kernel_w, module.out_channels
    raise TypeError(f"Only nn.Linear and nn.Conv2d factorize; got {type(module).__name__}.")


def singular_values(module: nn.Linear | nn.Conv2d) -> Tensor:
    """Descending singular values of the layer's weight as a ``[out, fan_in]`` matrix."""
    return torch.linalg.svdvals(_matrix(module).to(torch.float64))


def factorize_linear(linear: nn.Linear, rank: int, name: str = "") -> nn.Sequential:
    """Replace ``linear`` by ``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``.

    Args:
        linear: The layer; it is not modified.
        rank: Kept singular values, ``1 <= rank <= min(in, out)``. Full rank reproduces the
            layer's output up to floating-point error.
        name: The layer's dotted name, used in error messages.

    Returns:
        ``nn.Sequential(first, second)``; ``second`` has a bias exactly when ``linear`` has,
        and both factors have ``linear``'s dtype and device.

    Raises:
        ValueError: When ``rank`` is out of range.
    """
    first_weight, second_weight = _factors(linear, rank, name)
    # Built on the meta device: their random init would be overwritten at once.
    first = nn.Linear(linear.in_features, rank, bias=False, device="meta")
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, device="meta")
    _load(first, first_weight)
    _load(second, second_weight, linear.bias)
    return nn.Sequential(first, second)


def factorize_conv2d(conv: nn.Conv2d, rank: int, name: str = "") -> nn.Sequential:
    """Replace ``conv`` by a ``kh x kw`` conv to ``rank`` channels then a ``1 x 1`` conv.

    Args:
        conv: The layer (``groups == 1``); it is not modified.
        rank: Kept singular values, ``1 <= rank <= min(out, in * kh * kw)``.
        name: The layer's dotted name, used in error messages.

    Returns:
        ``nn.Sequential(spatial, pointwise)``: ``spatial`` has ``conv``'s kernel, stride,
        padding, dilation and padding mode and no bias; ``pointwise`` carries the bias.

    Raises:
        ValueError: When ``conv`` is grouped (its channels do not form one matrix; a grouped
            conv is already a block-diagonal factorization) or ``rank`` is out of range.
    """
    if conv.groups != 1:
        raise ValueError(
            f"Cannot factorize {name or 'the Conv2d'}: groups={conv.groups}; low-rank "
            f"factorization supports groups=1 only. Leave the layer out of the targets."
        )
    first_weight, second_weight = _factors(conv, rank, name)
    spatial = nn.Conv2d(
        conv.in_channels,
        rank,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        padding_mode=conv.padding_mode,
        bias=False,
        device="meta",
    )
    pointwise = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, device="meta")
    _load(spatial, first_weight.reshape(spatial.weight.shape))
    _load(pointwise, second_weight.reshape(pointwise.weight.shape), conv.bias)
    return nn.Sequential(spatial, pointwise)


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of the sum of squares.

    Args:
        singular_values: Descending singular values (:func:`singular_values`).
        energy: Kept fraction of ``sum(s**2)``, in ``(0, 1]``.

    Raises:
        ValueError: When ``energy`` is outside ``(0, 1]`` or there is no singular value.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy`={energy!r} must be in (0, 1].")
    if singular_values.numel() == 0:
        raise ValueError("`singular_values` is empty.")
    squares = singular_values.detach().to(torch.float64) ** 2
    cumulative = torch.cumsum(squares, dim=0)
    if cumulative[-1] <= 0:
        return 1
    # Dividing by the last prefix sum (not a separate total) makes the full rank exactly 1.0.
    kept = cumulative / cumulative[-1]
    return int(torch.searchsorted(kept, torch.tensor([energy], dtype=kept.dtype)).item()) + 1


def rank_for_ratio(shape: torch.Size | tuple[int, ...], ratio: float) -> int:
    """Rank keeping ``ratio`` of a weight's full rank ``min(out, fan_in)``, at least 1.

    Args:
        shape: The weight's shape: ``(out, in)`` or ``(out, in, kh, kw)``.
        ratio: Kept fraction of the full rank, in ``(0, 1]``; rounded up.

    Raises:
        ValueError: When ``ratio`` is outside ``(0, 1]`` or ``shape`` has fewer than 2 dims.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio`={ratio!r} must be in (0, 1].")
    if len(shape) < 2:
        raise ValueError(f"`shape`={tuple(shape)} is not a weight matrix or conv kernel.")
    full = min(shape[0], math.prod(shape[1:]))
    # The small epsilon keeps ratio * full = 3.0000000000000004 from rounding up to 4.
    return max(1, min(full, math.ceil(ratio * full - 1e-9)))


def macs_saving(fan_in: int, out: int, rank: int) -> float:
    """Fraction of multiply-accumulates (and weights) saved by factorizing at ``rank``.

    Negative when the factorized layer is the more expensive one.
    """
    return 1.0 - rank * (fan_in + out) / (fan_in * out)


def worth_factorizing(fan_in: int, out: int, rank: int) -> bool:
    """Whether two factors of ``rank`` are cheaper than the layer: ``r(in + out) < in * out``."""
    return rank * (fan_in + out) < fan_in * out


def replace_module(root: nn.Module, dotted_name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` at ``dotted_name`` inside ``root`` and return the module it replaced.

    Works through ``nn.Sequential`` and ``nn.ModuleList`` indices (``"features.3"``).

    Raises:
        ValueError: When ``dotted_name`` is empty (the root cannot replace itself) or names no
            submodule of ``root``.
    """
    if not dotted_name:
        raise ValueError("`dotted_name` is empty: replace_module cannot replace the root.")
    parent_name, _, child_name = dotted_name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError as error:
        raise ValueError(f"No module {dotted_name!r} in {type(root).__name__}.") from error
    old = parent._modules.get(child_name)
    if old is None:
        raise ValueError(f"No module {dotted_name!r} in {type(root).__name__}.")
    parent._modules[child_name] = new_module
    return old


def _matrix(module: nn.Linear | nn.Conv2d) -> Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def _factors(module: nn.Linear | nn.Conv2d, rank: int, name: str) -> tuple[Tensor, Tensor]:
    """``(sqrt(S_r) V_r^T, U_r sqrt(S_r))`` of the layer's matrix, in its dtype."""
    matrix = _matrix(module)
    full = min(matrix.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(
            f"`rank`={rank!r} for {name or type(module).__name__} "
            f"{tuple(module.weight.shape)} must be an integer in [1, {full}]."
        )
    # float64 SVD: a full-rank factorization then matches the layer to float32 rounding.
    left, values, right_t = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    root = values[:rank].sqrt()
    first = root[:, None] * right_t[:rank]
    second = left[:, :rank] * root[None, :]
    return first.to(matrix.dtype), second.to(matrix.dtype)


def _load(layer: nn.Linear | nn.Conv2d, weight: Tensor, bias: Tensor | None = None) -> None:
    """Give a meta-device layer real parameters (the factor's dtype and device)."""
    layer.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
