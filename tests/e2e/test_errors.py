"""A user's error ends a run with its message alone: exit code 1, no traceback, nothing written."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from lightning_sparse.models import SmallCNN
from lightning_sparse.run.training import run_job
from tests import forkserver
from tests.e2e.app import QUICK, QUICK_PRUNING, REPO, run_app

ComposeRunCfg = Callable[..., DictConfig]


def _truncated(path: Path) -> Path:
    torch.save({"state_dict": SmallCNN().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _finished_run(run_dir: Path) -> Path:
    """A run dir whose last.ckpt says every epoch of trainer.max_epochs=2 was trained."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    progress = {"current": {"ready": 2, "completed": 1, "started": 2, "processed": 2}}
    torch.save(
        {
            "state_dict": {},
            "loops": {"fit_loop": {"epoch_progress": progress}},
            "callbacks": {"recipe": {"name": "gmp", "recipe": {}, "config": {"seed": 0}}},
        },
        checkpoint,
    )
    return run_dir


# (overrides, the message on stderr); `{tmp}` is the test's tmp_path.
CASES = {
    "missing-ckpt": (["ckpt_path='{tmp}/nope.ckpt'"], "`ckpt_path`='{tmp}/nope.ckpt': not found"),
    "truncated-ckpt": (
        ["ckpt_path='{tmp}/cut.ckpt'"],
        "`ckpt_path`='{tmp}/cut.ckpt': not a checkpoint: truncated or not a torch file.",
    ),
    "truncated-resume": (
        ["resume='{tmp}/cut.ckpt'"],
        "`resume`='{tmp}/cut.ckpt': not a checkpoint: truncated or not a torch file.",
    ),
    "truncated-init-from": (
        ["model.init_from='{tmp}/cut.ckpt'"],
        "`model.init_from`='{tmp}/cut.ckpt': not a checkpoint: truncated or not a torch file.",
    ),
    "truncated-teacher": (
        ["recipe=gmp_distill", "recipe.distillation.teacher_ckpt='{tmp}/cut.ckpt'"],
        "recipe.distillation: `teacher_ckpt`='{tmp}/cut.ckpt': not a checkpoint: truncated",
    ),
    "not-a-number": (
        ["recipe.pruning.final_sparsity=abc"],
        "recipe.pruning: `final_sparsity`='abc' is not a number; it must be in [0, 1).",
    ),
    "image-folder-without-root": (
        ["data=image_folder"],
        "`data.root` is required and was not given: add data.root=<value> to the command line.",
    ),
    "image-folder-root-missing": (
        ["data=image_folder", "data.root='{tmp}/images'"],
        "`data.root`='{tmp}/images': not found; point it at the data's folder.",
    ),
    "latency-runs": (
        ["latency_runs=0"],
        "`latency_runs`=0 is not allowed; give the number of timed ONNX Runtime runs per model",
    ),
    "nothing-to-do": (
        ["resume='{tmp}/done'", "trainer.max_epochs=2"],
        "`resume`='{tmp}/done': nothing to do: the run has trained all its 2 epochs",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_users_error_is_one_sentence_and_nothing_is_written(
    compose_run_cfg: ComposeRunCfg,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    _truncated(tmp_path / "cut.ckpt")
    _finished_run(tmp_path / "done")
    overrides, message = CASES[case]
    run_dir = tmp_path / "run"
    # A resumed run keeps its recipe: the quick overrides would choose another.
    quick = [] if case == "nothing-to-do" else [*QUICK, *QUICK_PRUNING]
    given = [o.format(tmp=tmp_path) for o in overrides]
    cfg = compose_run_cfg(*quick, *given, output_dir=run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(message.format(tmp=tmp_path)), err[0]
    # The failure is on record; nothing of the run is written.
    written = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert written in ([], ["summary.json"]), written
    if written:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed"
        assert "Traceback" in summary["traceback"]


def test_a_misspelled_key_gets_the_nearest_name_before_hydras_hint() -> None:
    result = run_app("recipe.pruning.final_sparsty=0.9", "hydra.run.dir=/nonexistent/never")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert "Did you mean 'recipe.pruning.final_sparsity'?" in line
    assert line.index("Did you mean") < line.index("+recipe.pruning.final_sparsty=0.9")
    assert not Path("/nonexistent/never").exists()


def test_a_null_config_group_names_the_group_and_its_options() -> None:
    # Hydra's own message: "Config group override must be a string or a list. Got NoneType".
    result = run_app("recipe=null", "hydra.run.dir=/nonexistent/never")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("`recipe=null`: recipe is a config group; choose one of its")
    assert "gmp_qat_distill" in lines[0]
    assert "`recipe=dense` trains with no compression" in lines[0]
    assert not Path("/nonexistent/never").exists()


def test_a_misspelled_key_in_a_sweep_is_caught_too() -> None:
    result = run_app("-m", "trainer.max_epoch=1,2", "hydra.sweep.dir=/nonexistent/never")
    assert result.returncode == 1
    assert "Did you mean 'trainer.max_epochs'?" in result.stderr


@pytest.mark.slow
def test_the_app_prints_the_message_alone_and_keeps_the_traceback_in_its_log(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nope.ckpt"
    run_dir = tmp_path / "run"
    result = run_app(*QUICK, f"ckpt_path={missing}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"`ckpt_path`='{missing}': not found; give a run dir or a checkpoint file."
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert not (run_dir / "recipe.yaml").exists()
    assert not (run_dir / "csv").exists()
    log = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log
    assert "not found; give a run dir" in log
    # HYDRA_FULL_ERROR=1 asks for the whole story, as with any Hydra app.
    full = forkserver.run(
        [
            "-m",
            "lightning_sparse.train",
            *QUICK,
            f"ckpt_path={missing}",
            f"hydra.run.dir={tmp_path / 'full'}",
        ],
        REPO,
        {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONWARNINGS": "ignore"},
        timeout=240,
    )
    assert full.returncode == 1
    assert "Traceback (most recent call last)" in full.stderr
    assert "FileNotFoundError" in full.stderr
