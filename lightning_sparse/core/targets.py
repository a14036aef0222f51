"""Which parameters a technique touches.

``params`` entries are exact parameter names, ``re:`` regular expressions matched from the start of
the name (as SparseML does), or ``__ALL_PRUNABLE__`` (every Conv/Linear weight). Only weights of
prunable layers are candidates, so a broad regex never catches a bias or a norm's scale.

Techniques that remove or zero whole output channels leave the model's output layer out
(:func:`output_layer`): a classifier head without some of its rows can no longer predict those
classes. ``__ALL_PRUNABLE__`` and ``re:`` patterns pass over it; naming it is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

__all__ = [
    "ALL_PRUNABLE",
    "PRUNABLE_TYPES",
    "output_layer",
    "output_weight_excluded",
    "prunable_parameters",
    "resolve_params",
]

ALL_PRUNABLE = "__ALL_PRUNABLE__"
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """All weights of Conv/Linear layers, by their name in ``model.named_parameters()``."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and isinstance(module.weight, nn.Parameter):
            name = f"{module_name}.weight" if module_name else "weight"
            found[name] = module.weight
    return found


def output_layer(model: nn.Module, head: str | None = None, field: str = "head") -> str:
    """The name of ``model``'s output layer: ``head``, or its last Conv/Linear layer.

    "Last" is in ``model.named_modules()`` order (the order layers are defined), which is forward
    order for sequential stacks and torchvision's models; name the layer with ``head`` otherwise.

    Raises:
        ValueError: ``head`` is not a Conv/Linear layer of ``model``, or the model has none; the
            message names ``field`` and the candidates.
    """
    layers = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
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
            pattern does not compile. The message names ``field``, the entry and the candidates.
    """
    entries = [params] if isinstance(params, str) else list(params)
    excluded = dict(exclude or {})
    for entry in entries:
        if entry in excluded:
            raise ValueError(
                f"`{field}` entry {entry!r} is {excluded[entry]}: it cannot be selected here. "
                "Leave it out of `params`."
            )
    candidates = {n: p for n, p in prunable_parameters(model).items() if n not in excluded}
    if not entries:
        raise ValueError(
            f"`{field}` is empty; give parameter names, `re:` patterns or {ALL_PRUNABLE}."
        )
    chosen: dict[str, nn.Parameter] = {}
    for entry in entries:
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
            passed_over = f" ({', '.join(excluded)} left out)" if excluded else ""
            raise ValueError(
                f"`{field}` entry {entry!r} matches no prunable weight (Conv/Linear){passed_over}. "
                f"Candidates: {_preview(candidates) or 'none: the model has no Conv/Linear layer'}."
            )
        for name in matches:
            chosen.setdefault(name, candidates[name])
    return chosen
