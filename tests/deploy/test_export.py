from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import export
from lightning_sparse.callbacks import MagnitudePruning, QuantizationAwareTraining
from lightning_sparse.core.checkpoint import CheckpointMismatchError, load_checkpoint
from lightning_sparse.core.fake_quant import quantized_layers
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.deploy import export as deploy_export
from lightning_sparse.deploy.compressed import dense_bytes, load_compressed, save_compressed
from lightning_sparse.deploy.export import export_model
from lightning_sparse.models import MLP, SmallCNN
from lightning_sparse.module import ClassificationModule
from lightning_sparse.posttrain.ptq import ptq
from lightning_sparse.run.recipe import check_target, compose_config, config_dir
from lightning_sparse.run.training import export_batches
from tests.helpers import quiet_trainer

SUMMARY_KEYS = {
    "dense_bytes",
    "compressed_bytes",
    "compression_ratio",
    "onnx_fp32_acc",
    "onnx_int8_acc",
    "ort_fp32_ms",
    "ort_int8_ms",
    "onnx_fp32_path",
    "onnx_int8_path",
    "compressed_path",
}


def _prune(module: torch.nn.Module, sparsity: float, seed: int = 0) -> None:
    """Zero the smallest ``sparsity`` of every Conv/Linear weight, as pruning would leave it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("weight") and param.dim() > 1:
                scores = torch.rand(param.shape, generator=generator)
                param[scores < torch.quantile(scores.flatten(), sparsity)] = 0.0


def _digits_module(seed: int = 0) -> ClassificationModule:
    pl.seed_everything(seed)
    return ClassificationModule(SmallCNN(), num_classes=10)


@pytest.fixture(scope="module")
def datamodule() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, datamodule: DigitsDataModule
) -> tuple[ClassificationModule, dict[str, Any], Path]:
    """A sparse SmallCNN, briefly trained, quantized by PTQ and exported."""
    module = _digits_module()
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=[
            MagnitudePruning(final_sparsity=0.8, start_epoch=0, end_epoch=1, update_frequency=0.5)
        ],
    )
    trainer.fit(module, datamodule)
    ptq(module, datamodule, num_batches=4)
    out_dir = tmp_path_factory.mktemp("run") / "export"
    summary = export_model(module, datamodule, out_dir, latency_runs=3)
    return module, summary, out_dir


def test_export_writes_every_file_and_summary_field(exported: Any) -> None:
    _, summary, out_dir = exported
    assert set(summary) >= SUMMARY_KEYS
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "compressed.safetensors",
        "export.json",
        "model.onnx",
        "model_int8.onnx",
    ]
    assert summary["onnx_int8_path"] == str(out_dir / "model_int8.onnx")
    assert json.loads((out_dir / "export.json").read_text()) == summary
    assert summary["ort_fp32_ms"] > 0
    assert summary["ort_int8_ms"] > 0
    assert summary["compressed_bytes"] == (out_dir / "compressed.safetensors").stat().st_size
    assert summary["dense_bytes"] == 4 * sum(p.numel() for p in SmallCNN().parameters())
    assert not list(out_dir.parent.glob(".export*"))  # no temporary directory left


def test_without_a_dense_model_only_the_compressed_sizes_are_measured(exported: Any) -> None:
    module, summary, _ = exported
    assert summary["macs"] == (8 * 8 * 32 * 9) + (8 * 8 * 64 * 32 * 9) + 1024 * 128 + 128 * 10
    assert summary["params"] == sum(p.numel() for p in module.parameters())
    for key in ("macs_dense", "params_dense", "ort_dense_fp32_ms", "speedup_vs_dense"):
        assert summary[key] is None


def test_the_dense_model_is_timed_beside_and_not_written(
    tmp_path: Path, datamodule: DigitsDataModule
) -> None:
    small = ClassificationModule(SmallCNN(width=8), num_classes=10)
    dense = _digits_module()
    summary = export_model(small, datamodule, tmp_path / "export", latency_runs=3, dense=dense)
    assert summary["macs"] < summary["macs_dense"]
    assert summary["params_dense"] == sum(p.numel() for p in dense.parameters())
    assert summary["ort_dense_fp32_ms"] > 0
    assert summary["speedup_vs_dense"] == pytest.approx(
        summary["ort_dense_fp32_ms"] / summary["ort_fp32_ms"]
    )
    assert "dense.onnx" not in {p.name for p in (tmp_path / "export").iterdir()}


def test_fp32_onnx_matches_pytorch_within_1e_4(exported: Any, datamodule: DigitsDataModule) -> None:
    module, summary, out_dir = exported
    assert summary["onnx_fp32_max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _ = next(iter(datamodule.test_dataloader()))
    handle = next(iter(quantized_layers(module).values())).controls
    handle.fake_quant = False  # the float model
    try:
        expected = module.eval()(x).detach().numpy()
    finally:
        handle.fake_quant = True
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    assert summary["onnx_fp32_acc"] == pytest.approx(summary["onnx_fp32_acc"])


def test_int8_onnx_is_qdq_and_agrees_with_the_fake_quantized_model(exported: Any) -> None:
    _, summary, out_dir = exported
    graph = onnx.load(str(out_dir / "model_int8.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == 4  # one per quantized layer input
    weights = [init for init in graph.initializer if init.name.endswith(".weight_quantized")]
    assert len(weights) == 4
    assert all(init.data_type == onnx.TensorProto.INT8 for init in weights)
    assert not any(init.name.endswith(".weight") for init in graph.initializer)  # no float copy
    assert summary["onnx_int8_agreement"] >= 0.98
    assert abs(summary["onnx_int8_acc"] - summary["onnx_fp32_acc"]) < 0.05


def test_pruned_zeros_are_zero_in_the_int8_onnx_weights(exported: Any) -> None:
    module, _, out_dir = exported
    graph = onnx.load(str(out_dir / "model_int8.onnx")).graph
    weights = {
        init.name.removesuffix("_quantized"): onnx.numpy_helper.to_array(init)
        for init in graph.initializer
        if init.name.endswith(".weight_quantized")
    }
    params = dict(module.named_parameters())
    for name, ints in weights.items():
        zeros = params[name].detach().numpy() == 0
        assert zeros.mean() == pytest.approx(0.8, abs=0.01)
        assert (ints[zeros] == 0).all(), name


def test_compressed_round_trip_gives_identical_outputs(
    exported: Any, datamodule: DigitsDataModule
) -> None:
    module, _, out_dir = exported
    restored = ClassificationModule(SmallCNN(), num_classes=10)
    load_compressed(out_dir / "compressed.safetensors", restored)
    x, _ = next(iter(datamodule.test_dataloader()))
    assert torch.equal(module.eval()(x), restored.eval()(x))
    assert set(quantized_layers(restored)) == set(quantized_layers(module))


@pytest.mark.parametrize(
    ("sparsity", "quantize", "num_bits", "symmetric", "per_channel"),
    [
        (0.0, False, 8, True, True),
        (0.9, False, 8, True, True),
        (0.0, True, 8, True, True),
        (0.7, True, 4, False, False),
        (0.5, True, 8, False, True),
    ],
)
def test_compressed_round_trip_for_every_storage(
    tmp_path: Path,
    datamodule: DigitsDataModule,
    sparsity: float,
    quantize: bool,
    num_bits: int,
    symmetric: bool,
    per_channel: bool,
) -> None:
    module = _digits_module()
    _prune(module, sparsity)
    if quantize:
        ptq(module, datamodule, 2, num_bits=num_bits, symmetric=symmetric, per_channel=per_channel)
    path = tmp_path / "c.safetensors"
    size = save_compressed(module, path)
    restored = load_compressed(path, _digits_module(seed=1))
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(module.eval()(x), restored.eval()(x))
    for (name, a), b in zip(
        module.state_dict().items(), restored.state_dict().values(), strict=True
    ):
        assert (b[a == 0] == 0).all(), name  # every zero stays (quantization may add more)
        if not quantize:
            assert torch.equal(a, b), name
    if not quantize and sparsity == 0:
        assert size > dense_bytes(module)  # dense floats: nothing to gain, a header to pay
    if sparsity or quantize:
        assert size < dense_bytes(module) / 2


def test_a_95_percent_sparse_int8_model_is_20x_smaller(tmp_path: Path, datamodule: Any) -> None:
    module = _digits_module()
    _prune(module, 0.95)
    ptq(module, datamodule, 2)
    size = save_compressed(module, tmp_path / "c.safetensors")
    assert dense_bytes(module) / size >= 20


def test_no_int8_model_without_quantization(tmp_path: Path, datamodule: DigitsDataModule) -> None:
    summary = export_model(_digits_module(), datamodule, tmp_path / "export", latency_runs=2)
    assert summary["onnx_int8_path"] is None
    assert summary["onnx_int8_acc"] is None
    assert summary["ort_int8_ms"] is None
    assert not (tmp_path / "export" / "model_int8.onnx").exists()
    assert summary["onnx_fp32_max_abs_diff"] < 1e-4


def test_a_failed_export_leaves_no_half_written_files(
    tmp_path: Path, datamodule: DigitsDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "export"
    out_dir.mkdir()
    (out_dir / "model.onnx").write_text("the previous export")

    def fail(*args: Any) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(deploy_export, "write_compressed", fail)
    with pytest.raises(OSError, match="disk full"):
        export_model(_digits_module(), datamodule, out_dir, latency_runs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory
    assert [p.name for p in out_dir.iterdir()] == ["model.onnx"]
    assert (out_dir / "model.onnx").read_text() == "the previous export"


def test_a_dataloader_or_an_example_input_will_do(tmp_path: Path, datamodule: Any) -> None:
    module = _digits_module()
    datamodule.setup("test")
    from_loader = export_model(
        module, datamodule.test_dataloader(), tmp_path / "loader", latency_runs=1
    )
    from_module = export_model(module, datamodule, tmp_path / "module", latency_runs=1)
    assert from_loader["onnx_fp32_acc"] == from_module["onnx_fp32_acc"] is not None
    example = next(iter(datamodule.test_dataloader()))[0][:8]
    from_example = export_model(module, example, tmp_path / "example", latency_runs=1)
    assert from_example["onnx_fp32_acc"] is None  # no labels, no accuracy
    assert from_example["onnx_fp32_max_abs_diff"] < 1e-4
    assert (tmp_path / "example" / "model.onnx").is_file()
    session = ort.InferenceSession(str(tmp_path / "example" / "model.onnx"))
    assert session.run(None, {session.get_inputs()[0].name: example.numpy()})[0].shape == (8, 10)
    with pytest.raises(ValueError, match=r"`data` gave no batch to export with \(list\)"):
        export_model(module, [], tmp_path / "none")


def test_eval_batches_evaluates_the_first_batches_only(tmp_path: Path, datamodule: Any) -> None:
    """As many test batches as the run's test pass (`limit_test_batches`), not the whole split."""
    module = _digits_module()
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    assert len(batches) >= 3
    one = export_model(module, datamodule, tmp_path / "one", latency_runs=1, eval_batches=1)
    first_only = DataLoader(TensorDataset(*batches[0]), batch_size=len(batches[0][0]))
    alone = export_model(module, first_only, tmp_path / "alone", latency_runs=1)
    whole = export_model(module, datamodule, tmp_path / "whole", latency_runs=1)
    assert one["onnx_fp32_acc"] == alone["onnx_fp32_acc"]
    with torch.no_grad():
        first = float((module(batches[0][0]).argmax(1) == batches[0][1]).float().mean())
    assert one["onnx_fp32_acc"] == pytest.approx(first)
    assert whole["onnx_fp32_acc"] != one["onnx_fp32_acc"]
    assert export_batches(1) == 1
    assert export_batches(1.0) is None  # Lightning's "all of them"
    assert export_batches(0.25) is None
    assert export_batches(True) is None


def test_bad_export_arguments_name_the_field(tmp_path: Path, datamodule: Any) -> None:
    with pytest.raises(ValueError, match=r"`batch_size`=0 is not allowed; it must be an int >= 1"):
        export_model(_digits_module(), datamodule, tmp_path / "e", batch_size=0)
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match=r"`eval_batches`=0 is not allowed; it must be an int"):
        export_model(_digits_module(), datamodule, tmp_path / "e", eval_batches=0)
    assert not (tmp_path / "e").exists()


def test_a_checkpoint_of_another_model_names_the_first_mismatched_key(tmp_path: Path) -> None:
    path = tmp_path / "cnn.ckpt"
    torch.save({"state_dict": _digits_module().state_dict()}, path)
    mlp = ClassificationModule(MLP(input_dim=64), num_classes=10)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"checkpoint cnn.ckpt does not match the configured model: first mismatched key "
        r"'model.fc1.weight' has shape \[128, 1024\] in the checkpoint cnn.ckpt but \[256, 64\]",
    ):
        load_checkpoint(mlp, path)
    wider = ClassificationModule(SmallCNN(), num_classes=10)
    del wider.model.fc2
    with pytest.raises(CheckpointMismatchError, match=r"'model.fc2.weight' is in the checkpoint"):
        load_checkpoint(wider, path)
    with pytest.raises(FileNotFoundError, match=r"`ckpt_path`='.*nope.ckpt': not found"):
        load_checkpoint(mlp, tmp_path / "nope.ckpt")


def test_a_compressed_file_of_another_model_is_refused(tmp_path: Path) -> None:
    save_compressed(_digits_module(), tmp_path / "c.safetensors")
    mlp = ClassificationModule(MLP(input_dim=64), num_classes=10)
    with pytest.raises(CheckpointMismatchError, match=r"first mismatched key 'model.fc1.weight'"):
        load_compressed(tmp_path / "c.safetensors", mlp)


def test_the_export_config_composes_and_binds() -> None:
    cfg = compose_config(["ckpt_path=x.ckpt", "model=mlp"], config_name="export")
    assert cfg.ckpt_path == "x.ckpt"
    assert cfg.batch_size == 64
    for where in ("data", "model", "model.model"):
        node = OmegaConf.to_container(OmegaConf.select(cfg, where), resolve=True)
        assert isinstance(node, dict)
        check_target(node, where)
    module = instantiate(cfg.model)
    assert module(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("node", ["qat"])
def test_every_quantization_node_binds(node: str) -> None:
    plain = OmegaConf.to_container(
        OmegaConf.load(config_dir() / "compression" / "quantization" / f"{node}.yaml"), resolve=True
    )
    assert isinstance(plain, dict)
    check_target(plain, f"compression.quantization.{node}")
    assert isinstance(instantiate(plain), QuantizationAwareTraining)


def test_gmp_qat_starts_quantization_where_pruning_ends() -> None:
    cfg = compose_config(["recipe=gmp_qat", "recipe.pruning.end_epoch=12"])
    assert cfg.recipe.quantization.start_epoch == 12


@pytest.mark.slow
def test_export_entry_point_exports_a_qat_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = ClassificationModule(SmallCNN(), num_classes=10)
    datamodule = DigitsDataModule()
    qat = QuantizationAwareTraining(start_epoch=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[qat, checkpoint], enable_checkpointing=True, limit_val_batches=1
    )
    trainer.fit(module, datamodule)
    cfg = compose_config(
        [
            f"ckpt_path='{tmp_path / 'checkpoints' / 'last.ckpt'}'",
            f"out_dir='{tmp_path / 'out'}'",
            "latency_runs=2",
        ],
        config_name="export",
    )
    summary = export.run(cfg)
    assert summary["quantized_layers"] == ["model.conv1", "model.conv2", "model.fc1", "model.fc2"]
    assert (tmp_path / "out" / "model_int8.onnx").is_file()
    assert summary["onnx_int8_agreement"] >= 0.97
    # the checkpoint's model computes exactly what the trained one did
    restored = ClassificationModule(SmallCNN(), num_classes=10)
    load_checkpoint(restored, tmp_path / "checkpoints" / "last.ckpt")
    x = torch.rand(8, 1, 8, 8)
    assert torch.equal(module.eval()(x), restored.eval()(x))
    # and a wrong model is refused before anything is written
    wrong = compose_config(
        [
            f"ckpt_path='{tmp_path / 'checkpoints' / 'last.ckpt'}'",
            "model=mlp",
            f"out_dir='{tmp_path / 'wrong'}'",
        ],
        config_name="export",
    )
    with pytest.raises(CheckpointMismatchError, match=r"first mismatched key 'model.fc1.weight'"):
        export.run(wrong)
    assert not (tmp_path / "wrong").exists()


def test_int8_activation_ranges_are_calibrated_on_validation_not_test_data() -> None:
    """The test split measures the export; it must not also set the int8 graph's ranges."""

    class OnlyTrain(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.train = torch.full((4, 3), 2.0)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(self.train, torch.zeros(4)), batch_size=4
            )

    digits = DigitsDataModule()
    chosen = deploy_export._calibration_inputs(digits)
    digits.setup("fit")
    val_x, _ = next(iter(digits.val_dataloader()))
    digits.setup("test")
    test_x, _ = next(iter(digits.test_dataloader()))
    assert torch.equal(chosen, val_x)
    assert not torch.equal(chosen[: len(test_x)], test_x[: len(chosen)])
    # No validation split: the training split.
    assert torch.equal(deploy_export._calibration_inputs(OnlyTrain()), torch.full((4, 3), 2.0))
    # A DataLoader or an example input: the caller's own choice, used as given.
    example = torch.randn(2, 1, 8, 8)
    assert deploy_export._calibration_inputs(example) is example
