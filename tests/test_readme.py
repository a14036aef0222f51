"""Every command block of the README runs as a reader would paste it, shortened where it is long.

Commands are read from the README itself, so a new example is run without editing this test; one
that cannot run here (a cluster, two machines, a fresh virtualenv) is named in :data:`SKIPPED`
with the reason, and an unknown kind of command fails the test. Training commands get
``debug=quick`` (every epoch of the recipe, a few batches each), sweeps fewer values; the run
dirs the README writes as ``runs/train/<date>/<time>`` are made by fixtures first.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests import forkserver

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SPARSEML_CARD = REPO / "tests" / "run" / "sparseml_recipes" / "bert_prune90_distill.md"

pytestmark = pytest.mark.slow

# Commands that cannot run on this machine, by a word they hold -> why.
SKIPPED = {
    "make": "builds a fresh virtualenv (minutes); the job it runs is run below as python -m ...",
    "torchrun": "needs two machines",
    "hydra/launcher=slurm": "needs a SLURM cluster",
    "#SBATCH": "a SLURM batch script: needs a SLURM cluster",
}
# Commands an e2e test runs with the same launcher and stronger assertions, by a word they hold ->
# that test (it must pass the word as an argument of its run).
COVERED = {
    "hydra/launcher=joblib": (
        "tests/e2e/test_sweeps.py::test_grid_sweep_on_joblib_runs_every_combination_in_its_own_dir"
    ),
}
# Shortenings: the same command with fewer sweep values, trials or parallel jobs.
SHORTER = {
    "seed=0,1,2": "seed=0",
    "hydra.sweeper.n_trials=40": "hydra.sweeper.n_trials=2",
    "recipe.pruning.final_sparsity=0.8,0.9,0.95": "recipe.pruning.final_sparsity=0.8,0.95",
}


def code_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in README order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def bash_commands() -> list[str]:
    """Every command of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for language, code in code_blocks():
        if language != "bash":
            continue
        if code.startswith("#!"):
            commands.append(code)  # a script, kept whole
            continue
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def _skip_reason(command: str) -> str | None:
    covered = {word: f"run by {test}" for word, test in COVERED.items()}
    return next((why for word, why in {**SKIPPED, **covered}.items() if word in command), None)


@pytest.mark.parametrize(("word", "test"), COVERED.items())
def test_a_covered_command_is_run_by_the_test_named(word: str, test: str) -> None:
    path, name = test.split("::")
    source = (REPO / path).read_text()
    assert f"def {name}(" in source, test
    body = source[source.index(f"def {name}(") :]
    body = body[: body.find("\ndef ", 1)]
    assert f'"{word}"' in body, f"{test} does not run {word}"
    assert any(word in command for command in bash_commands()), f"no README command holds {word}"


def test_every_command_is_run_or_skipped_for_a_reason() -> None:
    commands = bash_commands()
    assert len(commands) >= 20
    for command in commands:
        runnable = command.startswith("python -m lightning_sparse.")
        assert runnable or _skip_reason(command), (
            f"README command neither run nor skipped: {command}"
        )


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return forkserver.run(
        args,
        cwd,
        {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONWARNINGS": "ignore",
            "WANDB_MODE": "offline",
            "HYDRA_FULL_ERROR": "0",
            **(env or {}),
        },
        timeout,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module")
def trained(work: Path) -> Path:
    """``runs/train/<date>/<time>``: the main job, quick, 50 of its 60 epochs (so it can grow)."""
    run_dir = work / "trained"
    result = _run(
        [
            "-m",
            "lightning_sparse.train",
            "debug=quick",
            "trainer.max_epochs=50",
            f"hydra.run.dir={run_dir}",
        ],
        work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def wide(work: Path) -> Path:
    """A trained SmallCNN of width 128, the README's "wider trained teacher"."""
    run_dir = work / "wide"
    result = _run(
        [
            "-m",
            "lightning_sparse.train",
            "debug=quick",
            "recipe=dense",
            "model.model.width=128",
            "export=false",  # a teacher: its checkpoint is what is read
            f"hydra.run.dir={run_dir}",
        ],
        work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def sweep(work: Path) -> Path:
    """``runs/train/multirun/<date>/<time>``: a two-job sweep, quick."""
    sweep_dir = work / "sweep"
    result = _run(
        [
            "-m",
            "lightning_sparse.train",
            "-m",
            "debug=quick",
            "recipe.pruning.final_sparsity=0.8,0.9",
            "export=false",  # compare reads the summaries
            f"hydra.sweep.dir={sweep_dir}",
        ],
        work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def _runnable() -> list[str]:
    return [c for c in bash_commands() if c.startswith("python -m") and not _skip_reason(c)]


def _command_id(command: str) -> str:
    """The command itself (tests/conftest.py reads it to keep dependent commands together)."""
    return command.removeprefix("python -m lightning_sparse.").splitlines()[0]


@pytest.mark.parametrize("command", _runnable(), ids=_command_id)
def test_the_command_runs(
    command: str, request: pytest.FixtureRequest, work: Path, tmp_path: Path
) -> None:
    args = shlex.split(command)[1:]  # without `python`
    for long, short in SHORTER.items():
        args = [short if arg == long else arg for arg in args]
    placeholders = {
        "runs/train/multirun/<date>/<time>": lambda: str(request.getfixturevalue("sweep")),
        "runs/train/<date>/<time>": lambda: str(
            request.getfixturevalue("wide" if "teacher_model" in command else "trained")
        ),
    }
    resolved = []
    for arg in args:
        for placeholder, value in placeholders.items():
            if placeholder in arg:
                arg = arg.replace(placeholder, value())
        # The README's SparseML card: one of the test fixtures with the same structure.
        arg = arg.replace(
            "bert-prune90.md", str(REPO / "tests/run/sparseml_recipes/bert_prune90_distill.md")
        )
        if arg == "ckpt_path=...":
            arg = f"ckpt_path={request.getfixturevalue('trained')}"
        resolved.append(arg)
    entry = resolved[1]
    multirun = "-m" in resolved[2:] or any(a.startswith("hparams_search=") for a in resolved)
    resuming = any(arg.startswith("resume=") for arg in resolved)
    if entry == "lightning_sparse.train" and not resuming:
        resolved.append("debug=quick")  # every epoch of the recipe, a few batches each
    if entry in ("lightning_sparse.train", "lightning_sparse.oneshot"):
        resolved.append(f"hydra.{'sweep' if multirun else 'run'}.dir={tmp_path / 'out'}")
    result = _run(resolved, work)
    if resuming and not any(arg.startswith("trainer.max_epochs=") for arg in resolved):
        # The fixture's run has trained all its epochs: continuing it as it was has nothing to
        # do, and says so (the README's next command extends it).
        assert result.returncode == 1
        assert "nothing to do" in result.stderr
        assert "Traceback" not in result.stderr
        return
    assert result.returncode == 0, f"{shlex.join(resolved)}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr


def test_the_python_blocks_run_in_order(work: Path) -> None:
    """The "From Python" blocks, one after the other as in a notebook."""
    script = "\n\n".join(code for language, code in code_blocks() if language == "python")
    path = work / "readme_blocks.py"
    path.write_text(script)
    result = _run([str(path)], work, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"test accuracy (\d+\.\d+)%, sparsity (\d+\.\d+)%", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) > 80
    assert float(match.group(2)) == pytest.approx(90.0, abs=0.01)
    assert (work / "export" / "model.onnx").is_file()
