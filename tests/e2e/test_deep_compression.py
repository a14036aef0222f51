"""A whole ``recipe=deep_compression`` run, shortened: prune, cluster, export, load it back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_sparse.deploy.compressed import load_compressed
from lightning_sparse.run.training import run

WEIGHTS = ("model.conv1.weight", "model.conv2.weight", "model.fc1.weight", "model.fc2.weight")


@pytest.mark.slow
def test_deep_compression_exports_codebooks_that_load_back_exactly(
    compose_run_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_run_cfg(
        "recipe=deep_compression",
        "model=lenet5",
        "data=mnist5k",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=6",
        "trainer.enable_model_summary=false",
        "recipe.pruning.start_epoch=0",
        "recipe.pruning.end_epoch=1",
        "recipe.clustering.start_epoch=2",
        output_dir=tmp_path,
    )
    summary = run(cfg)
    assert summary["status"] == "ok"
    assert summary["sparsity"] == pytest.approx(0.95, abs=1e-3)
    compression = summary["compression"]
    assert compression["bytes"] == summary["compressed_bytes"]
    assert compression["bits_over_entropy_bound"] < 1.3
    checkpoint = torch.load(Path(summary["checkpoint"]), weights_only=True)
    state = checkpoint["state_dict"]
    for name in WEIGHTS:
        assert compression["tensors"][name]["storage"] == "cb", name
        values = state[name][state[name] != 0]
        assert torch.unique(values).numel() <= 16, name
    assert summary["compression_ratio"] > 40
    model = instantiate(cfg.model)
    load_compressed(Path(summary["export_dir"]) / "compressed.safetensors", model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
