from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule
from lightning_sparse.report import (
    SUMMARY_FILE,
    build_summary,
    print_summary,
    pruned_parameter_names,
    sparsity_stats,
    summary_table,
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
    assert summary_table(summary).row_count >= 8
