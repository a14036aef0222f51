"""Forward hooks that keep the latest output of named layers while armed.

Distillation's feature term (student and teacher layers) and early exit's heads (exit layers and
the model's own logits) both read layer outputs of the step being trained, through one tap each.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["OutputTap"]


class OutputTap:
    """Forward hooks on named layers; while ``armed``, each keeps its layer's output by name.

    The hook is a closure, not a bound method, so a deep copy of a hooked model (e.g. a
    self-teacher) shares it instead of deep-copying this object; it ignores any module but the one
    it was registered on, and :meth:`drop_from` removes it from such a copy.

    Args:
        check: called as ``check(key, output)`` before an output is kept (e.g. to refuse one that
            is not a tensor).
        keep_first: keys whose first output in a step is kept and later ones ignored (for a
            module whose forward runs around an inner call of itself); others keep the latest.
    """

    def __init__(
        self,
        check: Callable[[str, Any], None] | None = None,
        keep_first: Collection[str] = (),
    ) -> None:
        self.armed = False
        self.outputs: dict[str, Any] = {}
        self._check = check
        self._keep_first = frozenset(keep_first)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, layers: Mapping[str, nn.Module]) -> None:
        """Hook ``layers`` (by key), replacing any hooks attached before."""
        self.detach()
        for key, layer in layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(key, layer)))

    def _hook(self, key: str, owner: nn.Module) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if not self.armed or module is not owner:
                return
            if key in self._keep_first and key in self.outputs:
                return
            if self._check is not None:
                self._check(key, output)
            self.outputs[key] = output

        return keep

    @property
    def attached(self) -> bool:
        """Whether hooks are in place."""
        return bool(self._handles)

    def drop_from(self, model: nn.Module) -> None:
        """Remove these hooks from a copy of a hooked model."""
        ids = {handle.id for handle in self._handles}
        for module in model.modules():
            for hook_id in ids & set(module._forward_hooks):
                del module._forward_hooks[hook_id]

    def take(self) -> dict[str, Any]:
        """The outputs kept since the last call (and forget them)."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def detach(self) -> None:
        """Remove the hooks and forget the outputs; disarm."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = {}
        self.armed = False
