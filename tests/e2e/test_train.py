"""Whole runs of ``python -m lightning_sparse.train``: outputs, sparsity, checkpoints, errors."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import DictConfig

from lightning_sparse.models import MLP, SmallCNN
from lightning_sparse.run.recipe import RecipeError
from lightning_sparse.run.training import ConfigError, objective_names, objective_values, run
from tests.e2e.app import QUICK, QUICK_PRUNING, run_app
from tests.wandb_offline import offline_runs

ComposeRunCfg = Callable[..., DictConfig]


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def backbone_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights from a Lightning checkpoint, loaded as a user would."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def assert_no_run_outputs(run_dir: Path) -> None:
    """Nothing of a run was written; a ``failed`` summary recording the error is allowed."""
    for name in ("recipe.yaml", "environment.json", "checkpoints", "csv", "plots"):
        assert not (run_dir / name).exists(), f"{name} was written before the error"
    if (run_dir / "summary.json").exists():
        assert read_summary(run_dir)["status"] == "failed"


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
    assert summary["status"] == "ok"
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
    # The resolved config (recipe included) went to the logger, too.
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["recipe"]["pruning"]["final_sparsity"] == 0.8
    # Reproducibility: the environment, in its own file and in the summary.
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment == summary["environment"]
    for package in ("torch", "lightning", "hydra-core"):
        assert environment["versions"][package] == importlib.metadata.version(package)
    assert set(environment["git"]) == {"commit", "dirty"}
    for plot in ("sparsity_per_layer.png", "sparsity_schedule.png"):
        assert (tmp_path / "plots" / plot).read_bytes()[:4] == b"\x89PNG", plot

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

    # The export ran: ONNX Runtime's fp32 model agrees with PyTorch, the compressed file is
    # really smaller, and the table shows it.
    export = tmp_path / "export"
    assert (export / "model.onnx").is_file()
    assert not (export / "model_int8.onnx").exists()  # no QAT in this recipe
    assert summary["onnx_fp32_acc"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert summary["onnx_fp32_max_abs_diff"] < 1e-4
    assert summary["compressed_bytes"] == (export / "compressed.safetensors").stat().st_size
    assert summary["compressed_bytes"] < summary["dense_bytes"]
    assert "ONNX Runtime fp32 accuracy" in result.stdout

    # Output to a pipe: a line per epoch, no Lightning ads or config restatements; the run's log
    # holds what was printed; the files follow the umask like every other file of the run.
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("epoch ")] == [
        ["epoch", "1/2"],
        ["epoch", "2/2"],
    ]
    printed = result.stdout + result.stderr
    for noise in ("Tip:", "was configured so", "LeafSpec", "Total FLOPs", "anonymous setting"):
        assert noise not in printed, noise
    assert lines[-2:] == [
        f"run dir: {tmp_path}",
        f"git commit: {summary['environment']['git']['commit']}"
        + (" (dirty)" if summary["environment"]["git"]["dirty"] else ""),
    ]
    log = (tmp_path / "train.log").read_text()
    for printed_line in ("epoch 2/2", "test accuracy", f"run dir: {tmp_path}", "Seed set to 0"):
        assert printed_line in log, printed_line
    assert summary["environment"]["threads"] == 1
    mode = (tmp_path / "recipe.yaml").stat().st_mode & 0o777
    for name in ("summary.json", "environment.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


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
def test_app_rejects_a_bad_recipe_before_training(tmp_path: Path) -> None:
    result = run_app(*QUICK, "+recipe.pruning.final_sparsty=0.9", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "recipe.pruning: unknown argument 'final_sparsty'" in result.stderr
    assert "accepted: final_sparsity" in result.stderr
    assert_no_run_outputs(tmp_path)
    # ... and the failure is on record, for whoever looks at the run dir later.
    failure = read_summary(tmp_path)
    assert failure["status"] == "failed"
    assert failure["error"].startswith("RecipeError: recipe.pruning: unknown argument")
    assert failure["recipe"] == {"name": "gmp"}
    assert failure["environment"]["git"]["commit"]


# In-process: compose + run(cfg), faster than a subprocess.


@pytest.mark.slow
def test_run_global_sparsity(compose_run_cfg: ComposeRunCfg) -> None:
    cfg = compose_run_cfg(*QUICK, *QUICK_PRUNING, "recipe=gmp_global", "export=false")
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
    cfg = compose_run_cfg(
        *QUICK, *QUICK_PRUNING, "recipe=gmp_2of4", f"model={model}", "export=false"
    )
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
    # A constant learning rate: stopping with max_epochs=1 would otherwise shorten the cosine.
    # No export: what is compared is the checkpoint (the export's round trips are test_app_*'s).
    overrides = [*QUICK, *QUICK_PRUNING, "model.lr_schedule=constant", "export=false"]
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

    # `resume=<run dir>` needs none of the original overrides: the config comes from the
    # checkpoint (the defaults would be digits and gmp_qat_distill); the command line only
    # extends the run.
    first_summary = (tmp_path / "a" / "summary.json").read_text()
    continued = run(
        compose_run_cfg(
            f"resume='{tmp_path / 'a'}'",
            "trainer.max_epochs=2",
            "export=false",
            output_dir=tmp_path / "c",
        )
    )
    assert continued["epochs"] == 2
    assert continued["recipe"]["name"] == "gmp"
    assert continued["resumed_from"] == str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    actual = backbone_state(Path(continued["checkpoint"]))
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=name)
    record = yaml.safe_load((tmp_path / "c" / "resume.yaml").read_text())
    assert record["config"]["data"]["_target_"].endswith("SyntheticDataModule")
    assert record["config"]["trainer"]["max_epochs"] == 2
    # The first run's outputs are untouched; the continuation wrote into its own dir.
    assert (tmp_path / "a" / "summary.json").read_text() == first_summary


def test_run_refuses_one_shot_steps(compose_run_cfg: ComposeRunCfg) -> None:
    cfg = compose_run_cfg(*QUICK, "recipe=oneshot_magnitude")
    with pytest.raises(ConfigError, match=r"`oneshot` holds one-shot steps \(pruning\), which"):
        run(cfg)
    assert_no_run_outputs(Path(cfg.output_dir))


def test_run_refuses_data_and_model_class_counts_that_differ(
    compose_run_cfg: ComposeRunCfg,
) -> None:
    cfg = compose_run_cfg(
        *QUICK, "recipe=dense", "model.num_classes=7", "model.model.num_classes=7"
    )
    with pytest.raises(ConfigError, match=r"`data.num_classes`=10 but .* `model.num_classes`=7"):
        run(cfg)
    assert_no_run_outputs(Path(cfg.output_dir))


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


# Reproducibility


# What must match between two runs of one config; paths and the environment may differ.
METRIC_KEYS = ("test_acc", "val_acc", "sparsity", "sparsity_per_layer", "params_nonzero", "epochs")


@pytest.mark.slow
def test_same_seed_and_recipe_give_the_same_summary(
    compose_run_cfg: ComposeRunCfg, tmp_path: Path
) -> None:
    overrides = [*QUICK, *QUICK_PRUNING, "seed=3", "export=false"]
    first = run(compose_run_cfg(*overrides, output_dir=tmp_path / "first"))
    second = run(compose_run_cfg(*overrides, output_dir=tmp_path / "second"))
    assert {k: first[k] for k in METRIC_KEYS} == {k: second[k] for k in METRIC_KEYS}
    assert first["environment"]["deterministic_algorithms"] is True
    assert read_summary(tmp_path / "first")["environment"] == first["environment"]
    # Same weights, bit for bit.
    weights = backbone_state(Path(first["checkpoint"]))
    again = backbone_state(Path(second["checkpoint"]))
    assert all(torch.equal(weights[name], again[name]) for name in weights)


# Tracking: real wandb, offline; what it wrote is read back from its transaction log.


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No wandb key, netrc or settings of this machine; wandb's own dirs in tmp."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    return home


@pytest.mark.slow
@pytest.mark.usefixtures("wandb_env")
def test_run_tracks_config_metrics_plots_and_files_in_wandb(
    compose_run_cfg: ComposeRunCfg,
) -> None:
    cfg = compose_run_cfg(*QUICK, *QUICK_PRUNING, "logger=[csv,wandb]", "seed=2")
    summary = run(cfg)
    run_dir = Path(cfg.output_dir)
    assert (run_dir / "csv" / "metrics.csv").is_file()  # both loggers got the metrics
    (tracked,) = offline_runs(run_dir / "wandb")
    assert tracked.project == "lightning_sparse"
    assert tracked.job_type == "train"
    assert tracked.group == ""  # a single run belongs to no sweep
    # The resolved config, recipe included.
    assert tracked.config["recipe"]["pruning"]["final_sparsity"] == 0.9
    assert tracked.config["recipe"]["pruning"]["_target_"].endswith("MagnitudePruning")
    assert tracked.config["seed"] == 2
    assert tracked.config["data"]["_target_"].endswith("SyntheticDataModule")
    # Per-layer and overall sparsity, the phase flag, losses and the learning rate, per epoch.
    keys = tracked.history_keys()
    prefix = "compression/MagnitudePruning"
    assert {f"{prefix}/sparsity", f"{prefix}/target_sparsity", f"{prefix}/enabled"} <= keys
    assert {f"{prefix}/sparsity/{name}" for name in summary["sparsity_per_layer"]} <= keys
    assert {"train/loss_epoch", "val/acc", "test/acc", "lr-Adam"} <= keys
    sparsity = [row[f"{prefix}/sparsity"] for row in tracked.history if f"{prefix}/sparsity" in row]
    assert sparsity[-1] == pytest.approx(0.9, abs=1e-3)
    # The summary, the plots as images, the run's files as one artifact; finished cleanly.
    for key in ("test_acc", "sparsity", "params_nonzero", "status"):
        assert tracked.summary[key] == summary[key], key
    assert tracked.summary["sparsity_per_layer"] == summary["sparsity_per_layer"]
    for plot in ("sparsity_per_layer", "sparsity_schedule"):
        assert any(f.startswith(f"media/images/plots/{plot}") for f in tracked.files), plot
    (artifact,) = tracked.artifacts
    assert set(artifact["files"]) >= {
        "last.ckpt",
        "summary.json",
        "recipe.yaml",
        "environment.json",
    }
    assert tracked.exit_code == 0


@pytest.mark.slow
def test_wandb_online_without_network_falls_back_to_offline(
    compose_run_cfg: ComposeRunCfg,
    wandb_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    cfg = compose_run_cfg(
        *QUICK, "trainer.max_epochs=1", "recipe=dense", "logger=wandb", "export=false"
    )
    with caplog.at_level(logging.WARNING, logger="lightning_sparse.run.tracking"):
        summary = run(cfg)
    assert "cannot be reached" in caplog.text
    assert "logging offline instead" in caplog.text
    (tracked,) = offline_runs(Path(cfg.output_dir) / "wandb")
    assert tracked.summary["test_acc"] == summary["test_acc"]
    assert tracked.exit_code == 0


@pytest.mark.slow
@pytest.mark.usefixtures("wandb_env")
def test_a_failing_run_finishes_its_wandb_run_as_failed(compose_run_cfg: ComposeRunCfg) -> None:
    # Valid as configuration; the pruning schedule then cannot fit in one optimizer step.
    cfg = compose_run_cfg(*QUICK, *QUICK_PRUNING, "logger=wandb", "+trainer.max_steps=1")
    with pytest.raises(ValueError, match="past the trainer's max_steps=1"):
        run(cfg)
    (tracked,) = offline_runs(Path(cfg.output_dir) / "wandb")
    assert tracked.exit_code == 1
    assert tracked.summary["status"] == "failed"
    assert "max_steps=1" in tracked.summary["error"]


# Objectives for sweepers


def test_objectives_one_is_a_float_several_a_list(compose_run_cfg: ComposeRunCfg) -> None:
    summary = {"status": "ok", "test_acc": 0.5, "params_nonzero": 120, "sparsity": 0.9}
    assert objective_values(summary, ["test_acc"]) == 0.5
    assert objective_values(summary, ["test_acc", "params_nonzero"]) == [0.5, 120.0]
    assert objective_names(compose_run_cfg()) == ["test_acc"]
    pareto = compose_run_cfg("hparams_search=pruning_pareto")
    assert objective_names(pareto) == ["test_acc", "params_nonzero"]


@pytest.mark.parametrize(
    "summary",
    [
        {"status": "failed", "test_acc": None},
        {"status": "interrupted", "test_acc": 0.5, "params_nonzero": 1},
        {"status": "ok", "test_acc": None, "params_nonzero": 1},
        {"status": "ok", "test_acc": float("nan"), "params_nonzero": 1},
    ],
)
def test_no_result_is_none_never_nan(summary: dict[str, Any]) -> None:
    # Optuna records None as a failed trial; NaN in a multi-objective list would stop the search.
    assert objective_values(summary, ["test_acc", "params_nonzero"]) is None


def test_an_objective_the_export_measures_needs_the_export(compose_run_cfg: ComposeRunCfg) -> None:
    assert objective_names(compose_run_cfg("objectives=[val_acc,macs]")) == ["val_acc", "macs"]
    cfg = compose_run_cfg(*QUICK, "objectives=[val_acc,macs]", "export=false")
    with pytest.raises(ConfigError, match="objectives: 'macs' is measured by the export"):
        run(cfg)
    assert not Path(cfg.output_dir).exists()


def test_unknown_objective_is_refused_before_training(compose_run_cfg: ComposeRunCfg) -> None:
    cfg = compose_run_cfg(*QUICK, "objectives=[test_acc,flops]")
    with pytest.raises(ConfigError, match="objectives: 'flops' is not a summary metric"):
        run(cfg)
    assert not Path(cfg.output_dir).exists()


def test_dense_baseline_trained_in_the_job_is_a_dense_run(
    compose_run_cfg: ComposeRunCfg, tmp_path: Path
) -> None:
    quick = [*QUICK, "export=false"]  # the baseline's numbers come from the test pass
    compressed = run(
        compose_run_cfg(*quick, *QUICK_PRUNING, "baseline=train", output_dir=tmp_path / "c")
    )
    dense = run(compose_run_cfg(*quick, "recipe=dense", "baseline=null", output_dir=tmp_path / "d"))
    assert compressed["dense_baseline"] == {"kind": "train", "epochs": 2}
    assert compressed["dense_test_acc"] == dense["test_acc"]
    assert "dense_test_acc" not in dense
    # Still the compressed model's numbers everywhere else, logs included.
    assert compressed["sparsity"] == pytest.approx(0.9, abs=1e-3)
    logged = (tmp_path / "c" / "csv" / "metrics.csv").read_text().splitlines()
    test_rows = [
        row for row in logged[1:] if row.split(",")[logged[0].split(",").index("test/acc")]
    ]
    assert len(test_rows) == 1
    # Pruning from epoch 0 leaves no dense phase to snapshot.
    default = run(compose_run_cfg(*quick, *QUICK_PRUNING, output_dir=tmp_path / "s"))
    assert default["dense_baseline"] == {"kind": "snapshot", "epoch": None}
    assert default["dense_test_acc"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["baseline=best"], r"`baseline`='best' is not allowed; choose one of \('snapshot', "),
        (
            ["baseline=train", "trainer=ddp_sim"],
            r"`baseline`=train trains the dense model in this job, on one process; with "
            r"trainer\.devices=2",
        ),
    ],
)
def test_bad_baseline_is_refused_before_training(
    compose_run_cfg: ComposeRunCfg, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(compose_run_cfg(*QUICK, *overrides))
    assert_no_run_outputs(tmp_path / "run")
