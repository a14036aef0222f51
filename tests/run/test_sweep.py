"""A sweep checks every job's config before the first job trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from lightning_sparse.run.cli import compose_config
from lightning_sparse.run.sweep import SweepCheck, job_overrides


def _multirun(*overrides: str) -> DictConfig:
    """What Hydra hands ``on_multirun_start``: the command line's overrides, sweeps unsplit."""
    config = compose_config([], return_hydra_config=True)
    config.hydra.overrides.task = list(overrides)
    return config


def test_the_jobs_are_those_the_basic_sweeper_launches() -> None:
    config = _multirun("recipe=gmp", "recipe.pruning.final_sparsity=0.8,0.9", "seed=0,1")
    assert job_overrides(config) == [
        ["recipe=gmp", "recipe.pruning.final_sparsity=0.8", "seed=0"],
        ["recipe=gmp", "recipe.pruning.final_sparsity=0.8", "seed=1"],
        ["recipe=gmp", "recipe.pruning.final_sparsity=0.9", "seed=0"],
        ["recipe=gmp", "recipe.pruning.final_sparsity=0.9", "seed=1"],
    ]


def test_a_search_that_picks_its_jobs_as_it_goes_is_not_checked_ahead() -> None:
    config = compose_config(["hparams_search=pruning_pareto"], return_hydra_config=True)
    assert job_overrides(config) is None


def test_a_bad_job_stops_the_sweep_before_any_job_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = _multirun(
        "recipe=gmp",
        "recipe.pruning.final_sparsity=0.8,1.5",
        f"ckpt_path=null,'{tmp_path / 'gone.ckpt'}'",
    )
    with pytest.raises(SystemExit) as exit_info:
        SweepCheck().on_multirun_start(config)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "3 of 4 sweep jobs would fail; no job was started:"
    assert err[1].startswith("  job 1 (recipe=gmp recipe.pruning.final_sparsity=0.8 ckpt_path=")
    assert err[1].endswith("gone.ckpt': not found; give a run dir or a checkpoint file.")
    assert "job 2 (recipe=gmp recipe.pruning.final_sparsity=1.5 ckpt_path=null)" in err[2]
    assert "`final_sparsity`=1.5 is not allowed; it must be in [0, 1)" in err[2]
    assert len(err) == 4


def test_bad_threads_in_a_job_are_found_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        SweepCheck().on_multirun_start(_multirun("recipe=gmp", "threads=1,0"))
    assert "job 1 (recipe=gmp threads=0): `threads`=0 is not allowed" in capsys.readouterr().err


def test_a_sweep_of_good_jobs_passes() -> None:
    SweepCheck().on_multirun_start(_multirun("recipe=gmp", "recipe.pruning.final_sparsity=0.8,0.9"))
