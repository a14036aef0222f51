"""What oneshot and export report about a trained run: recipe, sparsity, int8, the same table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra.core.hydra_config import HydraConfig
from rich.console import Console

from lightning_sparse import export, oneshot
from lightning_sparse.core.checkpoint import CheckpointMismatchError
from lightning_sparse.run import training
from lightning_sparse.run.cli import compose_config

pytestmark = pytest.mark.slow

# A quantization-aware trained, 80%-sparse MLP on synthetic data: not the entry configs' defaults
# (digits, cnn), so `export` must take data and model from the checkpoint to get anywhere.
TRAINED = [
    "recipe=gmp_qat",
    "data=synthetic",
    "model=mlp",
    "trainer.max_epochs=3",
    "recipe.pruning.final_sparsity=0.8",
    "recipe.pruning.start_epoch=0",
    "recipe.pruning.end_epoch=1",
    "recipe.quantization.disable_quantization_observer_epoch=null",
    "trainer.enable_model_summary=false",
    "~logger.csv",
]


def run_entry(entry: Any, config: str, output_dir: Path, *overrides: str) -> dict[str, Any]:
    """``entry(cfg)`` on a composed config, inside a Hydra-like context, writing to output_dir."""
    cfg = compose_config(
        [*overrides, f"output_dir='{output_dir}'"], config_name=config, return_hydra_config=True
    )
    HydraConfig.instance().set_config(cfg)
    try:
        return entry(cfg)  # type: ignore[no-any-return]
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("trained")
    summary = run_entry(training.run, "train", run_dir, *TRAINED)
    assert summary["onnx_int8_acc"] is not None
    return run_dir, summary


def test_export_takes_a_run_dir_and_the_runs_own_model_and_data(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, trained_summary = trained
    capsys.readouterr()
    summary = run_entry(
        export.run, "export", tmp_path, f"ckpt_path='{run_dir}'", "latency_runs=2", "seed=7"
    )
    # The run's own model (an MLP on synthetic data), with its int8 scales, as trained.
    assert summary["test_acc"] == trained_summary["test_acc"]
    assert summary["onnx_int8_acc"] == trained_summary["onnx_int8_acc"]
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["recipe"]["name"] == "gmp_qat"
    assert summary["epochs"] == 3
    assert summary["seed"] == trained_summary["seed"] != 7  # the trained run's, not the export's
    assert json.loads((tmp_path / "summary.json").read_text())["stage"] == "export"
    out = capsys.readouterr().out
    assert "lightning_sparse: gmp_qat" in out  # the table `train` prints
    assert "ONNX Runtime int8 accuracy" in out
    assert f"run dir: {tmp_path}" in out.splitlines()
    # The command line still wins: another model is another model, refused by name.
    with pytest.raises(CheckpointMismatchError, match="first mismatched key"):
        run_entry(export.run, "export", tmp_path / "cnn", f"ckpt_path='{run_dir}'", "model=cnn")


def test_oneshot_says_what_it_did_to_a_sparser_quantized_model(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = trained
    capsys.readouterr()
    summary = run_entry(
        oneshot.run,
        "oneshot",
        tmp_path,
        f"ckpt_path='{run_dir}'",
        "data=synthetic",
        "model=mlp",
        "recipe=oneshot_magnitude",
        "oneshot.pruning.sparsity=0.5",
    )
    # Asked for 50% of an 80%-sparse model: it stays at 80%, and says so.
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert any("asked for 50.00% zeros" in note for note in summary["notes"])
    # The QAT scales do not survive a change of the weights: said, not silent.
    assert summary["quantization"]["result"] == "dropped"
    assert summary["quantization"]["source_layers"]
    assert summary.get("onnx_int8_acc") is None
    assert [stage["stage"] for stage in summary["stages"]] == [
        "trained",
        "pruned (oneshot.pruning)",
    ]
    out = capsys.readouterr().out
    assert "one-shot: oneshot_magnitude (magnitude)" in out


def test_post_training_quantization_reports_sparsity_and_int8_accuracy(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, _ = trained
    summary = run_entry(
        oneshot.run,
        "oneshot",
        tmp_path,
        f"ckpt_path='{run_dir}'",
        "data=synthetic",
        "model=mlp",
        "recipe=ptq_int8",
        "oneshot.quantization.calibration_batches=2",
    )
    # Sparsity over the weights that were pruned in training, not 0.00% for want of a pruning step.
    for stage in ("before", "after_quantization"):
        assert summary[stage]["sparsity"] == pytest.approx(0.8, abs=1e-3), stage
    assert summary["quantization"]["result"] == "requantized"
    rows = [stage["stage"] for stage in summary["stages"]]
    assert rows == ["trained", "quantized (oneshot.quantization)"]
    assert summary["after_quantization"]["test_acc"] is not None
    console = Console(record=True, width=80)
    console.print(oneshot.stages_table(summary))
    text = console.export_text()
    assert "one-shot: ptq_int8" in text
    assert "int8 (ONNX Runtime)" in text
