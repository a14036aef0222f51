from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lightning_sparse.core.fake_quant import (
    QuantizationError,
    QuantizedModel,
    QuantSpec,
    install,
    quantized_layers,
    restore,
)
from lightning_sparse.deploy.onnx_int8 import export_onnx, onnx_layer_quant, quantize_onnx
from lightning_sparse.deploy.ort import OrtModel, interleaved_latency_ms
from tests.helpers import TinyNet


class ConvBNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Linear: the Conv-BN folding case."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(torch.relu(self.bn1(self.conv1(x))).flatten(1))


def _pruned_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        for layer in (net.conv1, net.fc1, net.fc2):
            layer.weight[torch.rand_like(layer.weight) < 0.7] = 0.0
    return net


def _calibrate(handle: QuantizedModel, model: nn.Module, batches: int = 3) -> None:
    generator = torch.Generator().manual_seed(1)
    model.eval()
    with torch.no_grad(), handle.calibrating():
        for _ in range(batches):
            model(torch.randn(16, 4, 4, 4, generator=generator))
    handle.set_phase(fake_quant=True, observe=False)


@pytest.mark.parametrize(
    ("num_bits", "symmetric", "per_channel"),
    list(itertools.product([8, 4], [True, False], [True, False])),
)
def test_zeros_survive_and_integers_reproduce_the_fake_quantized_weight(
    num_bits: int, symmetric: bool, per_channel: bool
) -> None:
    net = _pruned_net()
    spec = QuantSpec(num_bits=num_bits, symmetric=symmetric, per_channel=per_channel)
    handle = install(net, ["conv1", "fc1", "fc2"], spec)
    _calibrate(handle, net)
    qmin, qmax = spec.weight_qrange
    for name, quantizer in handle.layers.items():
        weight = quantizer.module.weight.detach()
        fake = quantizer.quantize_weight(weight)
        assert (fake[weight == 0] == 0).all(), name  # a pruned zero stays exactly zero
        ints = quantizer.integer_weight().to(torch.int32)
        assert ints.min() >= qmin
        assert ints.max() <= qmax
        column = (-1,) + (1,) * (weight.dim() - 1)
        rebuilt = (ints - quantizer.weight_zero_point.reshape(column)).float()
        assert torch.equal(rebuilt * quantizer.weight_scale.reshape(column), fake), name
        expected_channels = weight.shape[0] if per_channel else 1
        assert quantizer.weight_scale.shape == (expected_channels,)


def test_install_keeps_parameter_names_types_and_the_state_dict() -> None:
    net = _pruned_net()
    keys = list(net.state_dict())
    kinds = {name: type(m) for name, m in net.named_modules()}
    handle = install(net, ["conv1", "fc1"], QuantSpec())
    _calibrate(handle, net)
    assert list(net.state_dict()) == keys
    assert {name: type(m) for name, m in net.named_modules()} == kinds
    TinyNet().load_state_dict(net.state_dict(), strict=True)
    assert set(quantized_layers(net)) == {"conv1", "fc1"}
    handle.remove()
    assert quantized_layers(net) == {}


def test_fake_quant_off_is_the_float_model_and_on_changes_it() -> None:
    net = _pruned_net()
    x = torch.randn(8, 4, 4, 4)
    reference = net(x)
    handle = install(net, ["conv1", "fc1", "fc2"], QuantSpec())
    assert torch.equal(net(x), reference)
    _calibrate(handle, net)
    quantized = net(x)
    assert not torch.equal(quantized, reference)
    assert torch.allclose(quantized, reference, atol=0.05)
    with handle.disabled():
        assert torch.equal(net(x), reference)


def test_state_round_trips_exactly_through_a_weights_only_load() -> None:
    net = _pruned_net()
    handle = install(net, ["conv1", "fc1", "fc2"], QuantSpec(symmetric=False))
    _calibrate(handle, net)
    buffer = io.BytesIO()
    torch.save(handle.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = _pruned_net()
    restored = restore(other, state)
    assert restored.fake_quant_enabled
    assert not restored.observer_enabled
    for name, quantizer in handle.layers.items():
        for key, value in quantizer.state_dict().items():
            saved = restored.layers[name].state_dict()[key]
            assert torch.equal(value, saved) if isinstance(value, torch.Tensor) else value == saved
    x = torch.randn(8, 4, 4, 4)
    assert torch.equal(net.eval()(x), other.eval()(x))


def test_moving_average_and_running_minmax_observers() -> None:
    net = TinyNet()
    handle = install(net, ["conv1"], QuantSpec())
    quantizer = handle.layers["conv1"]
    handle.set_phase(fake_quant=False, observe=True)
    net.train()
    net(torch.full((2, 4, 4, 4), 2.0))
    net(torch.full((2, 4, 4, 4), -1.0))
    # the first batch initializes, later ones move the range by 1%
    assert quantizer.input_max.item() == pytest.approx(2.0 + 0.01 * (-1.0 - 2.0))
    assert quantizer.input_min.item() == pytest.approx(2.0 + 0.01 * (-1.0 - 2.0))
    net.eval()
    net(torch.full((2, 4, 4, 4), 100.0))  # eval batches are not observed
    assert quantizer.input_max.item() < 3
    with handle.calibrating():
        net(torch.full((2, 4, 4, 4), 5.0))
        net(torch.full((2, 4, 4, 4), -4.0))
    assert (quantizer.input_min.item(), quantizer.input_max.item()) == pytest.approx((-4.0, 5.0))


def test_observer_sync_averages_ranges() -> None:
    net = TinyNet()
    handle = install(net, ["conv1", "fc1"], QuantSpec())
    _calibrate(handle, net)
    before = [t.clone() for t in handle.observer_tensors()]
    handle.sync_observers(lambda t: t * 0.5)
    assert all(
        torch.equal(a * 0.5, b) for a, b in zip(before, handle.observer_tensors(), strict=True)
    )


def test_a_layer_cannot_be_quantized_twice() -> None:
    net = TinyNet()
    install(net, ["fc1"], QuantSpec())
    with pytest.raises(QuantizationError, match="layer 'fc1' is quantized already"):
        install(net, ["fc1"], QuantSpec())


def test_only_conv_and_linear_layers_can_be_quantized() -> None:
    with pytest.raises(
        QuantizationError,
        match=r"'bn1' \(torch.nn.modules.batchnorm.BatchNorm2d\) is not a quantizable layer",
    ):
        install(ConvBNNet(), ["bn1"], QuantSpec())


def test_fake_quant_before_any_observation_is_an_error() -> None:
    net = TinyNet()
    handle = install(net, ["fc1"], QuantSpec())
    handle.set_phase(fake_quant=True, observe=False)
    with pytest.raises(QuantizationError, match="layer 'fc1': fake quantization is on but"):
        net(torch.randn(2, 4, 4, 4))


def test_a_state_for_other_layers_is_refused() -> None:
    net = TinyNet()
    handle = install(net, ["fc1"], QuantSpec())
    other = install(TinyNet(), ["fc2"], QuantSpec())
    with pytest.raises(QuantizationError, match=r"covers layers \['fc2'\].*quantizes \['fc1'\]"):
        handle.load_state_dict(other.state_dict())
    with pytest.raises(QuantizationError, match=r"not a lightning_sparse\.quantization state"):
        handle.load_state_dict({"layers": {}})


def _int8_onnx(model: nn.Module, handle: QuantizedModel, path: Path) -> None:
    example = torch.randn(2, 4, 4, 4)
    with handle.disabled():
        _, base = export_onnx(model.eval(), example)
    numbers = {f"{name}.weight": onnx_layer_quant(q) for name, q in handle.layers.items()}
    onnx.save(quantize_onnx(base, numbers), str(path))


@pytest.mark.parametrize(("symmetric", "bias"), [(True, True), (False, True), (True, False)])
def test_int8_onnx_with_conv_bn_folding_computes_what_fake_quant_computes(
    tmp_path: Path, symmetric: bool, bias: bool
) -> None:
    torch.manual_seed(0)
    net = ConvBNNet(bias=bias)
    with torch.no_grad():  # trained-looking BN statistics, one negative scale to fold
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.weight[0] = -0.8
        net.bn1.bias.uniform_(-0.2, 0.2)
    handle = install(net, ["conv1", "fc1"], QuantSpec(symmetric=symmetric))
    _calibrate(handle, net)
    path = tmp_path / "int8.onnx"
    _int8_onnx(net, handle, path)
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == 2
    assert ("BatchNormalization" not in ops) == symmetric  # affine with gamma < 0 stays unfolded
    x = torch.randn(64, 4, 4, 4)
    expected = net(x).detach().numpy()
    got = OrtModel(path)(x.numpy())
    # the same integers and scales; only float rounding order differs
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95


def test_onnx_runtime_runs_the_int8_graph_on_integer_kernels(tmp_path: Path) -> None:
    net = _pruned_net()
    handle = install(net, ["conv1", "fc1", "fc2"], QuantSpec())
    _calibrate(handle, net)
    path = tmp_path / "int8.onnx"
    _int8_onnx(net, handle, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {"QLinearConv", "QGemm"} <= ops
    assert "Conv" not in ops
    assert "Gemm" not in ops


def test_interleaved_latency_reports_a_median_per_model() -> None:
    calls: list[str] = []
    models = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    latency = interleaved_latency_ms(models, np.zeros(1), runs=3, warmup=1)
    assert set(latency) == {"a", "b"}
    assert all(v >= 0 for v in latency.values())
    assert calls == ["a", "b"] * 4  # round-robin, warm-up included
