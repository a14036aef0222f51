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
    "activation_tensors",
    "call_model",
    "export_onnx",
    "flatten_inputs",
    "model_logits",
    "onnx_layer_quant",
    "quantize_activations",
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

    # DequantizeLinear of constants and QuantizeLinear of graph inputs may come first.
    front: list[Any] = []
    after: dict[str, list[Any]] = {}  # tensor -> nodes to insert right after the node making it
    shared: dict[tuple[str, bytes, bytes], str] = {}  # (tensor, scale, zero point) -> its DQ
    graph_inputs = {graph_input.name for graph_input in graph.input}
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
            # Layers that read one tensor with the same numbers (a block's input read by its conv
            # and its shortcut conv observe the same values) share one QuantizeLinear: ONNX
            # Runtime folds a ReLU into a QuantizeLinear, or fuses an Add with it, only when that
            # is its sole reader.
            key = (source, quant.input_scale.tobytes(), quant.input_zero_point.tobytes())
            if key in shared:
                user.input[0] = shared[key]
                continue
            prefix = f"{weight_name}_input" + (str(index) if len(users) > 1 else "")
            xs = add_init(quant.input_scale.astype(np.float32), f"{prefix}_scale")
            xz = add_init(quant.input_zero_point.astype(np.uint8), f"{prefix}_zero_point")
            # Right after the tensor is made (not before this reader), so every reader sharing it
            # comes later in the node order.
            (after.setdefault(source, []) if source not in graph_inputs else front).extend(
                [
                    helper.make_node("QuantizeLinear", [source, xs, xz], [f"{prefix}_q"]),
                    helper.make_node("DequantizeLinear", [f"{prefix}_q", xs, xz], [f"{prefix}_dq"]),
                ]
            )
            user.input[0] = shared[key] = f"{prefix}_dq"
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
        for index, output in enumerate(node.output):
            if output in renamed:
                node.output[index] = renamed[output]
        nodes.append(node)
        for output in node.output:
            nodes.extend(after.get(output, []))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    onnx.checker.check_model(model)
    return model


def _drop_unused(graph: Any) -> None:
    """Remove nodes whose outputs nothing reads (the shape arithmetic of a folded BN, which ONNX
    Runtime would otherwise run on every call), then initializers no node reads."""
    needed = {output.name for output in graph.output}
    kept: list[Any] = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(node.input)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(reversed(kept))
    used = {tensor for node in graph.node for tensor in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


# Ops that ONNX Runtime runs on uint8 (QLinearAdd, QLinearMul, QLinearConcat) when every input
# comes from a DequantizeLinear and a QuantizeLinear reads the output: residual additions,
# squeeze-excitation products, concatenated branches.
_JOIN_OPS = frozenset({"Add", "Mul", "Concat"})
# One-input ops whose output belongs to the quantized part of the network when their input does
# (activations, pooling, reshaping): a join of such tensors is quantized too.
_PASS_OPS = frozenset(
    {
        "Relu",
        "Clip",
        "LeakyRelu",
        "HardSwish",
        "HardSigmoid",
        "Sigmoid",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "ReduceMean",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Identity",
    }
)
# Ops through which ONNX Runtime moves a QuantizeLinear up to the op that makes the tensor (or
# folds them into it): a Conv whose output reaches QuantizeLinear through these is fused already.
_SEE_THROUGH = frozenset(
    {"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
)
# Activations a QuantizeLinear absorbs when its range starts at 0: the output is quantized after
# them, so their clamp costs nothing and no range is spent on negatives.
_ABSORBED = frozenset({"Relu", "Clip"})


@dataclass
class _ActivationPlan:
    """Which float tensors of a QDQ graph to quantize so that every int8 Conv fuses."""

    quantize: list[str]  # every reader but a QuantizeLinear reads a DequantizeLinear of these
    learned: dict[str, str]  # tensor -> the DequantizeLinear of its learned (layer input) numbers
    dequantized: set[str]  # tensors a DequantizeLinear makes: nothing to do

    @property
    def to_calibrate(self) -> list[str]:
        return [t for t in self.quantize if t not in self.learned and t not in self.dequantized]


def _activation_plan(graph: Any) -> _ActivationPlan:
    constants = {init.name for init in graph.initializer} | {
        output for node in graph.node if node.op_type == "Constant" for output in node.output
    }
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    learned: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            for reader in consumers.get(node.output[0], []):
                if reader.op_type == "DequantizeLinear":
                    learned.setdefault(node.input[0], reader.output[0])
    # Tensors in the quantized part of the network, in node (topological) order.
    inside = set(learned) | dequantized
    quantize: list[str] = []
    ends: list[str] = []  # outputs of int8 Conv and joins: they must reach a QuantizeLinear
    for node in graph.node:
        if node.op_type == "Conv" and node.input[0] in dequantized and node.input[1] in dequantized:
            inside.add(node.output[0])
            ends.append(node.output[0])
        elif node.op_type in _PASS_OPS and node.input and node.input[0] in inside:
            inside.add(node.output[0])
        elif node.op_type in _JOIN_OPS:
            data = [tensor for tensor in node.input if tensor]
            # A join with a constant (x * 0.5, x + 3) stays float: its constant has no learned
            # range, and ONNX Runtime handles such a node as a one-input float op anyway.
            if data and all(t in inside and t not in constants for t in data):
                quantize.extend(data)
                inside.add(node.output[0])
                ends.append(node.output[0])
    chosen = set(quantize)

    def reaches_quantize(tensor: str) -> bool:
        readers = consumers.get(tensor, [])
        return bool(readers) and all(
            reader.op_type == "QuantizeLinear"
            or (reader.op_type in _SEE_THROUGH and reaches_quantize(reader.output[0]))
            for reader in readers
        )

    outputs = {output.name for output in graph.output}
    for tensor in ends:
        readers = consumers.get(tensor, [])
        if len(readers) == 1 and readers[0].op_type in _ABSORBED:
            tensor = readers[0].output[0]
        if tensor not in chosen and tensor not in outputs and not reaches_quantize(tensor):
            quantize.append(tensor)
            chosen.add(tensor)
    return _ActivationPlan(list(dict.fromkeys(quantize)), learned, dequantized)


def activation_tensors(model: Any) -> list[str]:
    """Float tensors of a :func:`quantize_onnx` graph that need a calibrated range.

    These are what stands between an int8 Conv and ONNX Runtime's integer kernels: a Conv's
    output that reaches no QuantizeLinear (it goes to a residual Add, a Concat, a HardSwish), and
    the inputs of Add/Mul/Concat nodes whose every input comes from the quantized part of the
    network. A tensor that already has learned numbers (the input of a quantized layer) needs no
    range: its DequantizeLinear is reused. Give their ranges to :func:`quantize_activations`.
    """
    return _activation_plan(model.graph).to_calibrate


def quantize_activations(model: Any, ranges: Mapping[str, tuple[float, float]]) -> Any:
    """A copy of a :func:`quantize_onnx` graph where every int8 Conv can run on integers.

    Each tensor of the plan (see :func:`activation_tensors`) is read through QuantizeLinear ->
    DequantizeLinear (uint8, affine, its ``ranges`` entry widened to include 0, as layer inputs
    are), or through the DequantizeLinear of the learned numbers it already has. ONNX Runtime then
    fuses every such Conv into QLinearConv and each quantized join into QLinearAdd / QLinearMul /
    QLinearConcat; a float op between them (HardSwish) reads and writes int8 through Q/DQ.

    Written here rather than with ``onnxruntime.quantization.quantize_static``: that tool derives
    every scale itself (weights and layer inputs included, and it adjusts weight scales for int32
    biases), quantizes every op of a type (a transformer's attention-mask Add too) and needs the
    BatchNormalization folded before it runs, while the scales here must stay those QAT learned,
    folded exactly with BN; only the joins and Conv outputs QAT does not observe are calibrated.

    Raises:
        QuantizationError: a tensor of the plan has no entry in ``ranges``.
    """
    import onnx
    from onnx import helper, numpy_helper

    from lightning_sparse.core.fake_quant import activation_qparams

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    plan = _activation_plan(graph)
    missing = [t for t in plan.to_calibrate if t not in ranges]
    if missing:
        raise QuantizationError(f"no calibrated range for the activations {missing[:5]}.")
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    graph_inputs = {graph_input.name for graph_input in graph.input}
    front: list[Any] = []
    after: dict[str, list[Any]] = {}
    for index, tensor in enumerate(plan.quantize):
        if tensor in plan.dequantized:
            continue
        readers = [r for r in consumers.get(tensor, []) if r.op_type != "QuantizeLinear"]
        dq = plan.learned.get(tensor)
        if dq is None:
            scale, zero_point = activation_qparams(*ranges[tensor])
            prefix = f"activation{index}"
            names = (f"{prefix}_scale", f"{prefix}_zero_point", f"{prefix}_q", f"{prefix}_dq")
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(scale, np.float32), names[0])
            )
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(zero_point, np.uint8), names[1])
            )
            (after.setdefault(tensor, []) if tensor not in graph_inputs else front).extend(
                [
                    helper.make_node("QuantizeLinear", [tensor, names[0], names[1]], [names[2]]),
                    helper.make_node("DequantizeLinear", [names[2], *names[:2]], [names[3]]),
                ]
            )
            dq = names[3]
        for reader in readers:
            for position, name in enumerate(reader.input):
                if name == tensor:
                    reader.input[position] = dq
    nodes: list[Any] = list(front)
    for node in graph.node:
        nodes.append(node)
        for output in node.output:
            nodes.extend(after.get(output, []))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out
