"""Channel removal: rank channels, choose how many each group keeps, and write the change.

A :class:`ChannelGroup` is a set of coupled channels (found by the backend's dependency graph):
removing channel ``c`` of its root layer removes, in every member layer, the indices that map to
``c`` (its BatchNorm features, the next layer's inputs, every residual branch's outputs). Groups
are plain data, so the math here is torch only and testable without a backend.

One update removes channels so that every group keeps the same share of its *dense* width
(``ceil((1 - ratio) * dense)``, rounded up to ``round_to``), the least important channels first.
The ratio is the smallest that reaches the target: a fraction of the dense model's
multiply-accumulates (``macs``), predicted from each layer's cost, or of its prunable channels
(``channels``). Uniform keeping avoids a global ranking's failure mode of emptying one layer, and
keeps a schedule's updates nested: a channel removed early is never needed back.

``allocation="global"`` instead ranks every group's channels against each other and removes the
least important ones anywhere (Network Slimming's single threshold on |gamma|), so the widths
follow the importances: a layer whose channels the regularizer drove to zero loses more of them.
No group loses more than ``max_group_sparsity`` of its dense width. Scores are made comparable
across groups: ``bn_scale`` as the mean |gamma| over the group's BatchNorms (one penalty acted
on all of them, so their scales are on one footing); weight-based scores, whose size grows with
a layer's fan-in, as a share of their group's mean (a channel scoring 0.2 is a fifth as important
as its group's average one), and a group without a BatchNorm under ``bn_scale`` the same way,
times the mean |gamma| of the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_sparse.core.structure import REMOVE_CHANNELS, LayerCost, layer_costs

__all__ = [
    "ALLOCATIONS",
    "IMPORTANCES",
    "TARGETS",
    "ChannelGroup",
    "ChannelPlan",
    "Member",
    "change_for",
    "channel_scores",
    "check_allocation",
    "comparable_scores",
    "dense_widths",
    "global_keep_counts",
    "global_order",
    "keep_counts",
    "plan_removal",
    "predict_macs",
]

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")
TARGETS = ("macs", "channels")
ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class Member:
    """One layer's share of a group: ``idxs`` of its ``side`` map to the root's ``root_idxs``."""

    layer: str
    side: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels: ``channels`` of the ``root`` layer's outputs and where each one maps."""

    root: str
    channels: int
    members: tuple[Member, ...]

    def layers(self, side: str) -> list[str]:
        """Names of the member layers on ``side`` (``out`` or ``in``)."""
        return [m.layer for m in self.members if m.side == side]


def _per_channel(values: torch.Tensor, side: str, module: nn.Module) -> torch.Tensor | None:
    """Sum of ``values`` (shaped like the layer's weight) per output or input channel."""
    if side == "out":
        return values.reshape(values.shape[0], -1).sum(1)
    if isinstance(module, _ConvNd) and module.groups > 1:
        return None  # depthwise: its input channel is its output channel, counted on that side
    return values.transpose(0, 1).reshape(values.shape[1], -1).sum(1)


def channel_scores(
    model: nn.Module,
    group: ChannelGroup,
    importance: str,
    taylor: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Importance of each of the group's channels (higher is kept), in float64.

    - ``l1`` / ``l2``: sum of ``|w|`` / ``w^2`` over every Conv/Linear weight the channel owns:
      the filters it produces and the next layers' weights that read it;
    - ``bn_scale``: sum of ``|gamma|`` of its BatchNorm features (``l1`` for a group without one);
    - ``taylor``: the same sums over ``taylor[weight name]``, first-order Taylor scores
      ``|w * grad|`` accumulated by the caller (a group without any falls back to ``l1``).

    Raises:
        ValueError: an unknown ``importance``.
    """
    if importance not in IMPORTANCES:
        raise ValueError(
            f"`importance`={importance!r} is not allowed; choose one of {IMPORTANCES}."
        )
    scores = torch.zeros(group.channels, dtype=torch.float64)
    used = False
    for member in group.members:
        module = model.get_submodule(member.layer)
        idx = torch.tensor(member.idxs, dtype=torch.long)
        root = torch.tensor(member.root_idxs, dtype=torch.long)
        if importance == "bn_scale":
            weight = getattr(module, "weight", None)
            if isinstance(module, _BatchNorm) and isinstance(weight, torch.Tensor):
                scores.index_add_(0, root, weight.detach().abs().double().cpu()[idx])
                used = True
            continue
        if not isinstance(module, (nn.Linear, _ConvNd)):
            continue
        if importance == "taylor":
            values = (taylor or {}).get(f"{member.layer}.weight")
            if values is None:
                continue
            values = values.detach().double().cpu()
        else:
            weight = module.weight.detach().double().cpu()
            values = weight.abs() if importance == "l1" else weight.square()
        per_channel = _per_channel(values, member.side, module)
        if per_channel is not None:
            scores.index_add_(0, root, per_channel[idx])
            used = True
    if not used and importance in ("bn_scale", "taylor"):
        return channel_scores(model, group, "l1")
    return scores


def dense_widths(
    groups: Sequence[ChannelGroup], history: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """Each group's root width before any of ``history``'s ``remove_channels`` changes."""
    widths = {g.root: g.channels for g in groups}
    for change in history:
        if change.get("kind") != REMOVE_CHANNELS:
            continue
        for root in widths:
            removed = (change.get("layers") or {}).get(root, {}).get("out") or []
            widths[root] += len(removed)
    return widths


def keep_counts(
    groups: Sequence[ChannelGroup], dense: Mapping[str, int], ratio: float, round_to: int = 1
) -> dict[str, int]:
    """Channels each group keeps at removal ``ratio`` of its dense width (never more than now).

    ``ceil((1 - ratio) * dense)`` rounded up to a multiple of ``round_to``, at least ``round_to``
    (and 1), at most the group's width now.
    """
    counts = {}
    for group in groups:
        keep = math.ceil((1.0 - ratio) * dense[group.root] - 1e-9)
        keep = max(keep, 1)
        if round_to > 1:
            keep = round_to * math.ceil(keep / round_to)
        counts[group.root] = min(keep, group.channels)
    return counts


def _bn_count(model: nn.Module, group: ChannelGroup) -> int:
    """The group's BatchNorms with a scale (what ``bn_scale`` sums over)."""
    modules = [model.get_submodule(m.layer) for m in group.members]
    return sum(
        isinstance(m, _BatchNorm) and isinstance(getattr(m, "weight", None), torch.Tensor)
        for m in modules
    )


def comparable_scores(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    importance: str,
    taylor: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each group's :func:`channel_scores`, on one scale across groups (for a global ranking).

    ``bn_scale``: the mean |gamma| over the group's BatchNorms (a residual group couples several).
    Otherwise, and for a group without a BatchNorm, a channel's share of its group's mean score
    (times the mean |gamma| of the BatchNorm groups under ``bn_scale``): weight norms grow with a
    layer's fan-in, so only their ratios compare across layers.
    """
    scores: dict[str, torch.Tensor] = {}
    relative: list[str] = []
    for group in groups:
        raw = channel_scores(model, group, importance, taylor)
        bns = _bn_count(model, group) if importance == "bn_scale" else 0
        if bns:
            scores[group.root] = raw / bns
        else:
            mean = raw.mean() if raw.numel() else raw.new_tensor(0.0)
            scores[group.root] = raw / mean if mean > 0 else torch.ones_like(raw)
            relative.append(group.root)
    if importance == "bn_scale" and len(relative) < len(groups):
        gammas = torch.cat([s for root, s in scores.items() if root not in relative])
        for root in relative:
            scores[root] = scores[root] * gammas.mean()
    return scores


def global_order(
    groups: Sequence[ChannelGroup],
    dense: Mapping[str, int],
    scores: Mapping[str, torch.Tensor],
    max_group_sparsity: float,
) -> list[str]:
    """The groups' roots, one entry per removable channel, least important channel first.

    Channels are ordered by score (ties by group, then position, as :func:`_lowest` breaks them);
    a group's entries stop when it would keep fewer than ``ceil((1 - max_group_sparsity) *
    dense)`` channels (and 1). The first ``k`` entries say how many channels each group loses
    when ``k`` go: a ranking with ties (an untrained model's equal |gamma|) still removes one
    channel at a time.
    """
    ranked = sorted(
        (float(value), index, position, group.root)
        for index, group in enumerate(groups)
        for position, value in enumerate(scores[group.root].tolist())
    )
    room = {
        g.root: g.channels - max(math.ceil((1.0 - max_group_sparsity) * dense[g.root] - 1e-9), 1)
        for g in groups
    }
    order = []
    for *_, root in ranked:
        if room[root] > 0:
            room[root] -= 1
            order.append(root)
    return order


def global_keep_counts(
    groups: Sequence[ChannelGroup], order: Sequence[str], count: int, round_to: int = 1
) -> dict[str, int]:
    """Channels each group keeps when the first ``count`` of :func:`global_order` go, rounded up
    to a multiple of ``round_to`` (at most the group's width now)."""
    removed: dict[str, int] = {}
    for root in order[:count]:
        removed[root] = removed.get(root, 0) + 1
    counts = {}
    for group in groups:
        keep = group.channels - removed.get(group.root, 0)
        if round_to > 1:
            keep = round_to * math.ceil(keep / round_to)
        counts[group.root] = min(keep, group.channels)
    return counts


def check_allocation(allocation: object, max_group_sparsity: object) -> None:
    """Raise a ValueError naming ``allocation`` or ``max_group_sparsity`` if either is invalid."""
    if allocation not in ALLOCATIONS:
        raise ValueError(
            f"`allocation`={allocation!r} is not allowed; choose one of {ALLOCATIONS}."
        )
    if (
        not isinstance(max_group_sparsity, (int, float))
        or isinstance(max_group_sparsity, bool)
        or not 0.0 <= max_group_sparsity < 1.0
    ):
        raise ValueError(
            f"`max_group_sparsity`={max_group_sparsity!r} is not allowed; it must be in [0, 1) "
            "(the most of one group's channels a global ranking may remove)."
        )


def predict_macs(
    costs: Mapping[str, LayerCost], groups: Sequence[ChannelGroup], keep: Mapping[str, int]
) -> float:
    """Per-sample MACs of the model after each group keeps ``keep[root]`` of its channels.

    A layer's cost is proportional to its output channels and to its input channels per group,
    so it scales by the share each keeps (a depthwise convolution, one input per group, by its
    outputs only). Indices map to root channels in equal numbers (one, or a flattened map's
    positions each), so a share of the root's channels is the same share of the member's indices.
    """
    removed: dict[tuple[str, str], float] = {}
    for group in groups:
        share = 1.0 - keep[group.root] / group.channels
        if share <= 0:
            continue
        for member in group.members:
            if member.layer in costs:
                key = (member.layer, member.side)
                removed[key] = removed.get(key, 0.0) + share * len(member.idxs)
    total = 0.0
    for name, cost in costs.items():
        out = cost.out_channels - removed.get((name, "out"), 0.0)
        depthwise = cost.groups > 1 and cost.groups == cost.in_channels == cost.out_channels
        if depthwise:
            total += cost.macs * out / cost.out_channels
            continue
        in_ = cost.in_channels - removed.get((name, "in"), 0.0)
        total += cost.macs * (out / cost.out_channels) * (in_ / cost.in_channels)
    return total


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    # A stable sort breaks ties by position, so equal weights give the same choice anywhere.
    return sorted(torch.sort(scores, stable=True).indices[:count].tolist()) if count > 0 else []


def change_for(
    groups: Sequence[ChannelGroup], removed: Mapping[str, Sequence[int]]
) -> dict[str, Any]:
    """The ``remove_channels`` change that removes ``removed[root]`` (root channels) per group."""
    layers: dict[str, dict[str, set[int]]] = {}
    for group in groups:
        gone = set(removed.get(group.root, ()))
        if not gone:
            continue
        for member in group.members:
            idxs = {i for i, r in zip(member.idxs, member.root_idxs, strict=True) if r in gone}
            if idxs:
                layers.setdefault(member.layer, {}).setdefault(member.side, set()).update(idxs)
    return {
        "kind": REMOVE_CHANNELS,
        "layers": {
            name: {side: sorted(idxs) for side, idxs in sides.items()}
            for name, sides in layers.items()
        },
    }


@dataclass(frozen=True)
class ChannelPlan:
    """One update's decision: the change to apply and what it is predicted to reach."""

    change: dict[str, Any]
    ratio: float
    keep: dict[str, int]
    macs_before: int
    macs_after: float
    channels_dense: int
    channels_after: int
    reached: bool


def plan_removal(
    model: nn.Module,
    example: torch.Tensor,
    groups: Sequence[ChannelGroup],
    *,
    sparsity: float,
    target: str,
    importance: str,
    dense_macs: int,
    history: Sequence[Mapping[str, Any]] = (),
    round_to: int = 1,
    taylor: Mapping[str, torch.Tensor] | None = None,
    allocation: str = "uniform",
    max_group_sparsity: float = 0.9,
) -> ChannelPlan:
    """Which channels to remove now so that ``sparsity`` of the dense ``target`` is gone.

    Args:
        model: the model as it is now (a copy is fine: weights are only read); a forward pass of
            ``example`` in eval mode measures its layers' costs.
        example: an input batch.
        groups: its coupled channel groups (from the backend, on the same model).
        sparsity: fraction of the dense model's MACs (``target="macs"``) or of its groups'
            channels (``"channels"``) removed after this update.
        target: ``macs`` or ``channels``.
        importance: see :func:`channel_scores`.
        dense_macs: the dense model's per-sample MACs (measured before the first removal).
        history: the structure changes applied so far (for each group's dense width).
        round_to: keep channel counts multiple of this.
        taylor: accumulated ``|w * grad|`` by weight name, for ``importance="taylor"``.
        allocation: ``uniform`` (every group keeps the same share of its dense width) or
            ``global`` (the lowest :func:`comparable_scores` go wherever they are).
        max_group_sparsity: with ``global``, the most of a group's dense width that may go.

    Returns:
        The plan; ``reached`` is False when even keeping the fewest channels allowed per group
        (``round_to``; with ``global``, ``1 - max_group_sparsity`` of each) would not reach the
        target (then it keeps that few). ``ratio``: the share of each group's dense width gone
        (``uniform``), of all the groups' dense channels (``global``).

    Raises:
        ValueError: an unknown ``allocation``, or ``max_group_sparsity`` outside [0, 1).
    """
    check_allocation(allocation, max_group_sparsity)
    costs = layer_costs(model, example)
    dense = dense_widths(groups, history)
    channels_dense = sum(dense.values())
    goal = (1.0 - sparsity) * (dense_macs if target == "macs" else channels_dense)

    def reaches(keep: Mapping[str, int]) -> bool:
        left = predict_macs(costs, groups, keep) if target == "macs" else sum(keep.values())
        return left <= goal + 1e-6

    if allocation == "global":
        scores = comparable_scores(model, groups, importance, taylor)
        order = global_order(groups, dense, scores, max_group_sparsity)
        reached = reaches(global_keep_counts(groups, order, len(order), round_to))
        # What remains only falls as more of the order goes: bisect for the fewest channels
        # that reach the goal (all of the order, each group at its floor, if none does).
        low, high = 0, len(order)
        while reached and low < high:
            middle = (low + high) // 2
            if reaches(global_keep_counts(groups, order, middle, round_to)):
                high = middle
            else:
                low = middle + 1
        keep = global_keep_counts(groups, order, high, round_to)
        ratio = 1.0 - sum(keep.values()) / channels_dense if channels_dense else 0.0
    else:
        scores = {g.root: channel_scores(model, g, importance, taylor) for g in groups}
        ratio, reached = 1.0, reaches(keep_counts(groups, dense, 1.0, round_to))
        if reached and not reaches(keep_counts(groups, dense, 0.0, round_to)):
            # The smallest ratio that reaches the goal; keep counts are steps, so 40 halvings
            # find the step's edge far below one channel.
            short = 0.0  # a ratio that falls short of the goal
            for _ in range(40):
                between = (short + ratio) / 2
                if reaches(keep_counts(groups, dense, between, round_to)):
                    ratio = between
                else:
                    short = between
        elif reached:
            ratio = 0.0
        keep = keep_counts(groups, dense, ratio, round_to)
    removed = {
        group.root: _lowest(scores[group.root], group.channels - keep[group.root])
        for group in groups
    }
    return ChannelPlan(
        change=change_for(groups, removed),
        ratio=ratio,
        keep=keep,
        macs_before=sum(cost.macs for cost in costs.values()),
        macs_after=predict_macs(costs, groups, keep),
        channels_dense=channels_dense,
        channels_after=sum(keep.values()),
        reached=reached,
    )
