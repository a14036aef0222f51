from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import run_ddp_script


@pytest.mark.slow
def test_both_ranks_factorize_with_rank_zeros_ranks_and_train_on_in_sync(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.callbacks.ddp_low_rank_script", tmp_path)
    assert rank0["world_size"] == 2
    # rank 1 proposed other ranks; rank 0's were applied on both
    assert rank1["proposed"] != rank0["proposed"]
    assert len(rank0["changes"]) == len(rank1["changes"]) == 1
    assert rank0["changes"] == rank1["changes"]
    assert rank0["changes"][0]["layers"] == rank0["proposed"][0]["layers"]
    # the model was wrapped anew around the factors
    assert rank0["wrapped"] == rank1["wrapped"] == [True]
    # DDP kept averaging the factors' gradients: the ranks end with equal weights
    assert "model.fc1.0.weight" in rank0["final"]
    for name, weight in rank0["final"].items():
        assert torch.equal(weight, rank1["final"][name]), name
