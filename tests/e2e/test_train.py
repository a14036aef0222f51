"""Whole runs of ``python -m lightning_sparse.train``: outputs, sparsity, checkpoints, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import DictConfig

from lightning_sparse.models import MLP, SmallCNN
from lightning_sparse.recipe import RecipeError
from lightning_sparse.train import run
from tests.e2e.app import QUICK, QUICK_PRUNING, run_app

ComposeRunCfg = Callable[..., DictConfig]


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def backbone_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights from a Lightning checkpoint, loaded as a user would."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def assert_no_run_outputs(run_dir: Path) -> None:
    for name in ("summary.json", "recipe.yaml", "checkpoints", "csv"):
        assert not (run_dir / name).exists(), f"{name} was written before the error"


@pytest.mark.slow
def test_app_gmp_run_writes_everything(tmp_path: Path) -> None:
    result = run_app(
        *QUICK,
        *QUICK_PRUNING,
        "recipe=gmp",
        "recipe.pruning.final_sparsity=0.8",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    summary = read_summary(tmp_path)
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert set(summary["sparsity_per_layer"]) == {
        "model.conv1.weight",
        "model.conv2.weight",
        "model.fc1.weight",
        "model.fc2.weight",
    }
    for name, value in summary["sparsity_per_layer"].items():
        assert value == pytest.approx(0.8, abs=2e-3), name  # per layer, within one weight
    assert summary["recipe"]["name"] == "gmp"
    assert summary["recipe"]["config"]["pruning"]["final_sparsity"] == 0.8
    assert summary["seed"] == 0
    assert summary["epochs"] == 2
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["val_acc"] is not None
    assert summary["params_nonzero"] < summary["params_total"]
    assert summary["run_dir"] == str(tmp_path)
    assert Path(summary["checkpoint"]) == tmp_path / "checkpoints" / "last.ckpt"
    assert "test accuracy" in result.stdout  # the table

    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe == summary["recipe"]["config"]
    assert recipe["pruning"]["_target_"] == "lightning_sparse.callbacks.MagnitudePruning"
    config = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    assert config["recipe"]["pruning"]["final_sparsity"] == 0.8
    assert (tmp_path / "csv" / "metrics.csv").is_file()

    # The pruned checkpoint loads into the plain backbone, strict, and holds the zeros.
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    model = SmallCNN()
    model.load_state_dict(backbone_state(checkpoint), strict=True)
    summary_layers = list(summary["sparsity_per_layer"])
    pruned = [model.get_parameter(name.removeprefix("model.")) for name in summary_layers]
    zeros = sum(int((weight == 0).sum()) for weight in pruned)
    assert zeros / sum(weight.numel() for weight in pruned) == pytest.approx(summary["sparsity"])
    # ... and carries the recipe and the pruning state, as plain data.
    callbacks = torch.load(checkpoint, weights_only=True)["callbacks"]
    assert callbacks["recipe"]["recipe"] == recipe
    assert any(key.startswith("MagnitudePruning") for key in callbacks)


@pytest.mark.slow
def test_app_dense_run(tmp_path: Path) -> None:
    result = run_app(*QUICK, "recipe=dense", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["sparsity"] == 0.0
    assert summary["recipe"] == {"name": "dense", "config": {}}
    assert summary["test_acc"] > 0.5  # synthetic blobs are easy; chance is 0.1
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text()) == {}
    model = SmallCNN()
    model.load_state_dict(backbone_state(tmp_path / "checkpoints" / "last.ckpt"), strict=True)


@pytest.mark.slow
def test_app_multirun_sweep(tmp_path: Path) -> None:
    result = run_app(
        "-m",
        "data=synthetic",
        "trainer.max_epochs=1",
        "trainer.enable_model_summary=false",
        "recipe.pruning.start_epoch=0",
        "recipe.pruning.end_epoch=1",
        "recipe.pruning.final_sparsity=0.5,0.8",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sparsities = [read_summary(tmp_path / str(job))["sparsity"] for job in (0, 1)]
    assert sparsities == [pytest.approx(0.5, abs=1e-3), pytest.approx(0.8, abs=1e-3)]
    assert (tmp_path / "multirun.yaml").is_file()


@pytest.mark.slow
def test_app_ddp_sim(tmp_path: Path) -> None:
    result = run_app(*QUICK, *QUICK_PRUNING, "trainer=ddp_sim", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert summary["epochs"] == 2
    assert result.stdout.count("test accuracy") == 1  # one table, from rank zero
    model = SmallCNN()
    model.load_state_dict(backbone_state(tmp_path / "checkpoints" / "last.ckpt"), strict=True)


@pytest.mark.slow
def test_app_rejects_a_bad_recipe_before_training(tmp_path: Path) -> None:
    result = run_app(*QUICK, "+recipe.pruning.final_sparsty=0.9", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "recipe.pruning: unknown argument 'final_sparsty'" in result.stderr
    assert "accepted: final_sparsity" in result.stderr
    assert_no_run_outputs(tmp_path)


# In-process: compose + run(cfg), faster than a subprocess.


@pytest.mark.slow
def test_run_global_sparsity(compose_run_cfg: ComposeRunCfg) -> None:
    cfg = compose_run_cfg(*QUICK, *QUICK_PRUNING, "recipe=gmp_global")
    summary = run(cfg)
    assert summary["recipe"]["name"] == "gmp_global"
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    # One threshold over all layers: the layers end up with different sparsities.
    per_layer = summary["sparsity_per_layer"]
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05
    assert read_summary(Path(cfg.output_dir)) == summary


@pytest.mark.slow
@pytest.mark.parametrize(("model", "backbone"), [("cnn", SmallCNN), ("mlp", MLP)])
def test_run_2of4(compose_run_cfg: ComposeRunCfg, model: str, backbone: type) -> None:
    cfg = compose_run_cfg(*QUICK, *QUICK_PRUNING, "recipe=gmp_2of4", f"model={model}")
    summary = run(cfg)
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert "model.conv1.weight" not in summary["sparsity_per_layer"]
    net = backbone()
    net.load_state_dict(backbone_state(Path(summary["checkpoint"])), strict=True)
    for name in summary["sparsity_per_layer"]:
        weight = net.get_parameter(name.removeprefix("model.")).detach()
        if weight.dim() == 4:  # [out, in, k, k]: groups run along `in` at each kernel position
            weight = weight.permute(0, 2, 3, 1)
        zeros_per_group = (weight.reshape(-1, 4) == 0).sum(dim=1)
        assert bool((zeros_per_group == 2).all()), name


@pytest.mark.slow
def test_resume_from_checkpoint_matches_uninterrupted(
    compose_run_cfg: ComposeRunCfg, tmp_path: Path
) -> None:
    overrides = [*QUICK, *QUICK_PRUNING]
    straight = run(compose_run_cfg(*overrides, output_dir=tmp_path / "straight"))
    # The same recipe stopped after epoch 1, then resumed from its last checkpoint to epoch 2.
    stopped = run(compose_run_cfg(*overrides, "trainer.max_epochs=1", output_dir=tmp_path / "a"))
    assert stopped["epochs"] == 1
    resumed = run(
        compose_run_cfg(
            *overrides, f"ckpt_path='{stopped['checkpoint']}'", output_dir=tmp_path / "b"
        )
    )
    assert resumed["epochs"] == 2
    expected = backbone_state(Path(straight["checkpoint"]))
    actual = backbone_state(Path(resumed["checkpoint"]))
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+recipe.pruning.final_sparsty=0.9"], "recipe.pruning: unknown argument 'final_sparsty'"),
        (["recipe.pruning.end_epoch=3"], "recipe.pruning.end_epoch=3 is past trainer.max_epochs=2"),
        (["recipe.pruning.final_sparsity=1.5"], "recipe.pruning: `final_sparsity`=1.5 is not"),
        (["recipe.pruning.init_sparsity=-0.1"], "recipe.pruning: `init_sparsity`=-0.1 is not"),
        (["recipe.pruning.params=[re:model.conv9]"], "`recipe.pruning.params` entry"),
        (["recipe=gmp_2of4", "recipe.pruning.params=__ALL_PRUNABLE__"], "`model.conv1.weight`"),
    ],
)
def test_run_rejects_bad_recipes_before_training(
    compose_run_cfg: ComposeRunCfg, overrides: list[str], message: str
) -> None:
    cfg = compose_run_cfg(*QUICK, *QUICK_PRUNING, *overrides)
    with pytest.raises(RecipeError) as info:
        run(cfg)
    assert message in str(info.value)
    run_dir = Path(cfg.output_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())
