"""Which parameters a technique touches.

``params`` entries are exact parameter names, ``re:`` regular expressions matched from the start of
the name (as SparseML does), or ``__ALL_PRUNABLE__`` (every Conv/Linear weight). Only weights of
prunable layers are candidates, so a broad regex never catches a bias or a norm's scale.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["ALL_PRUNABLE", "PRUNABLE_TYPES", "prunable_parameters", "resolve_params"]

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


def _preview(names: Iterable[str], limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve_params(
    model: nn.Module, params: Sequence[str] | str, field: str = "params"
) -> dict[str, nn.Parameter]:
    """Resolve ``params`` against ``model`` to an ordered ``{name: parameter}`` dict.

    Raises:
        ValueError: an entry matches no prunable weight, or an ``re:`` pattern does not compile.
            The message names ``field``, the entry and the candidates.
    """
    entries = [params] if isinstance(params, str) else list(params)
    candidates = prunable_parameters(model)
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
            raise ValueError(
                f"`{field}` entry {entry!r} matches no prunable weight (Conv/Linear). "
                f"Candidates: {_preview(candidates) or 'none: the model has no Conv/Linear layer'}."
            )
        for name in matches:
            chosen.setdefault(name, candidates[name])
    return chosen
