from __future__ import annotations

import importlib.metadata
import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from lightning_sparse.core.schedule import SparsitySchedule
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule
from lightning_sparse.run.report import (
    STATUS_FAILED,
    STATUS_OK,
    SUMMARY_FILE,
    _git_commit,
    build_summary,
    environment_info,
    failure_summary,
    plot_pareto,
    plot_sparsity_per_layer,
    plot_sparsity_schedule,
    print_summary,
    pruned_parameter_names,
    sparsity_stats,
    summary_table,
    tensor_digest,
    weights_digest,
    write_json,
    write_summary,
)


class FakePruning:
    def __init__(self, names: list[str]) -> None:
        self.target_names = names


@pytest.fixture
def module() -> ClassificationModule:
    module = ClassificationModule(SmallCNN())
    with torch.no_grad():
        module.model.fc2.weight[:, :64] = 0  # half of fc2 (10 x 128)
        module.model.conv1.weight.zero_()
    return module


def test_pruned_names_are_the_union_of_callback_targets(module: ClassificationModule) -> None:
    callbacks = [
        FakePruning(["model.fc2.weight"]),
        object(),
        FakePruning(["model.conv1.weight", "model.fc2.weight"]),
    ]
    assert pruned_parameter_names(module, callbacks) == ["model.fc2.weight", "model.conv1.weight"]


def test_dense_run_is_measured_over_all_prunable_weights(module: ClassificationModule) -> None:
    assert pruned_parameter_names(module, [object()]) == [
        "model.conv1.weight",
        "model.conv2.weight",
        "model.fc1.weight",
        "model.fc2.weight",
    ]


def test_sparsity_counts_zeros_over_all_named_weights(module: ClassificationModule) -> None:
    overall, per_layer = sparsity_stats(module, ["model.fc2.weight", "model.conv1.weight"])
    assert per_layer == {"model.fc2.weight": 0.5, "model.conv1.weight": 1.0}
    assert overall == pytest.approx((640 + 288) / (1280 + 288))


def test_build_summary(module: ClassificationModule, tmp_path: Path) -> None:
    summary = build_summary(
        module,
        [FakePruning(["model.fc2.weight"])],
        test_acc=0.9,
        val_acc=0.8,
        seed=3,
        epochs=2,
        recipe_name="gmp",
        recipe={"pruning": {"_target_": "x"}},
        checkpoint=None,
        run_dir=tmp_path,
    )
    assert summary["sparsity"] == 0.5
    assert summary["sparsity_per_layer"] == {"model.fc2.weight": 0.5}
    assert summary["recipe"] == {"name": "gmp", "config": {"pruning": {"_target_": "x"}}}
    total = sum(p.numel() for p in module.parameters())
    assert summary["params_total"] == total
    assert summary["params_nonzero"] == total - 640 - 288
    assert (summary["seed"], summary["epochs"], summary["run_dir"]) == (3, 2, str(tmp_path))
    json.dumps(summary)  # JSON-ready


def test_write_summary_is_atomic_and_replaces(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = write_summary({"test_acc": 0.5}, run_dir)
    assert path == run_dir / SUMMARY_FILE
    write_summary({"test_acc": 0.75}, run_dir)
    assert json.loads(path.read_text()) == {"test_acc": 0.75}
    assert [p.name for p in run_dir.iterdir()] == [SUMMARY_FILE]  # no temporary file left


def test_write_summary_failure_leaves_previous_file(tmp_path: Path) -> None:
    write_summary({"test_acc": 0.5}, tmp_path)
    with pytest.raises(TypeError):
        write_summary({"bad": object()}, tmp_path)
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"test_acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_FILE]


def test_table_shows_headline_and_layers() -> None:
    summary = {
        "test_acc": 0.98765,
        "val_acc": None,
        "sparsity": 0.9,
        "sparsity_per_layer": {"model.fc1.weight": 0.9},
        "recipe": {"name": "gmp", "config": {}},
        "seed": 0,
        "epochs": 3,
        "params_total": 1000,
        "params_nonzero": 100,
        "run_dir": "runs/x",
    }
    console = Console(record=True, width=100)
    print_summary(summary, console)
    text = console.export_text()
    for expected in ("gmp", "98.77%", "n/a", "90.00%", "model.fc1.weight", "100 / 1,000"):
        assert expected in text
    assert summary_table(summary).row_count >= 7
    assert text.rstrip().splitlines()[-1] == "run dir: runs/x"


@pytest.mark.parametrize("width", [40, 80, 200])
def test_the_run_dir_and_commit_print_whole_on_their_own_lines(width: int) -> None:
    run_dir = "/a/rather/long/path/to/runs/train/2026-12-01/06-05-02/that/goes/on/and/on/for/ever"
    commit = "0d1f1dda5f6c0d51b1d64e791f109a98e7e2c0de"
    summary = {
        "test_acc": 0.9,
        "recipe": {"name": "gmp"},
        "run_dir": run_dir,
        "environment": {"git": {"commit": commit, "dirty": True}},
    }
    out = StringIO()
    print_summary(summary, Console(file=out, width=width))
    lines = out.getvalue().splitlines()
    assert f"run dir: {run_dir}" in lines
    assert f"git commit: {commit} (dirty)" in lines


def test_summary_status_defaults_to_ok_and_records_environment(
    module: ClassificationModule, tmp_path: Path
) -> None:
    environment = {"git": {"commit": "abc", "dirty": False}}
    summary = build_summary(
        module,
        [],
        test_acc=None,
        val_acc=None,
        seed=0,
        epochs=1,
        recipe_name=None,
        recipe={},
        checkpoint=None,
        run_dir=tmp_path,
        environment=environment,
    )
    assert summary["status"] == STATUS_OK
    assert summary["environment"] == environment


def test_failure_summary_carries_the_error_and_null_metrics(tmp_path: Path) -> None:
    try:
        raise ValueError("`end_epoch`=3 is past max_steps")
    except ValueError as err:
        summary = failure_summary(err, seed=2, recipe_name="gmp", run_dir=tmp_path)
    assert summary["status"] == STATUS_FAILED
    assert summary["error"] == "ValueError: `end_epoch`=3 is past max_steps"
    assert "raise ValueError" in summary["traceback"]
    assert summary["test_acc"] is None
    assert summary["params_nonzero"] is None
    assert (summary["seed"], summary["recipe"], summary["run_dir"]) == (
        2,
        {"name": "gmp"},
        str(tmp_path),
    )
    json.dumps(summary)


def test_failed_summary_table_shows_the_status() -> None:
    console = Console(record=True, width=100)
    print_summary({"status": STATUS_FAILED, "recipe": {"name": "gmp"}}, console)
    assert "failed" in console.export_text()


def test_write_json_creates_parents_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = write_json({"a": [1, 2]}, tmp_path / "ranks" / "rank0.json")
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["rank0.json"]


def test_environment_records_commit_and_versions() -> None:
    environment = environment_info()
    commit = environment["git"]["commit"]
    # This checkout is a git repository: a full SHA-1 (an installed wheel would say "unknown").
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)
    versions = environment["versions"]
    assert versions["torch"] == importlib.metadata.version("torch")
    for name in ("lightning", "hydra-core", "omegaconf", "torchmetrics", "lightning_sparse"):
        assert versions[name], name
    assert set(environment["backends"]) >= {"wandb", "hydra-optuna-sweeper", "submitit"}
    assert environment["python"].count(".") == 2
    json.dumps(environment)


def test_git_commit_is_unknown_outside_a_checkout(tmp_path: Path) -> None:
    assert _git_commit(tmp_path) == {"commit": "unknown", "dirty": None}


def test_digests_tell_tensors_apart() -> None:
    mask = torch.tensor([[True, False], [False, True]])
    assert tensor_digest(mask) == tensor_digest(mask.clone())
    assert tensor_digest(mask) != tensor_digest(~mask)
    assert tensor_digest(mask) != tensor_digest(mask.reshape(4))  # same bytes, other shape
    weights = {"a": torch.ones(3), "b": torch.zeros(2)}
    assert weights_digest(weights) == weights_digest(dict(reversed(weights.items())))
    assert weights_digest(weights) != weights_digest({**weights, "b": torch.ones(2)})


def test_plots_are_png_files(tmp_path: Path) -> None:
    schedule = SparsitySchedule(0.0, 0.9, start_epoch=1, end_epoch=3, update_frequency=0.5)
    paths = [
        plot_sparsity_per_layer(
            {"model.fc1.weight": 0.9, "model.fc2.weight": 0.5}, tmp_path / "a.png"
        ),
        plot_sparsity_schedule(
            [(0.0, 0.0), (1.0, 0.3), (3.0, 0.9)], {"pruning": schedule}, 4, tmp_path / "b.png"
        ),
        plot_pareto([("0", 100.0, 0.9, True), ("1", 200.0, 0.8, False)], tmp_path / "c.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_table_shows_the_export_when_there_is_one() -> None:
    summary = {
        "test_acc": 0.97,
        "sparsity": 0.9,
        "onnx_fp32_acc": 0.97,
        "onnx_int8_acc": 0.965,
        "ort_fp32_ms": 1.5,
        "ort_int8_ms": 0.5,
        "latency_batch_size": 64,
        "dense_bytes": 605224,
        "compressed_bytes": 29470,
        "compression_ratio": 20.54,
    }
    out = StringIO()
    print_summary(summary, Console(file=out, width=120))
    text = out.getvalue()
    assert "ONNX Runtime int8 accuracy" in text
    assert "96.50%" in text
    assert "605,224 / 29,470 (20.5x)" in text
    assert "latency (batch 64)" in text
    without = StringIO()
    print_summary({"test_acc": 0.9}, Console(file=without, width=120))
    assert "ONNX" not in without.getvalue()


def test_table_shows_macs_and_the_speed_up_over_the_dense_model() -> None:
    summary = {
        "test_acc": 0.97,
        "ort_fp32_ms": 2.0,
        "ort_int8_ms": 1.0,
        "latency_batch_size": 64,
        "dense_bytes": 100,
        "compressed_bytes": 50,
        "compression_ratio": 2.0,
        "macs": 1_000_000,
        "macs_dense": 4_000_000,
        "params": 300,
        "params_dense": 1200,
        "ort_dense_fp32_ms": 8.0,
        "speedup_vs_dense": 8.0,
    }
    out = StringIO()
    print_summary(summary, Console(file=out, width=120))
    text = out.getvalue()
    assert "1,000,000 / dense 4,000,000 (25.0%)" in text
    assert "300 / dense 1,200 (25.0%)" in text
    assert "dense fp32 latency (batch 64)" in text
    assert "8.00x" in text


@pytest.mark.parametrize("broken", [False, True])
def test_table_shows_the_early_exit_stages(broken: bool) -> None:
    stages: dict[str, Any] = {
        "exits": ["model.conv1"],
        "accuracy": 0.972,
        "plain_accuracy": 0.975,
        "mean_ms": 0.05,
        "plain_mean_ms": 0.15,
        "speedup": 3.0,
        "exit_fractions": [0.8, 0.2],
    }
    if broken:
        stages = {"error": "cannot cut SmallCNN at 'model.x'"}
    summary = {"test_acc": 0.97, "dense_bytes": 10, "compressed_bytes": 5, "early_exit": stages}
    out = StringIO()
    print_summary(summary, Console(file=out, width=120))
    text = out.getvalue()
    if broken:
        assert "not written: cannot cut SmallCNN at 'model.x'" in text
    else:
        assert "97.20% / 97.50%" in text
        assert "0.050 / 0.150 ms (3.00x faster)" in text
        assert "model.conv1 80%, full 20%" in text


def test_tensor_digest_takes_scalars_and_tells_values_apart() -> None:
    assert tensor_digest(torch.tensor(0.5)) == tensor_digest(torch.tensor(0.5))
    assert tensor_digest(torch.tensor(0.5)) != tensor_digest(torch.tensor(0.25))
    assert tensor_digest(torch.tensor(0.5)) != tensor_digest(torch.tensor([0.5]))


def test_summary_reports_weights_of_unknown_layer_types(tmp_path: Path) -> None:
    class Bilinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = torch.nn.Parameter(torch.randn(4, 4))

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Bilinear())
    summary = build_summary(
        model, [], test_acc=None, val_acc=None, seed=0, epochs=0, recipe_name=None,
        recipe={}, checkpoint=None, run_dir=tmp_path,
    )  # fmt: skip
    assert list(summary["unknown_layer_weights"]) == ["1.kernel"]
    assert summary["unknown_layer_weights"]["1.kernel"].endswith("Bilinear")
    assert list(summary["sparsity_per_layer"]) == ["0.weight"]  # left dense, not measured
