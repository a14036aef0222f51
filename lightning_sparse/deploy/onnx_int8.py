"""ONNX: export the float graph and rewrite a copy with the learned int8 numbers (QDQ)."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_sparse.core.fake_quant import LayerQuantizer, QuantizationError

# The int32 range of ONNX bias tensors.
_INT32 = (-(2**31), 2**31 - 1)

__all__ = [
    "ExportError",
    "OnnxLayerQuant",
    "call_model",
    "export_onnx",
    "flatten_inputs",
    "model_logits",
    "onnx_layer_quant",
    "quantize_onnx",
    "quiet_export",
    "rebuild_inputs",
]


class ExportError(RuntimeError):
    """A model cannot be exported to ONNX; the message names the module and the reason."""


_WRAPPER = "inner"


class _NamedInputs(nn.Module):
    """Calls ``inner`` with its input rebuilt from flat, named tensors (the ONNX graph's inputs)."""

    def __init__(self, inner: nn.Module, structure: Any) -> None:
        super().__init__()
        self.inner = inner
        self.structure = structure

    def forward(self, *leaves: torch.Tensor) -> Any:
        return call_model(self.inner, rebuild_inputs(self.structure, list(leaves)))


def call_model(model: nn.Module, inputs: Any) -> Any:
    """The model's logits for one input.

    A dict whose keys all name parameters of ``model.forward`` (a Hugging Face model's
    ``input_ids``, ``attention_mask``) is passed as keyword arguments; anything else as the one
    positional argument (``ClassificationModule`` takes the dict itself).
    """
    if isinstance(inputs, Mapping) and inputs:
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]
        if all(str(key) in parameters for key in inputs):
            return model_logits(model(**inputs))
    return model_logits(model(inputs))


def model_logits(output: Any) -> Any:
    """A model's logits: its output, or the ``logits`` of a Hugging Face ``ModelOutput``."""
    return getattr(output, "logits", output)


def flatten_inputs(inputs: Any, prefix: str = "") -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """A model input (a tensor, or dicts/lists/tuples of them) as named leaves and a structure.

    A dict's keys name its tensors (``input_ids``, ``attention_mask``); a lone tensor is
    ``input``; list and tuple items are numbered (``input_0``).

    Raises:
        ExportError: a leaf is not a tensor.
    """
    if isinstance(inputs, torch.Tensor):
        return "tensor", [(prefix or "input", inputs)]
    if isinstance(inputs, Mapping):
        structure: dict[str, Any] = {}
        leaves: list[tuple[str, torch.Tensor]] = []
        for key, value in inputs.items():
            sub, found = flatten_inputs(value, f"{prefix}_{key}" if prefix else str(key))
            structure[str(key)] = sub
            leaves += found
        return structure, leaves
    if isinstance(inputs, (list, tuple)):
        items = [flatten_inputs(v, f"{prefix or 'input'}_{i}") for i, v in enumerate(inputs)]
        return [s for s, _ in items], [leaf for _, found in items for leaf in found]
    raise ExportError(
        f"the model input holds a {type(inputs).__name__}; export takes tensors, or dicts, lists "
        "and tuples of tensors."
    )


def rebuild_inputs(structure: Any, leaves: list[torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_inputs` (consumes ``leaves`` from the front)."""
    if structure == "tensor":
        return leaves.pop(0)
    if isinstance(structure, dict):
        return {key: rebuild_inputs(sub, leaves) for key, sub in structure.items()}
    return [rebuild_inputs(sub, leaves) for sub in structure]


def _dynamic_axes(tensor: torch.Tensor) -> dict[int, str]:
    # Integer tensors of two or more dimensions are token ids and masks: [batch, sequence, ...].
    axes = {0: "batch"}
    if tensor.dim() >= 2 and not tensor.is_floating_point():
        axes[1] = "sequence"
    return axes


def _rename_initializers(proto: Any, prefix: str) -> None:
    """Drop ``prefix`` from every tensor name, so initializers keep their ``state_dict`` names."""

    def strip(name: str) -> str:
        return name[len(prefix) :] if name.startswith(prefix) else name

    graph = proto.graph
    for init in graph.initializer:
        init.name = strip(init.name)
    for node in graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = strip(name)
        for index, name in enumerate(node.output):
            node.output[index] = strip(name)
    for info in [*graph.input, *graph.output, *graph.value_info]:
        info.name = strip(info.name)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the ONNX exporter's prints and its optimizer's INFO logs; show them on error."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-5000:])
        raise
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model: nn.Module, example: Any) -> tuple[Any, Any]:
    """Export ``model`` with dynamic axes; return (optimized fp32 proto, unoptimized proto).

    ``example`` is one input of the model, kept as it is: int64 token ids stay int64, and each
    tensor of a dict (``{input_ids, attention_mask}``) becomes a graph input of that name. Every
    input's first axis is the dynamic ``batch``; integer inputs of two or more dimensions also get
    a dynamic ``sequence`` on the second. The output is ``logits``.

    The unoptimized graph keeps every parameter as an initializer under its ``state_dict`` name
    and BatchNormalization as its own node, which :func:`quantize_onnx` relies on; the optimized
    one (constant folding, Conv-BN fusion by onnxscript) is the fp32 deliverable.

    Raises:
        ExportError: the exporter failed; the message names the module and the exporter's reason.
    """
    structure, leaves = flatten_inputs(example)
    wrapper = _NamedInputs(model, structure)
    wrapper.train(model.training)
    try:
        # The dynamo exporter is the maintained one; the TorchScript exporter refuses int8 ranges
        # such as [-127, 127] and is deprecated.
        program = torch.onnx.export(
            wrapper,
            tuple(tensor for _, tensor in leaves),
            dynamo=True,
            # One entry for forward's *leaves: the axes of each leaf.
            dynamic_shapes=(tuple(_dynamic_axes(tensor) for _, tensor in leaves),),
            input_names=[name for name, _ in leaves],
            output_names=["logits"],
            optimize=False,
            verbose=False,
        )
    except Exception as err:
        raise ExportError(_export_failure(model, err)) from err
    assert program is not None
    base = program.model_proto
    _rename_initializers(base, f"{_WRAPPER}.")
    program.optimize()
    optimized = program.model_proto
    _rename_initializers(optimized, f"{_WRAPPER}.")
    return optimized, base


def _export_failure(model: nn.Module, err: Exception) -> str:
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
    inner = getattr(model, "model", None)
    backbone = (
        f" (backbone {type(inner).__module__}.{type(inner).__qualname__})"
        if isinstance(inner, nn.Module)
        else ""
    )
    return (
        f"cannot export {type(model).__module__}.{type(model).__qualname__}{backbone} to ONNX: "
        f"{reason[:600]}. The exporter traces forward() with torch.export: data-dependent Python "
        "control flow, non-tensor outputs and unsupported ops are the usual causes."
    )


@dataclass
class OnnxLayerQuant:
    """What :func:`quantize_onnx` needs about one quantized layer (numpy arrays).

    Attributes:
        weight: integer weight, int8, shaped like the parameter.
        weight_scale: float32, one per output channel or a single one.
        weight_zero_point: int8, same shape as ``weight_scale``.
        input_scale: float32 scalar.
        input_zero_point: uint8 scalar.
        symmetric: weights have zero point 0.
        axis: the weight's output dimension, along which the scales run (0: Conv/Linear,
            1: Conv1D).
    """

    weight: np.ndarray
    weight_scale: np.ndarray
    weight_zero_point: np.ndarray
    input_scale: np.ndarray
    input_zero_point: np.ndarray
    symmetric: bool
    axis: int = 0


def onnx_layer_quant(quantizer: LayerQuantizer) -> OnnxLayerQuant:
    """The numbers of one layer as ONNX wants them."""
    scale, zero_point = quantizer.input_qparams()
    return OnnxLayerQuant(
        weight=quantizer.integer_weight().cpu().numpy(),
        weight_scale=quantizer.weight_scale.detach().cpu().numpy().astype(np.float32),
        weight_zero_point=quantizer.weight_zero_point.cpu().numpy().astype(np.int8),
        input_scale=np.asarray(scale.item(), dtype=np.float32),
        input_zero_point=np.asarray(int(zero_point.item()), dtype=np.uint8),
        symmetric=quantizer.spec.symmetric,
        axis=quantizer.axis,
    )


_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def quantize_onnx(base: Any, layers: Mapping[str, OnnxLayerQuant]) -> Any:
    """A QDQ int8 copy of the unoptimized ``base`` graph, with ``layers``' learned scales.

    ``layers`` maps each quantized weight's parameter name (``model.fc1.weight``) to its numbers.
    Every use of that weight then reads DequantizeLinear(int8, scale, zero point, axis=the
    weight's output dimension: 0 for Conv/Linear, 1 for Conv1D's ``[in, out]``); a Linear's
    ``Transpose -> MatMul`` reads the integers stored transposed instead; its
    Conv/Gemm/MatMul reads its data input through QuantizeLinear -> DequantizeLinear (uint8); a
    float bias becomes int32 with scale ``input_scale * weight_scale`` (what the integer kernels
    accumulate in). A BatchNormalization fed only by a quantized Conv is folded into it: each
    output channel's factor ``gamma / sqrt(var + eps)`` multiplies that channel's scale, so the
    integers are those of training and the folding is exact.

    Raises:
        QuantizationError: a quantized weight is not an initializer of the graph, or feeds no
            Conv/Gemm/MatMul.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(base)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)

    def add_init(array: np.ndarray, name: str) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def drop_init(name: str) -> None:
        graph.initializer.remove(inits.pop(name))

    front: list[Any] = []  # DequantizeLinear of constants: no inputs, so they may come first
    before: dict[int, list[Any]] = {}  # id(node) -> nodes to insert right before it
    removed: set[int] = set()
    renamed: dict[str, str] = {}
    for weight_name, quant in layers.items():
        if weight_name not in inits:
            raise QuantizationError(
                f"the ONNX graph has no initializer {weight_name!r}; cannot quantize that layer "
                f"(initializers: {sorted(inits)[:10]}...)."
            )
        users = [
            node
            for user in consumers.get(weight_name, [])
            for node in (
                [user] if user.op_type != "Transpose" else consumers.get(user.output[0], [])
            )
            if node.op_type in _COMPUTE_OPS
        ]
        if not users:
            raise QuantizationError(f"{weight_name!r} feeds no Conv/Gemm/MatMul in the ONNX graph.")
        float_weight = numpy_helper.to_array(inits[weight_name])
        int_weight = quant.weight.astype(np.int8)
        axis = quant.axis
        scale = np.broadcast_to(quant.weight_scale, (int_weight.shape[axis],)).astype(np.float32)
        zero_point = np.broadcast_to(quant.weight_zero_point, scale.shape).astype(np.int8)
        # nn.Linear on a sequence exports as MatMul(x, Transpose(W)): store the integers
        # transposed and let the MatMul read them directly (scales along the other axis), since
        # ONNX Runtime fuses MatMul into an integer kernel only when a DequantizeLinear feeds it.
        dequantized = weight_name
        readers = consumers.get(weight_name, [])
        transpose = readers[0] if len(readers) == 1 else None
        if (
            transpose is not None
            and transpose.op_type == "Transpose"
            and int_weight.ndim == 2
            and all(n.op_type == "MatMul" for n in consumers.get(transpose.output[0], []))
        ):
            int_weight, float_weight = int_weight.T.copy(), float_weight.T.copy()
            axis = 1 - axis
            dequantized = transpose.output[0]
            removed.add(id(transpose))
        bias_name: str | None = None
        conv = users[0] if len(users) == 1 and users[0].input[1] == dequantized else None
        if conv is not None and len(conv.input) > 2 and conv.input[2] in inits:
            bias_name = conv.input[2]
        bias = numpy_helper.to_array(inits[bias_name]) if bias_name else None
        # Conv-BN folding: only where the Conv's output goes to the BN alone.
        if conv is not None and conv.op_type == "Conv":
            next_nodes = consumers.get(conv.output[0], [])
            bn = next_nodes[0] if len(next_nodes) == 1 else None
            if (
                bn is not None
                and bn.op_type == "BatchNormalization"
                and len(bn.output) == 1
                and all(name in inits for name in bn.input[1:5])
            ):
                gamma, beta, mean, var = (numpy_helper.to_array(inits[n]) for n in bn.input[1:5])
                eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
                factor = (gamma / np.sqrt(var + eps)).astype(np.float32)
                sign = np.where(factor < 0, -1, 1).astype(np.int8)
                # Flipping the sign of -128 would overflow int8: leave such a BN unfolded.
                foldable = quant.symmetric or bool((sign > 0).all())
                if foldable:
                    shape = (-1,) + (1,) * (int_weight.ndim - 1)
                    int_weight = int_weight * sign.reshape(shape)
                    zero_point = zero_point * sign
                    scale = (scale * np.abs(factor)).astype(np.float32)
                    base_bias = bias if bias is not None else np.zeros_like(mean)
                    bias = ((base_bias - mean) * factor + beta).astype(np.float32)
                    if bias_name is None:
                        # The bias step below writes this new input's value.
                        bias_name = f"{weight_name}.folded_bias"
                        if len(conv.input) > 2:  # an empty name stands for "no bias"
                            conv.input[2] = bias_name
                        else:
                            conv.input.append(bias_name)
                    renamed[conv.output[0]] = bn.output[0]
                    removed.add(id(bn))
        if int_weight.shape != float_weight.shape:
            raise QuantizationError(
                f"{weight_name!r}: integer weight shape {list(int_weight.shape)} does not match "
                f"the graph's {list(float_weight.shape)}."
            )
        drop_init(weight_name)
        q_name, s_name, z_name = (
            f"{weight_name}_{s}" for s in ("quantized", "scale", "zero_point")
        )
        add_init(int_weight.astype(np.int8), q_name)
        add_init(scale, s_name)
        add_init(zero_point.astype(np.int8), z_name)
        front.append(
            helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dequantized], axis=axis)
        )
        for index, user in enumerate(users):
            source = user.input[0]
            prefix = f"{weight_name}_input" + (str(index) if len(users) > 1 else "")
            xs = add_init(quant.input_scale.astype(np.float32), f"{prefix}_scale")
            xz = add_init(quant.input_zero_point.astype(np.uint8), f"{prefix}_zero_point")
            before.setdefault(id(user), []).extend(
                [
                    helper.make_node("QuantizeLinear", [source, xs, xz], [f"{prefix}_q"]),
                    helper.make_node("DequantizeLinear", [f"{prefix}_q", xs, xz], [f"{prefix}_dq"]),
                ]
            )
            user.input[0] = f"{prefix}_dq"
        if bias_name is not None and bias is not None and conv is not None:
            bias_scale = (scale * quant.input_scale).astype(np.float32)
            int_bias = np.round(bias / bias_scale)
            if bias_name in inits:
                drop_init(bias_name)
            if int_bias.min() >= _INT32[0] and int_bias.max() <= _INT32[1]:
                bq, bs, bz = (f"{bias_name}_{s}" for s in ("quantized", "scale", "zero_point"))
                add_init(int_bias.astype(np.int32), bq)
                add_init(bias_scale, bs)
                add_init(np.zeros_like(int_bias, dtype=np.int32), bz)
                front.append(
                    helper.make_node("DequantizeLinear", [bq, bs, bz], [bias_name], axis=0)
                )
            else:
                # A bias too large for int32 at this scale (a channel whose weights are all
                # pruned): keep it float; ONNX Runtime then leaves this layer unfused.
                add_init(bias.astype(np.float32), bias_name)

    nodes: list[Any] = list(front)
    for node in graph.node:
        if id(node) in removed:
            continue
        nodes.extend(before.get(id(node), []))
        for index, output in enumerate(node.output):
            if output in renamed:
                node.output[index] = renamed[output]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    # Drop initializers no node reads any more (the folded BN's parameters).
    used = {tensor for node in graph.node for tensor in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    onnx.checker.check_model(model)
    return model
