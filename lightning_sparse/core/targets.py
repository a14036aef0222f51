"""Which parameters a technique touches.

``params`` entries are exact parameter names, ``re:`` regular expressions matched from the start of
the name (as SparseML does), or ``__ALL_PRUNABLE__`` (the weight of every layer whose kind says so:
Conv, Linear, Hugging Face's Conv1D, any type a user registered). Only weights of known layer kinds
(:mod:`lightning_sparse.core.layers`) are candidates, so a broad regex never catches a bias or a
norm's scale. Embeddings are candidates by name or pattern, never through ``__ALL_PRUNABLE__``.

Techniques that remove or zero whole output channels leave the model's output layer out
(:func:`output_layer`): a classifier head without some of its rows can no longer predict those
classes. ``__ALL_PRUNABLE__`` and ``re:`` patterns pass over it; naming it is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from lightning_sparse.core.layers import Layout, layer_weights, unknown_layer_weights

__all__ = [
    "ALL_PRUNABLE",
    "output_layer",
    "output_weight_excluded",
    "prunable_parameters",
    "resolve_params",
    "unknown_layer_weights",
    "unknown_weights_note",
    "weight_layouts",
]

ALL_PRUNABLE = "__ALL_PRUNABLE__"
_REGISTER_HINT = (
    "Register the type once with `lightning_sparse.register_layer_kind(<type>, weight='weight', "
    "input_dim=..., output_dim=...)` (which dimension of its weight multiplies the input and "
    "which makes the output)"
)


def prunable_parameters(model: nn.Module, named: bool = False) -> dict[str, nn.Parameter]:
    """Weights of known layer kinds, by their name in ``model.named_parameters()``.

    Args:
        model: the model.
        named: also include kinds that are prunable only when named (embeddings); by default only
            the ``__ALL_PRUNABLE__`` ones.
    """
    found: dict[str, nn.Parameter] = {}
    for name, module, kind in layer_weights(model):
        if kind.all_prunable or named:
            found[name] = module._parameters[kind.weight]  # type: ignore[assignment]
    return found


def weight_layouts(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Layout]:
    """The layout (input and output dimension) of each named weight of a known layer kind."""
    layouts = {name: kind.layout for name, _, kind in layer_weights(model)}
    return layouts if names is None else {name: layouts[name] for name in names}


def unknown_weights_note(model: nn.Module) -> str | None:
    """Which 2-D+ weights ``__ALL_PRUNABLE__`` leaves dense (unknown layer types), or None."""
    unknown = unknown_layer_weights(model)
    if not unknown:
        return None
    types = sorted(set(unknown.values()))
    return (
        f"{ALL_PRUNABLE} leaves {len(unknown)} weights dense whose layer types lightning_sparse "
        f"does not know: {_preview(unknown)} ({', '.join(types)}). {_REGISTER_HINT} to prune them."
    )


def output_layer(model: nn.Module, head: str | None = None, field: str = "head") -> str:
    """The name of ``model``'s output layer: ``head``, or its last Conv/Linear layer.

    "Last" is in ``model.named_modules()`` order (the order layers are defined), which is forward
    order for sequential stacks and torchvision's models; name the layer with ``head`` otherwise.

    Raises:
        ValueError: ``head`` is not a Conv/Linear layer of ``model``, or the model has none; the
            message names ``field`` and the candidates.
    """
    layers = [
        name.removesuffix(f".{kind.weight}")
        for name, _, kind in layer_weights(model)
        if kind.all_prunable
    ]
    if head is None:
        if not layers:
            raise ValueError(
                f"{type(model).__name__} has no Conv/Linear layer to take for its output layer."
            )
        return layers[-1]
    if head not in layers:
        raise ValueError(
            f"`{field}`={head!r} is not a Conv/Linear layer of the model; its layers (last ones "
            f"are the usual heads): {_preview(layers[::-1])}."
        )
    return head


def output_weight_excluded(
    model: nn.Module, head: str | None = None, field: str = "head"
) -> dict[str, str]:
    """``{weight name: why}`` for the output layer's weight (``resolve_params(exclude=...)``)."""
    layer = output_layer(model, head, field)
    return {
        f"{layer}.weight": (
            f"the model's output layer (`{field}`={head!r}, or its last Conv/Linear layer); "
            "removing its output channels would remove classes"
        )
    }


def _preview(names: Iterable[str], limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _no_match(
    model: nn.Module,
    field: str,
    entry: str,
    pattern: re.Pattern[str] | None,
    excluded: Mapping[str, str] | None = None,
) -> ValueError:
    excluded = excluded or {}
    candidates = {
        n: p for n, p in prunable_parameters(model, named=True).items() if n not in excluded
    }
    passed_over = f" ({', '.join(excluded)} left out)" if excluded else ""
    unknown = unknown_layer_weights(model)
    if entry == ALL_PRUNABLE:
        hits = unknown
    elif pattern is not None:
        hits = {name: kind for name, kind in unknown.items() if pattern.match(name)}
    else:
        hits = {entry: unknown[entry]} if entry in unknown else {}
    if hits:
        types = sorted(set(hits.values()))
        return ValueError(
            f"`{field}` entry {entry!r} matches only weights of layer types lightning_sparse does "
            f"not know: {_preview(hits)} (type{'s' if len(types) > 1 else ''} "
            f"{', '.join(types)}). {_REGISTER_HINT}; then it prunes them."
        )
    return ValueError(
        f"`{field}` entry {entry!r} matches no prunable weight (Conv/Linear/Conv1D, embeddings "
        f"by name, registered layer kinds){passed_over}. Candidates: "
        f"{_preview(candidates) or 'none: the model has no layer of a known kind'}."
    )


def resolve_params(
    model: nn.Module,
    params: Sequence[str] | str,
    field: str = "params",
    exclude: Mapping[str, str] | None = None,
) -> dict[str, nn.Parameter]:
    """Resolve ``params`` against ``model`` to an ordered ``{name: parameter}`` dict.

    Args:
        model: the model whose weights are named.
        params: names, ``re:`` patterns or ``__ALL_PRUNABLE__``.
        field: the argument's name, for messages.
        exclude: ``{weight name: why}``: weights that ``__ALL_PRUNABLE__`` and patterns pass over
            and that an entry may not name (e.g. :func:`output_weight_excluded`).

    Raises:
        ValueError: an entry matches no prunable weight, names an excluded one, or an ``re:``
            pattern does not compile. The message names ``field``, the entry and the candidates,
            or, when the entry matches only weights of unknown layer types, those types and how
            to register them.
    """
    entries = [params] if isinstance(params, str) else list(params)
    excluded = dict(exclude or {})
    for entry in entries:
        if entry in excluded:
            raise ValueError(
                f"`{field}` entry {entry!r} is {excluded[entry]}: it cannot be selected here. "
                "Leave it out of `params`."
            )
    candidates = {
        n: p for n, p in prunable_parameters(model, named=True).items() if n not in excluded
    }
    if not entries:
        raise ValueError(
            f"`{field}` is empty; give parameter names, `re:` patterns or {ALL_PRUNABLE}."
        )
    chosen: dict[str, nn.Parameter] = {}
    for entry in entries:
        pattern = None
        if entry == ALL_PRUNABLE:
            matches = [name for name in prunable_parameters(model) if name not in excluded]
        elif entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as err:
                raise ValueError(f"`{field}` entry {entry!r} is not a valid regex: {err}.") from err
            matches = [name for name in candidates if pattern.match(name)]
        else:
            matches = [entry] if entry in candidates else []
        if not matches:
            raise _no_match(model, field, entry, pattern, excluded)
        for name in matches:
            chosen.setdefault(name, candidates[name])
    return chosen
