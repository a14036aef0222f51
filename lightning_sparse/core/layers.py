"""Layer kinds: for each module type, which parameter is its weight and how that weight is laid out.

Every technique that looks inside a weight reads its layout from here: masks (N:M and blocks run
along the input dimension, ``channel`` removes output channels), QAT's per-output-channel scales,
Wanda's input norms, and the int8 ONNX rewrite. Built in:

- ``nn.Linear``: weight ``[out, in]`` (input dim 1, output dim 0), in ``__ALL_PRUNABLE__``;
- ``nn.Conv1d/2d/3d``: ``[out, in / groups, *kernel]`` (1, 0), in ``__ALL_PRUNABLE__``;
- ``transformers.pytorch_utils.Conv1D``: ``[in, out]`` (0, 1), in ``__ALL_PRUNABLE__``;
- ``nn.Embedding``: ``[vocab, dim]`` (0, 1), prunable by name only, never quantized.

Hugging Face's ``Conv1D`` (GPT-2's layers) is registered by its dotted class name, so nothing here
imports ``transformers``. An embedding is a lookup, i.e. ``one_hot(ids) @ weight``: the vocabulary
is its input dimension. It is left out of ``__ALL_PRUNABLE__`` (pruning recipes of the literature
leave embeddings dense) and never quantized, but a ``params`` name or pattern may pick it.

A user's own layer type is one call away::

    register_layer_kind(MyLowRankLinear, weight="weight", input_dim=1, output_dim=0)

Pure torch: no Lightning, no Hydra.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

__all__ = [
    "LayerKind",
    "Layout",
    "kind_of",
    "layer_kind",
    "layer_weights",
    "register_layer_kind",
    "registered_kinds",
    "type_name",
    "unknown_layer_weights",
]


@dataclass(frozen=True)
class Layout:
    """Which dimension of a weight multiplies the layer's input, and which makes its output."""

    input_dim: int = 1
    output_dim: int = 0


@dataclass(frozen=True)
class LayerKind:
    """What the library knows about one module type.

    Attributes:
        type_name: the dotted class name (``torch.nn.modules.linear.Linear``).
        weight: the name of the weight parameter on the module.
        layout: input and output dimensions of that weight.
        all_prunable: part of ``__ALL_PRUNABLE__``; else prunable only when named in ``params``.
        quantizable: QAT and PTQ may quantize it (its forward must read its weight from the
            ``weight`` attribute, and its input is the first argument).
    """

    type_name: str
    weight: str = "weight"
    layout: Layout = Layout()
    all_prunable: bool = True
    quantizable: bool = True

    @property
    def input_dim(self) -> int:
        """Dimension of the weight that multiplies the input features."""
        return self.layout.input_dim

    @property
    def output_dim(self) -> int:
        """Dimension of the weight along which outputs (channels) are laid out."""
        return self.layout.output_dim


# Keyed by the dotted class name, so a type can be registered before (or without) its package
# being imported.
_KINDS: dict[str, LayerKind] = {}


def type_name(layer_type: type) -> str:
    """``module.QualName`` of a class: how the registry and error messages name it."""
    return f"{layer_type.__module__}.{layer_type.__qualname__}"


def register_layer_kind(
    layer_type: type[nn.Module] | str,
    weight: str = "weight",
    input_dim: int = 1,
    output_dim: int = 0,
    *,
    all_prunable: bool = True,
    quantizable: bool = True,
) -> LayerKind:
    """Tell every technique how to read the weight of ``layer_type`` (subclasses included).

    Args:
        layer_type: the module class, or its dotted name (``"mypkg.layers.MyLinear"``) to register
            it without importing it.
        weight: name of its weight parameter.
        input_dim: dimension of the weight that multiplies input features (N:M groups and blocks
            run along it; Wanda's input norms are per index of it).
        output_dim: dimension of the weight that indexes outputs (``channel`` masks, per-channel
            quantization scales).
        all_prunable: include it in ``__ALL_PRUNABLE__``.
        quantizable: let QAT/PTQ quantize it. Its forward must use the ``weight`` attribute and
            take the layer input as its first argument; the int8 ONNX rewrite then handles it when
            it exports as a MatMul, Gemm or Conv.

    Returns:
        The registered kind (a re-registration replaces the earlier one).

    Raises:
        ValueError: ``input_dim`` equals ``output_dim``, either is negative, or ``weight`` is empty.

    Example::

        register_layer_kind(MyLinear, weight="kernel", input_dim=0, output_dim=1)
    """
    name = layer_type if isinstance(layer_type, str) else type_name(layer_type)
    if not isinstance(weight, str) or not weight:
        raise ValueError(f"`weight`={weight!r} is not allowed; give the weight parameter's name.")
    for field, value in (("input_dim", input_dim), ("output_dim", output_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{field}`={value!r} is not allowed; it must be an int >= 0.")
    if input_dim == output_dim:
        raise ValueError(
            f"`input_dim` and `output_dim` are both {input_dim}; they are two different "
            "dimensions of the weight."
        )
    kind = LayerKind(
        type_name=name,
        weight=weight,
        layout=Layout(input_dim, output_dim),
        all_prunable=bool(all_prunable),
        quantizable=bool(quantizable),
    )
    _KINDS[name] = kind
    return kind


def registered_kinds() -> dict[str, LayerKind]:
    """Every registered kind, by dotted type name."""
    return dict(_KINDS)


def layer_kind(layer_type: type) -> LayerKind | None:
    """The kind of ``layer_type`` or of its nearest registered base class; None if unknown."""
    for cls in layer_type.__mro__:
        kind = _KINDS.get(type_name(cls))
        if kind is not None:
            return kind
    return None


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``, if its type is known and its weight is a 2-D-or-larger parameter."""
    kind = layer_kind(type(module))
    if kind is None:
        return None
    weight = module._parameters.get(kind.weight)
    if not isinstance(weight, nn.Parameter) or weight.dim() <= max(kind.input_dim, kind.output_dim):
        return None
    return kind


def _weight_name(module_name: str, weight: str) -> str:
    return f"{module_name}.{weight}" if module_name else weight


def layer_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, LayerKind]]:
    """``(weight name, layer, kind)`` for every layer of a known kind, in ``named_modules`` order.

    Weight names are as in ``model.named_parameters()``. A parameter shared by two layers is
    reported once, under its first name, as ``named_parameters`` does.
    """
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        kind = kind_of(module)
        if kind is None:
            continue
        weight = module._parameters[kind.weight]
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        yield _weight_name(module_name, kind.weight), module, kind


def unknown_layer_weights(model: nn.Module) -> dict[str, str]:
    """2-D-or-larger parameters held by modules of no known kind: ``{name: dotted type name}``.

    These are left dense by ``__ALL_PRUNABLE__`` and never quantized; a user registers their type
    with :func:`register_layer_kind` to change that.
    """
    known = {id(module._parameters[kind.weight]) for _, module, kind in layer_weights(model)}
    found: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() < 2 or id(param) in known or id(param) in seen:
                continue
            seen.add(id(param))
            found[_weight_name(module_name, param_name)] = type_name(type(module))
    return found


register_layer_kind(nn.Linear)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_kind(_conv)
# Hugging Face's GPT-2 layers: y = x @ W + b with W laid out [in, out].
register_layer_kind("transformers.pytorch_utils.Conv1D", input_dim=0, output_dim=1)
register_layer_kind(nn.Embedding, input_dim=0, output_dim=1, all_prunable=False, quantizable=False)
