"""ONNX: export the float graph and rewrite a copy with the learned int8 numbers (QDQ)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_sparse.core.fake_quant import LayerQuantizer, QuantizationError

# The int32 range of ONNX bias tensors.
_INT32 = (-(2**31), 2**31 - 1)

__all__ = [
    "OnnxLayerQuant",
    "export_onnx",
    "onnx_layer_quant",
    "quantize_onnx",
]


def export_onnx(model: nn.Module, example: torch.Tensor) -> tuple[Any, Any]:
    """Export ``model`` with a dynamic batch; return (optimized fp32 proto, unoptimized proto).

    The unoptimized graph keeps every parameter as an initializer under its ``state_dict`` name
    and BatchNormalization as its own node, which :func:`quantize_onnx` relies on; the optimized
    one (constant folding, Conv-BN fusion by onnxscript) is the fp32 deliverable.
    """
    # The dynamo exporter is the maintained one; the TorchScript exporter refuses int8 ranges
    # such as [-127, 127] and is deprecated.
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=({0: "batch"},),
        optimize=False,
        verbose=False,
    )
    assert program is not None
    base = program.model_proto
    program.optimize()
    return program.model_proto, base


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
    """

    weight: np.ndarray
    weight_scale: np.ndarray
    weight_zero_point: np.ndarray
    input_scale: np.ndarray
    input_zero_point: np.ndarray
    symmetric: bool


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
    )


_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def quantize_onnx(base: Any, layers: Mapping[str, OnnxLayerQuant]) -> Any:
    """A QDQ int8 copy of the unoptimized ``base`` graph, with ``layers``' learned scales.

    ``layers`` maps each quantized weight's parameter name (``model.fc1.weight``) to its numbers.
    Every use of that weight then reads DequantizeLinear(int8, scale, zero point, axis=0); its
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
        scale = np.broadcast_to(quant.weight_scale, (int_weight.shape[0],)).astype(np.float32)
        zero_point = np.broadcast_to(quant.weight_zero_point, scale.shape).astype(np.int8)
        bias_name: str | None = None
        conv = users[0] if len(users) == 1 and users[0].input[1] == weight_name else None
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
            helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [weight_name], axis=0)
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
