from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import run_ddp_script


@pytest.mark.slow
def test_both_ranks_remove_rank_zeros_channels_and_train_on_in_sync(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.callbacks.ddp_channel_script", tmp_path)
    # 40 samples per rank, batch 8 -> 5 steps per epoch; updates at 0.5, 1.0, 1.5, 2.0 (one of
    # them may find the target met already: channels go in whole steps)
    assert len(rank0["proposed"]) == len(rank1["proposed"]) == 4
    assert len(rank0["changes"]) >= 3
    assert rank0["changes"] == rank1["changes"]
    # rank 1 proposed other channels; rank 0's were applied on both
    assert rank1["proposed"] != rank0["proposed"]
    assert [change["layers"] for change in rank0["changes"]] == [
        proposal["layers"] for proposal in rank0["proposed"] if proposal is not None
    ]
    # after every removal the model was wrapped anew around the new parameters
    assert rank0["wrapped"] == rank1["wrapped"] == [True] * 4
    # DDP kept averaging the new parameters' gradients: the ranks end with equal weights
    for name, weight in rank0["final"].items():
        assert torch.equal(weight, rank1["final"][name]), name
    assert rank0["final"]["model.conv1.weight"].shape[0] < 8
