"""A training job with early exits writes and measures its ONNX stages with the export."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
from hydra.core.hydra_config import HydraConfig

from lightning_sparse.deploy.early_exit import MANIFEST_FILE, EarlyExitRunner
from lightning_sparse.run.recipe import compose_config
from lightning_sparse.run.training import run


def test_train_job_writes_early_exit_stages_and_reports_them(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "recipe=dense",
            "+compression/early_exit@recipe.early_exit=default",
            "recipe.early_exit.exits=[model.conv1]",
            "recipe.early_exit.pool_size=4",
            "data=digits",
            "trainer.max_epochs=2",
            "trainer.enable_model_summary=false",
            "trainer.enable_progress_bar=false",
            f"output_dir='{tmp_path}'",
        ],
        return_hydra_config=True,
    )
    HydraConfig.instance().set_config(cfg)
    try:
        summary = run(cfg)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    stages = summary["early_exit"]
    assert "error" not in stages, stages
    stage_dir = Path(stages["dir"])
    assert stage_dir == Path(summary["export_dir"]) / "early_exit"
    manifest = json.loads((stage_dir / MANIFEST_FILE).read_text())
    assert manifest["exits"] == ["model.conv1"]
    for name in [*manifest["stages"], *manifest["heads"], manifest["plain"]]:
        ort.InferenceSession(str(stage_dir / name), providers=["CPUExecutionProvider"])
    # What the export measured, on the test split, against the plain model in the same run.
    assert stages["exits"] == ["model.conv1"]
    assert stages["thresholds"] == manifest["thresholds"]
    assert stages["inputs"] == 360  # digits' test split
    assert len(stages["exit_fractions"]) == 2
    assert abs(sum(stages["exit_fractions"]) - 1.0) < 1e-9
    assert 0.0 < stages["accuracy"] <= 1.0
    assert stages["plain_accuracy"] == summary["onnx_fp32_acc"]
    assert stages["speedup"] > 0
    assert EarlyExitRunner(stage_dir, threads=1).exits == ["model.conv1"]
    # The summary on disk carries it too.
    written = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert written["early_exit"]["exit_fractions"] == stages["exit_fractions"]
