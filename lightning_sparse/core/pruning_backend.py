"""The one module that imports torch-pruning (the optional ``structured`` backend).

torch-pruning (MIT, pure Python) traces a model once and knows which layers' channels are
coupled: a residual connection ties every block's output to the stem's, a depthwise convolution
ties its outputs to its inputs, a concatenation maps slices of the next layer's inputs to each
branch, a BatchNorm follows the convolution before it. Here its dependency graph is asked for
those groups and nothing else: they come back as plain :class:`~lightning_sparse.core.channels.
ChannelGroup` data, and the removal itself is ours (``lightning_sparse.core.structure``), so it
can be replayed on a fresh model without torch-pruning or an example input.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from types import ModuleType

import torch
from torch import nn

from lightning_sparse.core.channels import ChannelGroup, Member
from lightning_sparse.core.structure import removable

__all__ = ["channel_groups", "require", "version"]

_INSTALL_HINT = "pip install 'lightning_sparse[structured]' (or: pip install torch-pruning)"


def require(what: str) -> ModuleType:
    """``torch_pruning``, or an ImportError naming ``what`` needed it and how to install it."""
    try:
        return importlib.import_module("torch_pruning")
    except ImportError as err:
        raise ImportError(
            f"{what} needs `torch-pruning` (its dependency graph finds the coupled layers), "
            f"which is not installed; {_INSTALL_HINT}."
        ) from err


def version() -> str | None:
    """torch-pruning's version, or None when it is not installed."""
    try:
        return str(require("version").__version__)
    except ImportError:
        return None


def channel_groups(
    model: nn.Module, example: torch.Tensor, keep_outputs: Collection[str] = ()
) -> list[ChannelGroup]:
    """The groups of coupled channels of ``model`` whose removal this package can apply.

    Args:
        model: traced with one forward pass of ``example``: give a copy in eval mode (the pass
            would otherwise update BatchNorm statistics). Layers are named as in
            ``model.named_modules()``.
        example: an input batch (one sample is enough).
        keep_outputs: names of layers whose outputs must all stay (the head, layers left out by
            ``params``); a group that would remove any of them is left out.

    Returns:
        One group per set of coupled output channels, rooted at a Conv or Linear layer, in the
        graph's order; members list every layer (and side: ``out``/``in``) a channel of the root
        maps to. Groups through layers this package cannot cut (grouped convolutions, bare
        parameters) are left out.

    Raises:
        ImportError: torch-pruning is not installed.
        ValueError: ``keep_outputs`` names a layer ``model`` does not have.
    """
    tp = require("Channel removal")
    names = {module: name for name, module in model.named_modules()}
    ignored = []
    for name in keep_outputs:
        try:
            ignored.append(model.get_submodule(name))
        except AttributeError as err:
            raise ValueError(f"layer {name!r} is not in the model.") from err
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    roots = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    groups: list[ChannelGroup] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=roots):
        items = list(group.items)
        root_module = items[0].dep.target.module
        members: list[Member] = []
        usable = root_module in names
        for item in items:
            target = item.dep.target.module
            layer = names.get(target)
            if layer is None:
                if isinstance(target, nn.Parameter):
                    usable = False  # a bare parameter: not a layer we can cut
                continue  # a functional op (add, reshape, concat): nothing to cut
            if not removable(target):
                usable = False
                break
            side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            root_idxs = item.root_idxs if item.root_idxs is not None else item.idxs
            members.append(
                Member(
                    layer=layer,
                    side=side,
                    idxs=tuple(int(i) for i in item.idxs),
                    root_idxs=tuple(int(i) for i in root_idxs),
                )
            )
        if usable and members:
            groups.append(
                ChannelGroup(
                    root=names[root_module], channels=len(items[0].idxs), members=tuple(members)
                )
            )
    return groups
