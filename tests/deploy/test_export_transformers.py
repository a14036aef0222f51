"""Export of token models: int64 ids, dict inputs, dynamic axes, and int8 on integer kernels."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_sparse.callbacks.quantization import select_layers
from lightning_sparse.core.fake_quant import QuantSpec, install
from lightning_sparse.data import SyntheticTextDataModule
from lightning_sparse.deploy.export import ExportError, export_model
from lightning_sparse.module import ClassificationModule
from tests.helpers import quiet_trainer

transformers_models = pytest.importorskip("lightning_sparse.models.transformers")
pytest.importorskip("transformers")

BUILDERS = {"bert": transformers_models.bert_tiny, "gpt2": transformers_models.gpt2_tiny}


def _data(**kwargs: Any) -> SyntheticTextDataModule:
    settings: dict[str, Any] = {"train_size": 512, "val_size": 64, "test_size": 128}
    return SyntheticTextDataModule(**{**settings, **kwargs})


def _module(kind: str) -> ClassificationModule:
    torch.manual_seed(0)
    backbone = BUILDERS[kind](num_classes=4, vocab_size=100, hidden_size=32, max_positions=32)
    return ClassificationModule(backbone, num_classes=4, lr=3e-3, optimizer="adamw")


def _ops(path: str, tmp_path: Path) -> collections.Counter[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    )


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_token_ids_stay_int64_and_dict_inputs_are_named_with_dynamic_axes(
    kind: str, tmp_path: Path
) -> None:
    module = _module(kind)
    data = _data()
    summary = export_model(module, data, tmp_path / "export", latency_runs=1, batch_size=4)
    graph = onnx.load(summary["onnx_fp32_path"]).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor_type.shape.dim] == ["batch", "sequence"]
    # another batch size and sequence length than the export's, with padding
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[0, 5:] = 0
    session = ort.InferenceSession(summary["onnx_fp32_path"], providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    module.eval()
    with torch.no_grad():
        expected = module({"input_ids": ids, "attention_mask": mask}).numpy()
    assert logits.shape == (3, 9, 4)
    assert np.abs(logits - expected).max() < 1e-4
    assert summary["onnx_fp32_acc"] is not None
    assert summary["onnx_fp32_max_abs_diff"] < 1e-4


def test_export_takes_a_dataloader_or_an_example_input(tmp_path: Path) -> None:
    module = _module("bert")
    data = _data()
    data.setup()
    loader = DataLoader(data.test_set, batch_size=16)  # type: ignore[arg-type]
    from_loader = export_model(module, loader, tmp_path / "a", latency_runs=1, batch_size=4)
    from_module = export_model(module, data, tmp_path / "b", latency_runs=1, batch_size=4)
    assert from_loader["onnx_fp32_acc"] == pytest.approx(from_module["onnx_fp32_acc"])
    example = {"input_ids": torch.randint(1, 100, (1, 12)), "attention_mask": torch.ones(1, 12)}
    example["attention_mask"] = example["attention_mask"].long()
    from_example = export_model(module, example, tmp_path / "c", latency_runs=1, batch_size=4)
    assert from_example["onnx_fp32_acc"] is None
    assert from_example["ort_fp32_ms"] > 0


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


def test_a_model_that_cannot_be_exported_gets_our_error(tmp_path: Path) -> None:
    module = ClassificationModule(_Unexportable(), num_classes=2)
    with pytest.raises(
        ExportError, match=r"cannot export lightning_sparse.module.Classification"
    ) as err:
        export_model(module, torch.randn(2, 4), tmp_path / "e", latency_runs=1)
    assert f"{__name__}._Unexportable" in str(err.value)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(("kind", "kernel"), [("bert", "MatMulIntegerToFloat"), ("gpt2", "QGemm")])
def test_int8_onnx_runs_on_integer_kernels_within_half_a_point(
    kind: str, kernel: str, tmp_path: Path
) -> None:
    pl.seed_everything(0)
    module = _module(kind)
    data = _data()
    quiet_trainer(max_epochs=3).fit(module, datamodule=data)
    layers = select_layers(module)
    handle = install(module, layers, QuantSpec())
    module.eval()
    with torch.no_grad(), handle.calibrating():
        for index, (inputs, _) in enumerate(data.train_dataloader()):
            module(inputs)
            if index == 7:
                break
    handle.set_phase(fake_quant=True, observe=False)
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in data.test_dataloader():
            counted = labels != -100
            correct += int(((module(inputs).argmax(-1) == labels) & counted).sum())
            total += int(counted.sum())
    summary = export_model(module, data, tmp_path / "export", latency_runs=1, batch_size=4)
    assert summary["onnx_int8_agreement"] > 0.99
    assert abs(summary["onnx_int8_acc"] - correct / total) <= 0.005
    ops = _ops(summary["onnx_int8_path"], tmp_path)
    # every quantized projection runs on an integer kernel; only the attention products
    # (activation x activation, two per layer) stay float
    assert ops[kernel] + ops["MatMulIntegerToFloat" if kernel == "QGemm" else "QGemm"] == len(
        layers
    )
    assert ops["MatMul"] + ops["Gemm"] == 4


def test_a_plain_hugging_face_model_exports_its_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers_models.gpt2_tiny(num_classes=3, hidden_size=32, max_positions=32)
    example = {"input_ids": torch.randint(1, 100, (2, 7))}
    summary = export_model(model, example, tmp_path / "e", latency_runs=1, batch_size=2)
    session = ort.InferenceSession(summary["onnx_fp32_path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    (logits,) = session.run(None, {"input_ids": np.ones((1, 5), dtype=np.int64)})
    assert logits.shape == (1, 5, 3)


def test_compressed_round_trip_of_a_quantized_gpt2_keeps_conv1d_columns(tmp_path: Path) -> None:
    from lightning_sparse.deploy.compressed import load_compressed, save_compressed

    module = _module("gpt2")
    handle = install(module, select_layers(module), QuantSpec(symmetric=False))
    data = _data()
    data.setup()
    module.eval()
    with torch.no_grad(), handle.calibrating():
        for index, (inputs, _) in enumerate(data.train_dataloader()):
            module(inputs)
            if index == 1:
                break
    handle.set_phase(fake_quant=True, observe=False)
    with torch.no_grad():
        module.model.transformer.h[0].mlp.c_fc.weight[:, :5] = 0.0  # whole output columns
    save_compressed(module, tmp_path / "c.safetensors")
    restored = _module("gpt2")
    load_compressed(tmp_path / "c.safetensors", restored)
    inputs, _ = next(iter(data.test_dataloader()))
    with torch.no_grad():
        assert torch.equal(module(inputs), restored.eval()(inputs))
