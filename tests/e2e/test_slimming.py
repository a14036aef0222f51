"""recipe=slimming as a whole run: L1 on BatchNorm scales, removal by |gamma|, fine-tuning."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from lightning_sparse.run.training import run

SLIMMING = [
    "recipe=slimming",
    "data=synthetic",
    "model=cnn",
    "model.model.width=8",
    "model.model.batch_norm=true",
    "model.lr_schedule=constant",
    "trainer.max_epochs=4",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "recipe.regularization.start_epoch=1",
    "recipe.regularization.ramp_epochs=0",
    "recipe.regularization.strength=0.05",
    "recipe.channel.start_epoch=3",
    "baseline=null",
]
REG = "compression/SparsityRegularization"
CHANNEL = "compression/ChannelPruning"


def _per_epoch(run_dir: Path, key: str) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(key)]
    return [float(row[key]) for row in rows]


def test_slimming_penalises_scales_then_removes_channels_and_fine_tunes(
    compose_run_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    summary = run(compose_run_cfg(*SLIMMING))
    assert summary["status"] == "ok"
    run_dir = tmp_path / "run"
    # On the epoch clock: off in the warm-up (epoch 0), on for epochs 1-2, off from the removal.
    assert _per_epoch(run_dir, f"{REG}/strength") == pytest.approx([0.0, 0.05, 0.05, 0.0])
    # The scales shrink while the penalty is on (sum |gamma|, unweighted, at each epoch's end;
    # in the warm-up they grow).
    for layer in ("bn1", "bn2"):
        scales = _per_epoch(run_dir, f"{REG}/penalty/model.{layer}.weight")
        assert scales[1] < scales[0], layer
    # Half the MACs go at epoch 3.0 (after the last step of the third epoch, so first logged at
    # its end), none before; the exported model is the smaller one.
    removed = _per_epoch(run_dir, f"{CHANNEL}/macs_removed")
    assert removed == pytest.approx([removed[0]] * 2)
    assert removed[0] == pytest.approx(0.5, abs=0.1)
    assert summary["macs"] < 0.6 * summary["macs_dense"]
    assert summary["params"] < summary["params_dense"]
    assert summary["onnx_fp32_acc"] is not None
    assert math.isfinite(summary["val_acc"])


def test_slimming_refuses_a_model_without_batch_norm(
    compose_run_cfg: Callable[..., DictConfig],
) -> None:
    from lightning_sparse.recipe import RecipeError

    cfg = compose_run_cfg(*[o for o in SLIMMING if "batch_norm" not in o])
    with pytest.raises((RecipeError, ValueError), match=r"recipe\.regularization.*params"):
        run(cfg)
