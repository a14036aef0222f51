"""Structure changes as plain data: apply one, replay a log of them, follow them in an optimizer.

A technique that removes or replaces parameters (channel removal, low-rank factorization) never
edits the model directly: it describes the change as a plain ``dict`` (a ``kind``, its sequence
number ``seq`` and the kind's data, e.g. which channels of which layer go) and applies it with
:func:`apply_change`. The model keeps the log of the changes applied to it, and the same log
replayed on a freshly built model (:func:`replay`) rebuilds the same architecture, so a checkpoint
of a changed model loads into the model its config builds: Lightning resume, export, one-shot,
``init_from`` (DESIGN.md, contract 3).

Changes are stored in checkpoints under a ``structure`` key, by the technique that made them (its
callback state) and by the module for its whole log; :func:`changes_in_checkpoint` gathers them.
A change refers to layers by their name in the model it was applied to (``model.layer1.0.conv1``
for a ``ClassificationModule``), and its indices to the model as the earlier changes left it.

Kinds are a registry (:func:`register_kind`); built in are ``remove_channels``::

    {"kind": "remove_channels", "seq": 0,
     "layers": {"model.conv1": {"out": [3, 7]}, "model.bn1": {"out": [3, 7]},
                "model.conv2": {"in": [3, 7]}}}

which removes output channels (``out``: rows of a Conv/Linear weight, features of a norm layer)
or input channels (``in``) of each named layer, and ``factorize``::

    {"kind": "factorize", "seq": 1, "layers": {"model.fc1": {"rank": 16}}}

which replaces each named Linear or Conv2d by the two factors of its truncated SVD at that rank
(``core.lowrank``: the layer becomes an ``nn.Sequential`` of two, so its weight is named
``model.fc1.0.weight`` and ``model.fc1.1.weight`` from then on). Replayed on a fresh model it
factorizes that model's (untrained) weights, which builds the right shapes; the checkpoint's
weights load over them. Torch only: deciding *which* channels go (and which layers are coupled),
or which rank a layer keeps, is the technique's business.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_sparse.core.lowrank import (
    factorize_conv2d,
    factorize_linear,
    layer_dims,
    replace_module,
)

__all__ = [
    "FACTORIZE",
    "FORMAT",
    "KINDS",
    "REMOVE_CHANNELS",
    "ParamChange",
    "StructureError",
    "applied_changes",
    "apply_change",
    "change_count",
    "changes_in_checkpoint",
    "count_macs",
    "layer_costs",
    "register_kind",
    "remap_optimizer",
    "removable",
    "replay",
    "structure_state",
]

FORMAT = "lightning_sparse.structure"
VERSION = 1
REMOVE_CHANNELS = "remove_channels"
FACTORIZE = "factorize"
# Where a model keeps the log of the changes applied to it: a plain attribute, not a buffer, so
# its state_dict keeps exactly the keys of the layers it has.
_LOG_ATTRIBUTE = "_lightning_sparse_structure"


class StructureError(ValueError):
    """A structure change cannot be applied or replayed; the message names the layer or change."""


@dataclass(frozen=True)
class ParamChange:
    """How one tensor of the model (a parameter or a buffer) was replaced by a change.

    Attributes:
        name: its name in the model.
        old: the tensor before (no longer in the model).
        new: the tensor now in the model.
        keep: ``{dim: indices of old kept}``, in the order of application; empty for a tensor
            replaced by an unrelated one (which no state can follow).
    """

    name: str
    old: torch.Tensor
    new: torch.Tensor
    keep: Mapping[int, torch.Tensor]

    def follow(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """``tensor`` shaped like :attr:`old` (an optimizer's moment) cut as :attr:`new` was."""
        if not self.keep or tensor.shape != self.old.shape:
            return None
        for dim, index in self.keep.items():
            tensor = tensor.index_select(dim, index.to(tensor.device))
        return tensor.clone()


KindFn = Callable[[nn.Module, Mapping[str, Any]], list[ParamChange]]
KINDS: dict[str, KindFn] = {}


def register_kind(kind: str, apply: KindFn) -> KindFn:
    """Register how changes of ``kind`` are applied: ``apply(model, change) -> [ParamChange]``.

    ``apply`` must be deterministic and depend only on the model's architecture and the change's
    data, so that replaying the change on a fresh model rebuilds the same architecture.
    """
    KINDS[kind] = apply
    return apply


def applied_changes(model: nn.Module) -> list[dict[str, Any]]:
    """The changes applied to ``model`` so far, in order (a copy; empty for an unchanged one)."""
    return copy.deepcopy(vars(model).get(_LOG_ATTRIBUTE, []))


def change_count(model: nn.Module) -> int:
    """How many changes were applied to ``model`` (cheap: no copy of the log)."""
    return len(vars(model).get(_LOG_ATTRIBUTE, []))


def _plain(value: Any) -> Any:
    """A change as JSON-like data (ints, floats, strings, lists, dicts): weights-only loadable."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_change(model: nn.Module, change: Mapping[str, Any]) -> list[ParamChange]:
    """Apply one change to ``model`` and append it to the model's log.

    Args:
        model: the model; layers are named as in ``model.named_modules()``.
        change: ``{"kind": ..., **data}``; its ``seq``, if given, must be the log's length.

    Returns:
        What happened to each replaced tensor (to follow them in an optimizer).

    Raises:
        StructureError: an unknown kind, a ``seq`` out of order, or data that do not fit the
            model (the message names the layer).
    """
    kind = change.get("kind")
    if kind not in KINDS:
        raise StructureError(
            f"structure change {kind!r} is not known to this lightning_sparse (known: "
            f"{sorted(KINDS)}); was the checkpoint written by a newer version?"
        )
    log = vars(model).setdefault(_LOG_ATTRIBUTE, [])
    seq = change.get("seq", len(log))
    if seq != len(log):
        raise StructureError(
            f"structure change {kind!r} has seq={seq}, but {len(log)} changes were applied to the "
            "model before it: changes must be applied in order."
        )
    record = _plain({**change, "seq": seq})
    result = KINDS[str(kind)](model, record)
    log.append(record)
    return result


def replay(model: nn.Module, changes: Sequence[Mapping[str, Any]]) -> int:
    """Apply to ``model`` those of ``changes`` (a whole log, in order) that it lacks.

    A model built from its config has none; a model that was already changed (a second ``fit`` on
    the same module) has a prefix of them, which must be equal to the log's.

    Returns:
        How many changes were applied.

    Raises:
        StructureError: the model holds changes the log does not start with, or a change does not
            fit the model.
    """
    done = applied_changes(model)
    plain = [_plain(change) for change in changes]
    if plain[: len(done)] != done:
        raise StructureError(
            f"the model's structure ({len(done)} changes applied) is not where the checkpoint's "
            f"({len(plain)} changes) starts: load it into a model built from the config."
        )
    missing = plain[len(done) :]
    for change in missing:
        apply_change(model, change)
    return len(missing)


def structure_state(changes: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A log of changes as the ``structure`` entry of a checkpoint (plain data)."""
    return {"format": FORMAT, "version": VERSION, "changes": [_plain(c) for c in changes]}


def _states(checkpoint: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    top = checkpoint.get("structure")
    if isinstance(top, Mapping):
        yield top
    for state in (checkpoint.get("callbacks") or {}).values():
        inner = state.get("structure") if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping):
            yield inner


def changes_in_checkpoint(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every structure change a Lightning checkpoint records, in order (empty: none).

    Read from the module's ``structure`` entry and from each callback state's; the same change
    found twice (the module's whole log and the technique's own) counts once.

    Raises:
        StructureError: a newer format, two different changes with one ``seq``, or a gap.
    """
    by_seq: dict[int, dict[str, Any]] = {}
    for state in _states(checkpoint):
        if state.get("format") != FORMAT:
            continue
        if int(state.get("version", 1)) > VERSION:
            raise StructureError(
                f"the checkpoint's structure log has version {state.get('version')}, newer than "
                f"this lightning_sparse reads (up to {VERSION}); upgrade lightning_sparse."
            )
        for change in state.get("changes", []):
            plain = _plain(change)
            seq = int(plain["seq"])
            if seq in by_seq and by_seq[seq] != plain:
                raise StructureError(
                    f"the checkpoint holds two different structure changes with seq={seq}."
                )
            by_seq[seq] = plain
    ordered = [by_seq[seq] for seq in sorted(by_seq)]
    if [c["seq"] for c in ordered] != list(range(len(ordered))):
        raise StructureError(
            f"the checkpoint's structure log has gaps (seq {sorted(by_seq)}); it cannot be "
            "replayed."
        )
    return ordered


# ------------------------------------------------------------------------------------------------
# Following a change in an optimizer


@torch.no_grad()
def remap_optimizer(optimizer: torch.optim.Optimizer, changes: Sequence[ParamChange]) -> int:
    """Point ``optimizer`` at the new parameters, their state cut as the parameters were.

    The optimizer object, its param groups' settings (learning rates a scheduler set), its
    scheduler and anything else holding it stay as they are; a moment of a kept channel keeps its
    value. A replaced parameter that no state can follow (``keep`` empty) starts with none. A
    parameter replaced by several (a layer factorized in two: one change per new parameter, all
    with the same ``old``) gives its place in its param group to all of them, without state.

    Returns:
        How many parameters of the optimizer were replaced.
    """
    by_old: dict[int, list[ParamChange]] = {}
    for change in changes:
        by_old.setdefault(id(change.old), []).append(change)
    replaced = 0
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            found = by_old.get(id(param))
            if found is None:
                params.append(param)
                continue
            replaced += 1
            params.extend(change.new for change in found)
            old_state = optimizer.state.pop(param, None)
            if not old_state or len(found) > 1:
                continue
            change = found[0]
            new_state: dict[str, Any] = {}
            for key, value in old_state.items():
                if isinstance(value, torch.Tensor) and value.shape == change.old.shape:
                    followed = change.follow(value)
                    if followed is None:
                        new_state = {}
                        break
                    new_state[key] = followed
                else:
                    new_state[key] = value  # step counts and other scalars
            if new_state:
                optimizer.state[change.new] = new_state
        group["params"] = params
    return replaced


# ------------------------------------------------------------------------------------------------
# remove_channels


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise StructureError(
            f"structure change names layer {name!r}, which the model does not have; was it built "
            "from the same config as the model that was changed?"
        ) from err


def _indices(layer: str, dim: str, removed: Any, size: int) -> torch.Tensor:
    """Indices kept along a dimension of ``size`` after removing ``removed``."""
    gone = sorted({int(i) for i in removed})
    if any(i < 0 or i >= size for i in gone):
        raise StructureError(
            f"structure change removes {dim} channels {gone} of {layer!r}, which has {size}."
        )
    if len(gone) >= size:
        raise StructureError(
            f"structure change would remove all {size} {dim} channels of {layer!r}; at least one "
            "must stay."
        )
    keep = torch.ones(size, dtype=torch.bool)
    keep[gone] = False
    return keep.nonzero().flatten()


def _cut(
    module: nn.Module, layer: str, attribute: str, keep: Mapping[int, torch.Tensor]
) -> ParamChange | None:
    """Replace ``module.<attribute>`` (parameter or buffer) by its slice along ``keep``."""
    old = getattr(module, attribute, None)
    if not isinstance(old, torch.Tensor):
        return None
    new = old.detach()
    for dim, index in keep.items():
        new = new.index_select(dim, index.to(new.device))
    new = new.clone()
    if isinstance(old, nn.Parameter):
        replacement: torch.Tensor = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        replacement = new
    setattr(module, attribute, replacement)
    return ParamChange(f"{layer}.{attribute}" if layer else attribute, old, replacement, keep)


def _remove_from_conv(module: _ConvNd, layer: str, out: Any, in_: Any) -> list[ParamChange]:
    if module.transposed:
        raise StructureError(
            f"layer {layer!r} is a transposed convolution, whose channels this version does "
            "not remove; leave it out (`params`)."
        )
    changes: list[ParamChange] = []
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    if module.groups > 1 and not depthwise:
        raise StructureError(
            f"layer {layer!r} is a grouped convolution (groups={module.groups}, not depthwise), "
            "whose channels this version does not remove; leave it out (`params`)."
        )
    if depthwise:
        # One filter per channel: an output channel and its input go together.
        keep = _indices(layer, "out", {*(out or []), *(in_ or [])}, module.out_channels)
        module.out_channels = module.in_channels = module.groups = len(keep)
        changes += [c for a in ("weight", "bias") if (c := _cut(module, layer, a, {0: keep}))]
        return changes
    if out:
        keep = _indices(layer, "out", out, module.out_channels)
        module.out_channels = len(keep)
        changes += [c for a in ("weight", "bias") if (c := _cut(module, layer, a, {0: keep}))]
    if in_:
        keep = _indices(layer, "in", in_, module.in_channels)
        module.in_channels = len(keep)
        cut = _cut(module, layer, "weight", {1: keep})
        changes += [cut] if cut else []
    return changes


def _merge(changes: list[ParamChange]) -> list[ParamChange]:
    """One change per tensor: a weight cut twice (out, then in) is one cut from the original."""
    merged: dict[str, ParamChange] = {}
    for change in changes:
        first = merged.get(change.name)
        if first is None:
            merged[change.name] = change
        else:
            merged[change.name] = ParamChange(
                change.name, first.old, change.new, {**first.keep, **change.keep}
            )
    return list(merged.values())


def _remove_from_layer(module: nn.Module, layer: str, out: Any, in_: Any) -> list[ParamChange]:
    if isinstance(module, _ConvNd):
        return _merge(_remove_from_conv(module, layer, out, in_))
    if isinstance(module, nn.Linear):
        changes: list[ParamChange] = []
        if out:
            keep = _indices(layer, "out", out, module.out_features)
            module.out_features = len(keep)
            changes += [c for a in ("weight", "bias") if (c := _cut(module, layer, a, {0: keep}))]
        if in_:
            keep = _indices(layer, "in", in_, module.in_features)
            module.in_features = len(keep)
            cut = _cut(module, layer, "weight", {1: keep})
            changes += [cut] if cut else []
        return _merge(changes)
    # Norm layers and per-channel activations: their channels are their features, whichever
    # side of them the coupled layers are on.
    gone = {*(out or []), *(in_ or [])}
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        keep = _indices(layer, "out", gone, module.num_features)
        module.num_features = len(keep)
        attributes = ("weight", "bias", "running_mean", "running_var")
        return [c for a in attributes if (c := _cut(module, layer, a, {0: keep}))]
    if isinstance(module, nn.GroupNorm):
        keep = _indices(layer, "out", gone, module.num_channels)
        if len(keep) % module.num_groups:
            raise StructureError(
                f"removing channels of {layer!r} leaves {len(keep)}, not divisible by its "
                f"num_groups={module.num_groups}."
            )
        module.num_channels = len(keep)
        return [c for a in ("weight", "bias") if (c := _cut(module, layer, a, {0: keep}))]
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        keep = _indices(layer, "out", gone, module.normalized_shape[0])
        module.normalized_shape = (len(keep),)
        return [c for a in ("weight", "bias") if (c := _cut(module, layer, a, {0: keep}))]
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        keep = _indices(layer, "out", gone, module.num_parameters)
        module.num_parameters = len(keep)
        cut = _cut(module, layer, "weight", {0: keep})
        return [cut] if cut else []
    if isinstance(module, nn.Embedding):
        keep = _indices(layer, "out", gone, module.embedding_dim)
        module.embedding_dim = len(keep)
        cut = _cut(module, layer, "weight", {1: keep})
        return [cut] if cut else []
    if not any(True for _ in module.parameters(recurse=False)) and not any(
        True for _ in module.buffers(recurse=False)
    ):
        return []  # activations, pooling, dropout: nothing to cut
    raise StructureError(
        f"layer {layer!r} ({type(module).__name__}) holds channels this version cannot remove; "
        "leave the layers coupled to it out (`params`)."
    )


def removable(module: nn.Module) -> bool:
    """Whether ``remove_channels`` can cut ``module``'s channels (or it has none to cut)."""
    if isinstance(module, _ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels
        return not module.transposed and (module.groups == 1 or depthwise)
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    if isinstance(
        module, (nn.Linear, _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.PReLU, nn.Embedding)
    ):
        return True
    has_params = any(True for _ in module.parameters(recurse=False))
    return not has_params and not any(True for _ in module.buffers(recurse=False))


def _remove_channels(model: nn.Module, change: Mapping[str, Any]) -> list[ParamChange]:
    layers = change.get("layers")
    if not isinstance(layers, Mapping):
        raise StructureError("a remove_channels change needs `layers`: {layer: {out/in: [...]}}.")
    # Check every layer before touching any, so a change that does not fit leaves the model as is.
    modules = {name: _module(model, name) for name in layers}
    changes: list[ParamChange] = []
    for name, sides in layers.items():
        unknown = set(sides) - {"out", "in"}
        if unknown:
            raise StructureError(f"remove_channels of {name!r}: unknown sides {sorted(unknown)}.")
        changes += _remove_from_layer(modules[name], name, sides.get("out"), sides.get("in"))
    return changes


register_kind(REMOVE_CHANNELS, _remove_channels)


# ------------------------------------------------------------------------------------------------
# factorize


def _factorize(model: nn.Module, change: Mapping[str, Any]) -> list[ParamChange]:
    layers = change.get("layers")
    if not isinstance(layers, Mapping) or not layers:
        raise StructureError("a factorize change needs `layers`: {layer: {rank: r}}.")
    # Check every layer before touching any, so a change that does not fit leaves the model as is.
    plan: dict[str, tuple[nn.Linear | nn.Conv2d, int]] = {}
    for name, data in layers.items():
        module = _module(model, name)
        rank = data.get("rank") if isinstance(data, Mapping) else None
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or (
            isinstance(module, nn.Conv2d) and module.groups != 1
        ):
            raise StructureError(
                f"factorize names layer {name!r} ({type(module).__name__}), which is not a Linear "
                "or an ungrouped Conv2d; was the model built from the same config?"
            )
        fan_in, out = layer_dims(module)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(fan_in, out):
            raise StructureError(
                f"factorize of {name!r} has rank={rank!r}; the layer ({out} x {fan_in}) takes an "
                f"integer rank in [1, {min(fan_in, out)}]."
            )
        plan[name] = (module, rank)
    changes: list[ParamChange] = []
    for name, (module, rank) in plan.items():
        if isinstance(module, nn.Linear):
            factors = factorize_linear(module, rank, name)
        else:
            factors = factorize_conv2d(module, rank, name)
        first, second = factors[0].weight, factors[1].weight
        assert isinstance(first, nn.Parameter)
        assert isinstance(second, nn.Parameter)
        for param in (first, second):
            param.requires_grad_(module.weight.requires_grad)
        replace_module(model, name, factors)
        # One weight becomes two: no optimizer state can follow it (keep={}). The bias moves to
        # the second factor unchanged, so its state follows (every index kept).
        changes.append(ParamChange(f"{name}.0.weight", module.weight, first, {}))
        changes.append(ParamChange(f"{name}.1.weight", module.weight, second, {}))
        bias, new_bias = module.bias, factors[1].bias
        if bias is not None and isinstance(new_bias, nn.Parameter):
            new_bias.requires_grad_(bias.requires_grad)
            every = torch.arange(bias.shape[0])
            changes.append(ParamChange(f"{name}.1.bias", bias, new_bias, {0: every}))
    return changes


register_kind(FACTORIZE, _factorize)


# ------------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class LayerCost:
    """Multiply-accumulates of one Conv/Linear layer per sample, and its channel counts."""

    macs: int
    out_channels: int
    in_channels: int
    groups: int


def layer_costs(model: nn.Module, example: torch.Tensor) -> dict[str, LayerCost]:
    """Per-sample MACs of every Conv/Linear layer of ``model`` on ``example``, by layer name.

    Measured with forward hooks on one forward pass in eval mode under ``no_grad`` (training
    flags are restored; BatchNorm statistics are left alone). A layer called twice counts twice.
    """
    costs: dict[str, list[int]] = {}
    handles = []
    batch = max(1, int(example.shape[0]))

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def count(module: nn.Module, inputs: Any, output: Any) -> None:
            per_sample = output.numel() // batch
            if isinstance(module, nn.Linear):
                macs = per_sample * module.in_features
            else:
                assert isinstance(module, _ConvNd)
                kernel = int(torch.tensor(module.kernel_size).prod())
                macs = per_sample * (module.in_channels // module.groups) * kernel
            costs.setdefault(name, [0])[0] += int(macs)

        return count

    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, _ConvNd)):
            layers[name] = module
            handles.append(module.register_forward_hook(hook(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    result: dict[str, LayerCost] = {}
    for name, (macs,) in costs.items():
        module = layers[name]
        if isinstance(module, nn.Linear):
            result[name] = LayerCost(macs, module.out_features, module.in_features, 1)
        else:
            assert isinstance(module, _ConvNd)
            result[name] = LayerCost(macs, module.out_channels, module.in_channels, module.groups)
    return result


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of ``model`` per sample of ``example`` (Conv and Linear layers)."""
    return sum(cost.macs for cost in layer_costs(model, example).values())
