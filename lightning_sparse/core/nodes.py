"""Build an object from a ``{_target_: dotted.path, **kwargs}`` node without Hydra.

Callbacks accept such nodes from plain Python too (e.g. distillation's ``teacher_model``), and the
callback layer never imports Hydra (run/ is the only library code that does), so this is the
minimal, non-recursive form of ``hydra.utils.instantiate`` those arguments need.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["build_node", "import_target"]


def import_target(path: str, field: str) -> Any:
    """The object at dotted ``path`` (``package.module.Name``).

    Raises:
        ValueError: it does not import; names ``field`` and the path.
    """
    module_name, _, attribute = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"`{field}`: `_target_`={path!r} cannot be imported: {err}") from err


def build_node(node: Mapping[str, Any], field: str) -> Any:
    """Call ``node['_target_']`` with the node's other keys (Hydra's own ``_x_`` keys dropped).

    Raises:
        ValueError: no ``_target_``, it does not import, or the call rejects the arguments.
    """
    if "_target_" not in node:
        raise ValueError(f"`{field}`={dict(node)!r} has no `_target_`.")
    target = import_target(str(node["_target_"]), field)
    kwargs = {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}
    try:
        return target(*node.get("_args_", []), **kwargs)
    except TypeError as err:
        raise ValueError(f"`{field}`: {node['_target_']}: {err}") from err
