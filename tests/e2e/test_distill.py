"""A whole run of the main job's recipe, ``gmp_qat_distill``, briefly on synthetic data."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from lightning_sparse.run.training import run
from tests.e2e.app import QUICK

ComposeRunCfg = Callable[..., DictConfig]


@pytest.mark.slow
def test_gmp_qat_distill_run_prunes_distils_quantizes_and_exports(
    compose_run_cfg: ComposeRunCfg,
) -> None:
    cfg = compose_run_cfg(
        *QUICK,
        "recipe=gmp_qat_distill",
        "trainer.max_epochs=3",
        "recipe.pruning.start_epoch=1",
        "recipe.pruning.end_epoch=2",
        "recipe.pruning.final_sparsity=0.9",
    )
    assert cfg.recipe.distillation.start_epoch == 1  # follows pruning by interpolation
    assert cfg.recipe.quantization.start_epoch == 2
    summary = run(cfg)
    run_dir = Path(cfg.output_dir)

    assert summary["status"] == "ok"
    assert summary["recipe"]["name"] == "gmp_qat_distill"
    assert summary["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert 0.0 <= summary["onnx_int8_acc"] <= 1.0
    assert (run_dir / "export" / "model_int8.onnx").is_file()
    assert json.loads((run_dir / "summary.json").read_text()) == summary

    with (run_dir / "csv" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    per_epoch = [
        (
            float(row["compression/KnowledgeDistillation/active"]),
            float(row["compression/KnowledgeDistillation/loss"]),
        )
        for row in rows
        if row.get("compression/KnowledgeDistillation/loss")
    ]
    # Epoch 0 trains dense without a teacher; epochs 1-2 distil from the copy taken at epoch 1.
    assert [active for active, _ in per_epoch] == [0.0, 1.0, 1.0]
    assert per_epoch[0][1] == 0.0
    assert all(loss > 0 for _, loss in per_epoch[1:])

    # The teacher travels in the callback's state, not in the model's weights.
    checkpoint = torch.load(summary["checkpoint"], weights_only=True)
    assert checkpoint["callbacks"]["KnowledgeDistillation"]["teacher"]
    assert all(key.startswith("model.") for key in checkpoint["state_dict"])
