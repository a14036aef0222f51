"""Mask math for each pruning structure; pure tensor code, no Lightning.

A mask is a bool tensor shaped like its weight: ``True`` keeps the weight, ``False`` prunes it.
Scores are weight magnitudes. Every structure works on groups of weights:

- ``unstructured``: each weight is its own group;
- ``blockB`` (e.g. ``block4``): ``B`` consecutive weights along the input dimension;
- ``channel``: one output channel (a row of a Linear weight, a filter of a Conv);
- ``N:M`` (e.g. ``2:4``): in every ``M`` consecutive weights along the input dimension at most
  ``M-N`` are pruned; at sparsity ``1 - N/M`` exactly ``N`` of each ``M`` remain, the pattern
  sparse tensor cores run. Below that sparsity the smallest of each group's ``M-N`` candidates
  go first.

Which dimension is the input and which the output comes from the layer's kind
(:mod:`lightning_sparse.core.layers`), passed in as ``layouts``: ``[out, in]`` for Linear (the
default), ``[in, out]`` for Hugging Face's Conv1D. For Conv weights the input dimension is the
channel dimension (dim 1), grouped at each kernel position, which is how channels-last implicit
GEMM lays out the reduction dimension.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lightning_sparse.core.layers import Layout

__all__ = ["MaskType", "compute_masks", "mask_sparsity", "parse_mask_type"]

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block(\d+)$")
ALLOWED_MASK_TYPES = "'unstructured', 'channel', 'blockB' (e.g. 'block4') or 'N:M' (e.g. '2:4')"


@dataclass(frozen=True)
class MaskType:
    """A parsed ``mask_type``: ``kind`` is unstructured, block, channel or nm."""

    kind: str
    n: int = 1
    m: int = 1

    @property
    def max_sparsity(self) -> float:
        """Largest sparsity the structure can express (N:M is capped at 1 - N/M)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else 1.0

    @property
    def group_size_along_input(self) -> int:
        """How many consecutive input-dimension weights form a group (1 if none)."""
        return self.m if self.kind in ("nm", "block") else 1

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.m}"
        return self.kind


def parse_mask_type(mask_type: str, field: str = "mask_type") -> MaskType:
    """Parse ``mask_type``; raise ``ValueError`` naming ``field`` and the allowed forms."""
    text = str(mask_type).strip()
    if text in ("unstructured", "channel"):
        return MaskType(text)
    if match := _NM.match(text):
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"`{field}`={mask_type!r}: N:M needs 0 < N < M.")
        return MaskType("nm", n, m)
    if match := _BLOCK.match(text):
        size = int(match.group(1))
        if size < 2:
            raise ValueError(f"`{field}`={mask_type!r}: a block needs at least 2 weights.")
        return MaskType("block", 1, size)
    raise ValueError(f"`{field}`={mask_type!r} is not a mask type; allowed: {ALLOWED_MASK_TYPES}.")


_DEFAULT_LAYOUT = Layout()


def check_compatible(
    name: str, shape: torch.Size, mask_type: MaskType, layout: Layout = _DEFAULT_LAYOUT
) -> None:
    """Raise ``ValueError`` when ``mask_type``'s groups do not tile the weight ``name``."""
    size = mask_type.group_size_along_input
    if size == 1:
        return
    dim = layout.input_dim
    if len(shape) < 2 or len(shape) <= dim or shape[dim] % size:
        in_dim = shape[dim] if len(shape) > dim else "none"
        raise ValueError(
            f"`mask_type`={str(mask_type)!r} groups {size} weights along the input dimension, "
            f"but `{name}` has input dimension {in_dim} (shape {list(shape)}), not divisible by "
            f"{size}. Leave it out through `params`."
        )


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """View with the input dimension last: [out, in, *k] -> [out, *k, in]."""
    if weight.dim() <= 2:
        return weight
    return weight.permute(0, *range(2, weight.dim()), 1)


def _input_last_inverse(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() <= 2:
        return tensor.reshape(like.shape)
    permuted_shape = _input_last(like).shape
    inverse = (0, like.dim() - 1, *range(1, like.dim() - 1))
    return tensor.reshape(permuted_shape).permute(*inverse).contiguous()


def _groups(weight: torch.Tensor, mask_type: MaskType) -> torch.Tensor:
    """Magnitudes arranged as [groups, group_size]."""
    magnitude = weight.detach().abs().float()
    if mask_type.kind == "channel":
        return magnitude.reshape(weight.shape[0], -1)
    return _input_last(magnitude).reshape(-1, mask_type.group_size_along_input)


def _ungroup(keep: torch.Tensor, weight: torch.Tensor, mask_type: MaskType) -> torch.Tensor:
    if mask_type.kind == "channel":
        return keep.reshape(weight.shape)
    return _input_last_inverse(keep, weight)


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool keep-mask over ``scores`` (1-D) that prunes exactly the ``count`` lowest."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        # A stable sort breaks ties by position, so the same weights give the same mask anywhere.
        order = torch.sort(scores, stable=True).indices
        keep[order[:count]] = False
    return keep


def _grouped_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, mask_type: MaskType, global_: bool
) -> dict[str, torch.Tensor]:
    grouped = {name: _groups(w, mask_type) for name, w in weights.items()}
    # A group's score is its mean magnitude, so groups of different sizes compare fairly.
    scores = {name: g.mean(dim=1) for name, g in grouped.items()}
    if global_:
        all_scores = torch.cat([s for s in scores.values()])
        sizes = torch.cat([torch.full_like(scores[n], grouped[n].shape[1]) for n in scores])
        total = sum(w.numel() for w in weights.values())
        order = torch.sort(all_scores, stable=True).indices
        # Prune the lowest groups until the pruned weights reach the target count.
        cumulative = torch.cumsum(sizes[order], dim=0)
        target = round(sparsity * total)
        count = int((cumulative <= target).sum().item())
        keep_all = torch.ones_like(all_scores, dtype=torch.bool)
        keep_all[order[:count]] = False
        split = torch.split(keep_all, [len(s) for s in scores.values()])
        keeps = dict(zip(scores, split, strict=True))
    else:
        keeps = {name: _prune_lowest(s, round(sparsity * len(s))) for name, s in scores.items()}
    return {
        name: _ungroup(
            keeps[name].unsqueeze(1).expand_as(grouped[name]), weights[name], mask_type
        ).to(weights[name].device)
        for name in weights
    }


def _nm_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, mask_type: MaskType, global_: bool
) -> dict[str, torch.Tensor]:
    prunable_per_group = mask_type.m - mask_type.n
    candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, weight in weights.items():
        grouped = _groups(weight, mask_type)
        # Within each group only the M-N smallest may be pruned; they are this layer's candidates.
        low = torch.sort(grouped, dim=1, stable=True).indices[:, :prunable_per_group]
        candidates[name] = (grouped, low)

    def flat_candidates(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        grouped, low = candidates[name]
        flat_index = (low + torch.arange(len(grouped)).unsqueeze(1) * mask_type.m).reshape(-1)
        return grouped.reshape(-1)[flat_index], flat_index

    def build(name: str, pruned_flat: torch.Tensor) -> torch.Tensor:
        grouped, _ = candidates[name]
        keep = torch.ones(grouped.numel(), dtype=torch.bool)
        keep[pruned_flat] = False
        return _ungroup(keep.reshape(grouped.shape), weights[name], mask_type).to(
            weights[name].device
        )

    if global_:
        pairs = {name: flat_candidates(name) for name in weights}
        all_scores = torch.cat([p[0] for p in pairs.values()])
        total = sum(w.numel() for w in weights.values())
        chosen = ~_prune_lowest(all_scores, min(round(sparsity * total), len(all_scores)))
        split = torch.split(chosen, [len(p[0]) for p in pairs.values()])
        return {
            name: build(name, pairs[name][1][sel]) for name, sel in zip(pairs, split, strict=True)
        }
    masks = {}
    for name, weight in weights.items():
        scores, flat_index = flat_candidates(name)
        count = min(round(sparsity * weight.numel()), len(scores))
        masks[name] = build(name, flat_index[~_prune_lowest(scores, count)])
    return masks


def _canonical(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The weight viewed as ``[out, in, *rest]``."""
    if layout == _DEFAULT_LAYOUT:
        return weight
    return weight.movedim((layout.output_dim, layout.input_dim), (0, 1))


def _from_canonical(mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout == _DEFAULT_LAYOUT:
        return mask
    return mask.movedim((0, 1), (layout.output_dim, layout.input_dim)).contiguous()


def compute_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    mask_type: MaskType,
    global_sparsity: bool = False,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks that prune the lowest-magnitude groups to ``sparsity`` (fraction of zeros).

    Per layer (``global_sparsity=False``) every weight gets ``sparsity`` within one group;
    globally, one threshold over all weights reaches ``sparsity`` of their total.

    Args:
        weights: ``{name: weight}`` (or scores shaped like the weights).
        sparsity: fraction of zeros.
        mask_type: the structure.
        global_sparsity: one threshold over all weights.
        layouts: each weight's input/output dimensions (:func:`lightning_sparse.core.targets.
            weight_layouts`); a weight missing here is ``[out, in, ...]``.
    """
    if not weights:
        return {}
    layouts = layouts or {}
    for name, weight in weights.items():
        check_compatible(name, weight.shape, mask_type, layouts.get(name, _DEFAULT_LAYOUT))
    sparsity = min(max(float(sparsity), 0.0), mask_type.max_sparsity)
    canonical = {
        name: _canonical(weight, layouts.get(name, _DEFAULT_LAYOUT))
        for name, weight in weights.items()
    }
    if mask_type.kind == "nm":
        masks = _nm_masks(canonical, sparsity, mask_type, global_sparsity)
    else:
        masks = _grouped_masks(canonical, sparsity, mask_type, global_sparsity)
    return {
        name: _from_canonical(mask, layouts.get(name, _DEFAULT_LAYOUT))
        for name, mask in masks.items()
    }


def mask_sparsity(tensor: torch.Tensor) -> float:
    """Fraction of zeros in a weight (or of ``False`` in a keep-mask)."""
    if tensor.numel() == 0:
        return 0.0
    if tensor.dtype == torch.bool:
        return 1.0 - tensor.sum().item() / tensor.numel()
    return (tensor == 0).sum().item() / tensor.numel()
