"""Sweeps through the real app: Hydra multirun on the joblib launcher, Optuna search, SLURM
rendering, failed jobs, wandb per job, the comparison report, and the errors of bad input.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.errors import MissingConfigException

from lightning_sparse.compare import main as compare_main
from lightning_sparse.run.recipe import compose_config
from tests import forkserver
from tests.e2e.app import QUICK, QUICK_PRUNING, REPO
from tests.wandb_offline import offline_runs

# One quick epoch per job; pruning reaches its target by the end of it.
# No export: these sweeps are about jobs, dirs and reports (the search on MACs exports).
ONE_EPOCH = [*QUICK, "trainer.max_epochs=1", *QUICK_PRUNING, "export=false"]
_WANDB_VARS = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY")


def run_sweep(
    *args: str, tmp_path: Path, path_prefix: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_sparse.train *args`` with wandb cut off from this machine's set-up."""
    env = {k: v for k, v in os.environ.items() if k not in _WANDB_VARS}
    home = tmp_path / "wandb-home"
    env.update(
        HYDRA_FULL_ERROR="0",
        PYTHONWARNINGS="ignore",
        NETRC=str(home / "netrc"),
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
    )
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    return forkserver.run(["-m", "lightning_sparse.train", *args], REPO, env, timeout)


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def overrides_of(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow
def test_grid_sweep_on_joblib_runs_every_combination_in_its_own_dir(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_sweep(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *ONE_EPOCH,
        "recipe.pruning.final_sparsity=0.5,0.8",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr  # two worker processes
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    assert multirun["hydra"]["launcher"]["_target_"].endswith("JoblibLauncher")

    jobs = job_dirs(sweep)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    combinations = set()
    for job in jobs:
        summary = read_summary(job)
        overrides = dict(o.split("=", 1) for o in overrides_of(job))
        final, seed = float(overrides["recipe.pruning.final_sparsity"]), int(overrides["seed"])
        combinations.add((final, seed))
        assert summary["status"] == "ok"
        assert summary["seed"] == seed
        assert summary["sparsity"] == pytest.approx(final, abs=1e-3)
        assert summary["run_dir"] == str(job)
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert combinations == set(itertools.product([0.5, 0.8], [0, 1]))

    # The sweep's report, written when the multirun ended.
    report = (sweep / "compare.md").read_text()
    assert "4 runs: 4 completed, 0 failed." in report
    assert "| 3 | ok | gmp | recipe.pruning.final_sparsity=0.8 seed=1 |" in report
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert report in result.stdout


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep_and_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    # Job 0 passes validation, then fails in training (its schedule cannot fit in one step);
    # job 1 comes after it and must still run. Both log to CSV and to wandb (offline).
    result = run_sweep(
        "-m",
        *QUICK,
        *QUICK_PRUNING,
        "logger=[csv,wandb]",
        "export=false",
        "+trainer.max_steps=1,-1",
        f"hydra.sweep.dir={sweep}",
        tmp_path=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "SweepFailedError: 1 of 2 sweep jobs failed: job 0: ValueError:" in result.stderr

    failed, completed = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert failed["status"] == "failed"
    assert "past the trainer's max_steps=1" in failed["error"]
    assert "Traceback" in failed["traceback"]
    assert completed["status"] == "ok"
    assert completed["sparsity"] == pytest.approx(0.9, abs=1e-3)

    report = (sweep / "compare.md").read_text()
    assert "| 0 | failed | gmp | +trainer.max_steps=1 |" in report
    assert "| 1 | ok | gmp | +trainer.max_steps=-1 |" in report
    assert "## Failed jobs" in report

    # One wandb run per job, grouped by the sweep, each finished: the failed one as failed.
    runs = {run.name.split(":")[0]: run for run in offline_runs(sweep)}
    assert set(runs) == {"0", "1"}
    assert runs["0"].run_id != runs["1"].run_id
    assert {run.group for run in runs.values()} == {str(sweep)}
    assert "+trainer.max_steps=1" in runs["0"].name  # with the job's other overrides
    assert (runs["0"].exit_code, runs["1"].exit_code) == (1, 0)
    assert runs["0"].summary["status"] == "failed"
    assert runs["1"].summary["test_acc"] == completed["test_acc"]

    # The comparison command lists the failure too, and exits 0: listing is its job.
    assert compare_main([str(sweep), "--no-plot"]) == 0
    assert "| 0 | failed |" in capsys.readouterr().out


@pytest.mark.slow
def test_optuna_pareto_search_over_sparsity_and_width(tmp_path: Path) -> None:
    sweep = tmp_path / "search"
    result = run_sweep(
        "hparams_search=pruning_pareto",
        "hydra.sweeper.n_trials=2",
        "model.model.width=choice(4,8)",  # a smaller search space than the shipped one
        *ONE_EPOCH,
        f"hydra.sweep.dir={sweep}",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hydra_cfg = yaml.safe_load((sweep / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra_cfg["sweeper"]["direction"] == ["maximize", "minimize"]
    assert hydra_cfg["sweeper"]["_target_"].endswith("OptunaSweeper")

    trials = {}
    for job in job_dirs(sweep):
        overrides = dict(o.split("=", 1) for o in overrides_of(job))
        summary = read_summary(job)
        width, final = (
            int(overrides["model.model.width"]),
            float(overrides["recipe.pruning.final_sparsity"]),
        )
        assert width in (4, 8)
        assert 0.5 <= final <= 0.97
        assert summary["sparsity"] == pytest.approx(final, abs=2e-3)
        trials[(width, final)] = summary
    assert len(trials) == 2

    # Optuna received both objectives of each trial, as the trials' summaries hold them.
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert results["solutions"]
    for solution in results["solutions"]:
        params = solution["params"]
        summary = trials[(params["model.model.width"], params["recipe.pruning.final_sparsity"])]
        assert solution["values"] == [summary["test_acc"], summary["params_nonzero"]]
    assert (sweep / "compare.md").is_file()


@pytest.mark.slow
def test_compression_nas_search_on_validation_accuracy_and_macs(tmp_path: Path) -> None:
    sweep = tmp_path / "nas"
    result = run_sweep(
        "hparams_search=compression_nas",
        "hydra/launcher=joblib",
        "hydra.sweeper.n_trials=2",
        # a smaller search space than the shipped one
        "model.model.width=choice(4,8)",
        "model.model.depth=choice(2,3)",
        "model.model.hidden=choice(16,32)",
        "model.model.batch_norm=choice(true,false)",
        "data=synthetic",
        "trainer.max_epochs=1",
        "trainer.enable_model_summary=false",
        "recipe.channel.start_epoch=0.5",
        "recipe.channel.end_epoch=1",
        "baseline=null",
        f"hydra.sweep.dir={sweep}",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hydra_cfg = yaml.safe_load((sweep / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra_cfg["sweeper"]["direction"] == ["maximize", "minimize"]
    assert hydra_cfg["runtime"]["choices"]["recipe"] == "channel"

    trials = {}
    for job in job_dirs(sweep):
        overrides = dict(o.split("=", 1) for o in overrides_of(job))
        summary = read_summary(job)
        assert summary["status"] == "ok"
        assert summary["macs"] <= summary["macs_dense"]
        key = tuple(
            float(overrides[k]) if k.startswith("recipe.") else int(overrides[k])
            for k in (
                "model.model.width",
                "model.model.depth",
                "model.model.hidden",
                "recipe.channel.final_sparsity",
            )
        )
        trials[key] = summary
    assert len(trials) == 2

    # Optuna got (validation accuracy, MACs) of each trial; no test accuracy among them.
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["solutions"]
    for solution in results["solutions"]:
        params = solution["params"]
        summary = trials[
            (
                params["model.model.width"],
                params["model.model.depth"],
                params["model.model.hidden"],
                params["recipe.channel.final_sparsity"],
            )
        ]
        assert solution["values"] == [summary["val_acc"], summary["macs"]]

    # The comparison is over the search's objectives, each point labelled with its trial's values.
    assert compare_main([str(sweep), "--output-dir", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "val acc" in text
    assert "MACs per sample" in text
    assert (tmp_path / "cmp" / "pareto.png").is_file()
    from lightning_sparse.run.compare import collect_runs, pareto_axes, pareto_points

    records = collect_runs(sweep)
    assert pareto_axes(records) == ("val_acc", "macs")
    # Labels hold the values that differ between trials (what tells their points apart).
    labels = [label for label, *_ in pareto_points(records)]
    assert len(labels) == 2
    assert all("final_sparsity=" in label for label in labels)


@pytest.mark.slow
def test_slurm_launcher_renders_the_job_script(tmp_path: Path) -> None:
    # No cluster here: `srun` and `sbatch` are stand-ins that only exist (submitit checks for
    # srun) and refuse (sbatch), so everything up to the submission is the real plugin's work.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("srun", "sbatch"):
        stand_in = bin_dir / command
        stand_in.write_text(f'#!/bin/sh\necho "{command}: no cluster in this test" >&2\nexit 1\n')
        stand_in.chmod(0o755)
    sweep = tmp_path / "sweep"
    result = run_sweep(
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.setup=[source .venv/bin/activate]",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "recipe.pruning.final_sparsity=0.8,0.9",
        f"hydra.sweep.dir={sweep}",
        tmp_path=tmp_path,
        path_prefix=bin_dir,
    )
    assert result.returncode != 0
    assert "sbatch: no cluster in this test" in result.stderr
    (script_path,) = (sweep / ".submitit").glob(".submission_file_*.sh")
    script = script_path.read_text()
    for line in (
        "#SBATCH --array=0-1%2",  # one array task per sweep job
        "#SBATCH --nodes=2",  # = trainer.num_nodes
        "#SBATCH --ntasks-per-node=4",  # one task per GPU: Lightning makes each a rank
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --job-name=train",
        "source .venv/bin/activate",
    ):
        assert line in script, line
    assert "srun --unbuffered" in script
    assert "-m submitit.core._submit" in script
    # The pickled jobs carry each job's overrides.
    jobs = [pickle.loads(path.read_bytes()) for path in (sweep / ".submitit").glob("*.pkl")]
    finals = sorted(next(o for o in job.args[0] if "final_sparsity" in o) for job in jobs)
    assert finals == ["recipe.pruning.final_sparsity=0.8", "recipe.pruning.final_sparsity=0.9"]


def test_launcher_and_search_configs_compose() -> None:
    slurm = compose_config(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=3"], return_hydra_config=True
    )
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node) == (3, launcher.gpus_per_node)
    joblib = compose_config(["hydra/launcher=joblib"], return_hydra_config=True)
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")
    search = compose_config(["hparams_search=pruning_pareto"], return_hydra_config=True)
    assert search.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert search.hydra.sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert set(search.hydra.sweeper.params) == {
        "recipe.pruning.final_sparsity",
        "model.model.width",
    }
    assert list(search.objectives) == ["test_acc", "params_nonzero"]
    nas = compose_config(["hparams_search=compression_nas"], return_hydra_config=True)
    assert list(nas.objectives) == ["val_acc", "macs"]
    assert list(nas.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert set(nas.hydra.sweeper.params) == {
        "model.model.width",
        "model.model.depth",
        "model.model.hidden",
        "model.model.batch_norm",
        "recipe.channel.final_sparsity",
    }
    assert nas.hydra.runtime.choices.recipe == "channel"


@pytest.mark.parametrize(
    ("override", "missing", "options"),
    [
        ("hydra/launcher=nope", "hydra/launcher/nope", ["basic", "joblib", "slurm"]),
        ("hydra/sweeper=nope", "hydra/sweeper/nope", ["basic", "optuna"]),
        ("hparams_search=nope", "hparams_search/nope", ["pruning_pareto"]),
    ],
)
def test_unknown_launcher_sweeper_or_search_lists_the_options(
    override: str, missing: str, options: list[str]
) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_config([override], return_hydra_config=True)
    message = str(info.value)
    assert f"Could not find '{missing}'" in message
    for option in options:
        assert option in message


@pytest.mark.slow
def test_unknown_launcher_on_the_command_line(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_sweep(
        "-m", "hydra/launcher=nope", "seed=0,1", f"hydra.sweep.dir={sweep}", tmp_path=tmp_path
    )
    assert result.returncode != 0
    assert "Could not find 'hydra/launcher/nope'" in result.stderr
    assert "joblib" in result.stderr
    assert not sweep.exists()


@pytest.mark.slow
def test_a_sweep_override_naming_no_key_fails_before_any_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_sweep(
        "-m",
        *ONE_EPOCH,
        "recipe.pruning.final_sparsty=0.8,0.9",
        f"hydra.sweep.dir={sweep}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "`recipe.pruning.final_sparsty`: recipe.pruning has no key 'final_sparsty'." in (
        result.stderr
    )
    assert "Did you mean 'recipe.pruning.final_sparsity'?" in result.stderr
    assert not sweep.exists() or job_dirs(sweep) == []
