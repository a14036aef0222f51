"""The README's custom criterion (examples/taylor_pruning.py) gets the whole GradualPruning deal."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from examples.taylor_pruning import TaylorPruning
from lightning_sparse import MagnitudePruning
from tests.helpers import TinyModule, fit_resumable, run_ddp_script

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "taylor_pruning.py"


def _pruning() -> TaylorPruning:
    return TaylorPruning(final_sparsity=0.75, start_epoch=0.5, end_epoch=2, update_frequency=0.5)


def test_the_readme_shows_the_example_as_it_is() -> None:
    readme = (REPO / "README.md").read_text()
    code = EXAMPLE.read_text()
    body = code[code.index("class TaylorPruning") :]
    assert body.strip() in readme, "README's TaylorPruning block differs from the example file"


def test_it_reaches_the_schedule_and_ranks_by_importance_not_magnitude(tmp_path: Path) -> None:
    torch.manual_seed(0)
    taylor_module = TinyModule()
    magnitude_module = TinyModule()
    magnitude_module.load_state_dict(taylor_module.state_dict())
    taylor = _pruning()
    magnitude = MagnitudePruning(
        final_sparsity=0.75, start_epoch=0.5, end_epoch=2, update_frequency=0.5
    )
    fit_resumable(taylor_module, [taylor], tmp_path / "t", crash_at=None, ckpt_path=None)
    fit_resumable(magnitude_module, [magnitude], tmp_path / "m", crash_at=None, ckpt_path=None)
    assert taylor.applied_sparsity == pytest.approx(0.75)
    for weight in taylor.targets.values():
        assert (weight == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)
    # The same start and schedule, another criterion: different weights survive.
    assert any(not torch.equal(taylor.masks[name], magnitude.masks[name]) for name in taylor.masks)


def _run(checkpoints: Path, crash_at: int | None, ckpt_path: str | None) -> TinyModule:
    pl.seed_everything(0)
    module = TinyModule()
    # Updates every 4 steps from step 3; checkpoints every 5 steps, so step 5 holds importance
    # summed over steps 4-5.
    pruning = TaylorPruning(
        final_sparsity=0.75, start_epoch=0.3, end_epoch=1.9, update_frequency=0.4
    )
    fit_resumable(module, [pruning], checkpoints, crash_at, ckpt_path)
    return module


def test_a_crash_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = _run(tmp_path / "whole", None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        _run(tmp_path / "run", 7, None)
    checkpoint = tmp_path / "run" / "step=5.ckpt"
    state = torch.load(checkpoint, weights_only=True)["callbacks"]["TaylorPruning"]
    assert state["applied_index"] == 0
    assert set(state["importance"]) == set(state["masks"]) != set()
    resumed = _run(tmp_path / "resumed", None, str(checkpoint))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_two_ddp_ranks_hold_the_same_masks_and_weights(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.examples.ddp_taylor_script", tmp_path)
    assert set(rank0["masks"]) == set(rank1["masks"]) != set()
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name]), name
        assert 1 - mask.float().mean().item() == pytest.approx(0.75, abs=0.02)
    for name, weight in rank0["final"].items():
        assert torch.equal(weight, rank1["final"][name]), name


def test_the_example_is_about_thirty_lines() -> None:
    code = EXAMPLE.read_text()
    body = code[code.index("class TaylorPruning") :]
    lines = [line for line in body.splitlines() if line.strip() and not re.match(r"\s*#", line)]
    assert len(lines) <= 40
