"""Sparsity-inducing penalties and their strength schedule; pure tensor code, no Lightning.

Three penalties, each a sum over a layer's groups (the raw sums of the papers, so their
strengths carry over):

- ``l1``: ``sum |w|`` over a weight (each weight its own group);
- ``group_lasso``: ``sum_g sqrt(|g|) * ||w_g||_2`` (Structured Sparsity Learning, Wen et al. 2016:
  the ``sqrt`` of the group size keeps large and small groups on one scale), the groups being
  whole output channels (a row of a Linear weight, a filter of a Conv) or the ``M`` consecutive
  input-dimension weights an ``N:M`` mask works on (for Conv at each kernel position, as in
  :mod:`lightning_sparse.core.masks`), which it drives to zero together;
- ``bn_scale``: ``sum |gamma|`` over BatchNorm scales (Network Slimming, Liu et al. 2017): a channel
  whose scale reaches zero contributes nothing after its BatchNorm.

A group counts as "below ``threshold``" when its root mean square ``||w_g||_2 / sqrt(|g|)`` is
(for single weights: ``|w|``), which does not depend on the group's size.

The strength follows the fractional-epoch clock: zero before ``start_epoch``, a linear ramp from 0
to 1 over ``ramp_epochs``, held at 1, and zero again from ``end_epoch``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from lightning_sparse.core.masks import MaskType, parse_mask_type
from lightning_sparse.core.targets import ALL_PRUNABLE, resolve_params

__all__ = [
    "BN_TYPES",
    "PENALTIES",
    "bn_scale_parameters",
    "fraction_below",
    "group_rms",
    "parse_groups",
    "penalty",
    "penalty_reach",
    "resolve_penalty_params",
    "strength_factor",
    "weight_groups",
]

PENALTIES = ("l1", "group_lasso", "bn_scale")
BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
# Tolerance for comparing fractional epochs: far below one optimizer step.
_EPS = 1e-9


def parse_groups(groups: str, field: str = "groups") -> MaskType:
    """``channel`` or ``N:M`` (also ``blockB``): the groups of ``group_lasso``.

    Raises:
        ValueError: anything else; names ``field`` and the allowed values.
    """
    allowed = "'channel', 'N:M' (e.g. '2:4', groups of M along the input) or 'blockB'"
    try:
        structure = parse_mask_type(str(groups), field)
    except ValueError:
        raise ValueError(f"`{field}`={groups!r} is not allowed; choose {allowed}.") from None
    if structure.kind == "unstructured":
        raise ValueError(
            f"`{field}`={groups!r} is not allowed for group_lasso (single weights are `l1`'s); "
            f"choose {allowed}."
        )
    return structure


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, *k] -> [out, *k, in], so that input-dimension groups are contiguous."""
    if weight.dim() <= 2:
        return weight
    return weight.permute(0, *range(2, weight.dim()), 1)


def weight_groups(weight: torch.Tensor, structure: MaskType | None) -> torch.Tensor:
    """``weight`` as ``[groups, group_size]`` (differentiable); ``None``: one weight a group."""
    if structure is None:
        return weight.reshape(-1, 1)
    if structure.kind == "channel":
        return weight.reshape(weight.shape[0], -1)
    return _input_last(weight).reshape(-1, structure.group_size_along_input)


def penalty(weight: torch.Tensor, kind: str, structure: MaskType | None = None) -> torch.Tensor:
    """The penalty of one weight (see the module docstring), a differentiable scalar.

    Args:
        weight: a Conv/Linear weight (``l1``, ``group_lasso``) or a BatchNorm scale (``bn_scale``).
        kind: one of :data:`PENALTIES`.
        structure: the groups of ``group_lasso`` (:func:`parse_groups`).
    """
    if kind in ("l1", "bn_scale"):
        return weight.abs().sum()
    if kind != "group_lasso" or structure is None:
        raise ValueError(f"penalty {kind!r} with groups {structure}; allowed: {PENALTIES}.")
    groups = weight_groups(weight, structure)
    # vector_norm's gradient at an all-zero group is 0 (a subgradient), not NaN.
    return math.sqrt(groups.shape[1]) * torch.linalg.vector_norm(groups, dim=1).sum()


def group_rms(weight: torch.Tensor, kind: str, structure: MaskType | None = None) -> torch.Tensor:
    """Root mean square of each group the penalty acts on (``|w|`` for single weights)."""
    groups = weight_groups(weight.detach().float(), structure if kind == "group_lasso" else None)
    return torch.linalg.vector_norm(groups, dim=1) / math.sqrt(groups.shape[1])


def fraction_below(
    weight: torch.Tensor, kind: str, structure: MaskType | None, threshold: float
) -> float:
    """Share of the penalty's groups whose root mean square is below ``threshold``."""
    rms = group_rms(weight, kind, structure)
    return float((rms < threshold).float().mean().item()) if rms.numel() else 0.0


def strength_factor(
    epoch: float, start_epoch: float, end_epoch: float | None, ramp_epochs: float
) -> float:
    """The share of the full strength at fractional ``epoch``, in [0, 1].

    0 before ``start_epoch`` and from ``end_epoch`` on; in between a linear ramp from 0 at
    ``start_epoch`` to 1 at ``start_epoch + ramp_epochs``, then 1.
    """
    if epoch < start_epoch - _EPS or (end_epoch is not None and epoch >= end_epoch - _EPS):
        return 0.0
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, (epoch - start_epoch) / ramp_epochs))


def bn_scale_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The scales (``weight``) of every affine BatchNorm in ``model``, by parameter name."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, BN_TYPES) and isinstance(weight, nn.Parameter):
            found[f"{module_name}.weight" if module_name else "weight"] = weight
    return found


def _resolve_bn(model: nn.Module, params: Sequence[str], field: str) -> dict[str, nn.Parameter]:
    candidates = bn_scale_parameters(model)
    chosen: dict[str, nn.Parameter] = {}
    for entry in params:
        if entry == ALL_PRUNABLE:
            matches = list(candidates)
        elif entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as err:
                raise ValueError(f"`{field}` entry {entry!r} is not a valid regex: {err}.") from err
            matches = [name for name in candidates if pattern.match(name)]
        else:
            matches = [entry] if entry in candidates else []
        if not matches:
            shown = ", ".join(list(candidates)[:20]) or "none: the model has no affine BatchNorm"
            raise ValueError(
                f"`{field}` entry {entry!r} matches no BatchNorm scale (penalty 'bn_scale' acts "
                f"on BatchNorm weights). Candidates: {shown}."
            )
        for name in matches:
            chosen.setdefault(name, candidates[name])
    return chosen


def resolve_penalty_params(
    model: nn.Module,
    params: Sequence[str],
    kind: str,
    structure: MaskType | None = None,
    field: str = "params",
) -> dict[str, nn.Parameter]:
    """The weights ``params`` selects for penalty ``kind``, checked against its groups.

    ``l1`` and ``group_lasso`` select Conv/Linear weights as pruning does
    (:func:`~lightning_sparse.core.targets.resolve_params`); ``bn_scale`` selects BatchNorm scales
    by the same rules (names, ``re:`` patterns, ``__ALL_PRUNABLE__`` = every BatchNorm scale).

    Raises:
        ValueError: an entry matches nothing, or ``N:M`` groups do not tile a weight's input
            dimension; names ``field`` (or ``groups``) and the weight.
    """
    if not params:
        raise ValueError(f"`{field}` is empty; give names, `re:` patterns or {ALL_PRUNABLE}.")
    if kind == "bn_scale":
        return _resolve_bn(model, params, field)
    chosen = resolve_params(model, params, field)
    if kind == "group_lasso" and structure is not None and structure.kind != "channel":
        size = structure.group_size_along_input
        for name, weight in chosen.items():
            if weight.dim() < 2 or weight.shape[1] % size:
                raise ValueError(
                    f"`groups`={str(structure)!r} groups {size} weights along the input "
                    f"dimension, but {name!r} has shape {list(weight.shape)} (input dimension "
                    f"not divisible by {size}); leave it out through `{field}`."
                )
    return chosen


# Optimizers whose step divides by a running gradient scale: a parameter moves by about ``lr`` per
# step at most, however large its gradient (Adam's |m / sqrt(v)| is about 1 for a gradient of
# constant sign, which is what a penalty that dominates gives).
ADAPTIVE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def penalty_reach(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    steps: float,
    strength: float,
) -> float | None:
    """How far the penalty can move one of ``params`` in ``steps`` optimizer steps, at most.

    Adaptive optimizers (Adam and kin): ``lr * steps``, whatever the strength: the step is
    normalised by the gradient's own scale. SGD: ``lr * strength * steps / (1 - momentum)``, the
    penalty's own pull (its subgradient is ``strength`` per weight, in root mean square for group
    lasso) with momentum's amplification. ``lr`` and ``momentum``: the largest of the param
    groups holding ``params``, as they are now (a schedule that decays the rate makes this an
    upper bound). None for other optimizers or when no group holds them.
    """
    wanted = {id(p) for p in params}
    holding = [g for g in optimizer.param_groups if any(id(p) in wanted for p in g["params"])]
    if not holding:
        return None
    lr = max(float(g["lr"]) for g in holding)
    if isinstance(optimizer, ADAPTIVE_OPTIMIZERS):
        return lr * steps
    if isinstance(optimizer, torch.optim.SGD):
        momentum = max(float(g.get("momentum", 0.0)) for g in holding)
        return lr * strength * steps / (1.0 - momentum) if momentum < 1 else math.inf
    return None
