"""Whole runs with channel removal: train, resume, export and one-shot rebuild the smaller model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from lightning_sparse import export, oneshot
from lightning_sparse.run.recipe import compose_config
from lightning_sparse.run.training import run

pytestmark = pytest.mark.slow

QUICK = [
    "data=synthetic",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=4",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "model.lr_schedule=constant",
]
CHANNEL_QAT = [
    "recipe=channel_qat",
    "recipe.channel.start_epoch=0.25",
    "recipe.channel.end_epoch=0.5",
    "recipe.channel.update_frequency=0.25",
    "recipe.quantization.disable_quantization_observer_epoch=1.5",
]


def _run(entry: Any, config_name: str, output_dir: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose_config(
        [*overrides, f"output_dir='{output_dir}'"],
        config_name=config_name,
        return_hydra_config=True,
    )
    HydraConfig.instance().set_config(cfg)
    try:
        return entry(cfg)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


def _weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["state_dict"]


def test_channel_qat_run_resume_export_and_oneshot(tmp_path: Path) -> None:
    summary = _run(run, "train", tmp_path / "run", *QUICK, *CHANNEL_QAT)
    assert summary["status"] == "ok"
    assert summary["macs"] <= 0.25 * summary["macs_dense"]
    assert summary["params"] < summary["params_dense"]
    assert summary["onnx_int8_path"] is not None
    assert summary["ort_dense_fp32_ms"] > 0
    assert summary["speedup_vs_dense"] > 0
    # the dense snapshot (epoch 0.25) is tested in its own, dense, architecture
    assert summary["dense_test_acc"] is not None
    weights = _weights(summary["checkpoint"])
    assert weights["model.conv1.weight"].shape[0] < 32

    # resume=<run dir> continues the smaller model (its structure replayed before the weights)
    continued = _run(
        run, "train", tmp_path / "more", f"resume='{tmp_path / 'run'}'", "trainer.max_epochs=3"
    )
    assert continued["epochs"] == 3
    assert continued["macs"] == summary["macs"]

    # export from the checkpoint alone, with the config that built the dense model
    exported = _run(
        export.run,
        "export",
        tmp_path / "export",
        "data=synthetic",
        f"ckpt_path='{summary['checkpoint']}'",
        "latency_runs=2",
    )
    assert exported["macs"] == summary["macs"]
    assert exported["onnx_int8_path"] is not None

    # one-shot from the trained run: the model is rebuilt, then loses more channels
    shot = _run(
        oneshot.run,
        "oneshot",
        tmp_path / "oneshot",
        "data=synthetic",
        "recipe=oneshot_channel",
        "oneshot.channel.sparsity=0.9",
        f"ckpt_path='{tmp_path / 'run'}'",
        "export=false",
    )
    report = shot["steps"]["channel"]
    assert report["macs_before"] == summary["macs"]
    assert report["macs_after"] < report["macs_before"]
    recorded = json.loads((tmp_path / "oneshot" / "summary.json").read_text())
    assert recorded["steps"]["channel"]["macs_after"] == report["macs_after"]
