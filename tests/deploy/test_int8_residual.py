"""int8 on residual and mobile networks: every Conv of ResNet-18 and MobileNetV3-small runs on
ONNX Runtime's integer kernels (residual Adds, squeeze-excitation Muls and HardSwish between them
quantized), and the int8 logits stay close to the float model's."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sparse.deploy.export import export_model
from lightning_sparse.models import mobilenet_v3_small, resnet18
from lightning_sparse.module import ClassificationModule
from lightning_sparse.posttrain.ptq import ptq_calibrate

# mnist5k's shape, as conf/model's resnet18 and mobilenet_v3_small see it.
SHAPE = (1, 28, 28)


def _images(count: int, seed: int) -> torch.Tensor:
    """Images with some structure (blurred noise of varying brightness), not flat noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, *SHAPE, generator=generator)
    blurred = nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)
    return blurred * torch.rand(count, 1, 1, 1, generator=generator) * 2


def _quantized(build: Callable[..., nn.Module]) -> ClassificationModule:
    """Random weights, BatchNorm statistics of real activations, then PTQ-calibrated."""
    torch.manual_seed(0)
    module = ClassificationModule(build(num_classes=10, in_channels=SHAPE[0]), num_classes=10)
    calibration = _images(32, seed=1)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                layer.momentum = None  # the running statistics become those of this batch
        module.train()
        module(calibration)
    module.eval()
    ptq_calibrate(module, [(calibration, torch.zeros(32, dtype=torch.long))])
    return module


def _optimized_ops(path: str, out: Path) -> Counter[str]:
    """Op types of the graph ONNX Runtime runs (extended optimizations: QDQ fusion)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(out)).graph.node)


def _logits(path: str, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": images.numpy()})[0])


@pytest.mark.parametrize(
    "build",
    [
        # ResNet-18's export alone takes about 20 s on a 2-core machine.
        pytest.param(resnet18, id="resnet18", marks=pytest.mark.slow),
        pytest.param(mobilenet_v3_small, id="mobilenet_v3_small"),
    ],
)
def test_every_conv_runs_as_an_integer_kernel_and_logits_stay_close(
    build: Callable[..., nn.Module], tmp_path: Path
) -> None:
    module = _quantized(build)
    convs = sum(isinstance(layer, nn.Conv2d) for layer in module.modules())
    summary = export_model(
        module, _images(32, seed=2), tmp_path / "export", batch_size=2, latency_runs=1
    )
    ops = _optimized_ops(summary["onnx_int8_path"], tmp_path / "optimized.onnx")
    assert ops["Conv"] == 0, ops
    assert ops["FusedConv"] == 0, ops
    assert ops["QLinearConv"] == convs
    residual_adds = 8 if build is resnet18 else 6
    assert ops["QLinearAdd"] == residual_adds
    if build is mobilenet_v3_small:
        assert ops["QLinearMul"] == 9  # the squeeze-excitation products
    # Images the int8 ranges were not calibrated on.
    images = _images(64, seed=3)
    int8 = _logits(summary["onnx_int8_path"], images)
    fp32 = _logits(summary["onnx_fp32_path"], images)
    with torch.no_grad():
        fake_quant = module(images).numpy()
    # Random weights give logits close together, so argmax flips easily; the bound on the error
    # is relative to how far the logits spread over the batch.
    spread = np.abs(fp32 - fp32.mean(0)).max()
    assert np.abs(int8 - fake_quant).max() <= 0.3 * spread
    assert (int8.argmax(1) == fake_quant.argmax(1)).mean() >= 0.75
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.75
