from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_sparse.core.masks import compute_masks, parse_mask_type
from lightning_sparse.core.schedule import SparsitySchedule
from tests.helpers import run_ddp_script

# the schedule the script configures
SCHEDULE = SparsitySchedule(0.0, 0.8, start_epoch=0.5, end_epoch=2, update_frequency=0.5)


@pytest.mark.slow
def test_masks_are_identical_on_both_ranks_and_match_a_single_process(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.callbacks.ddp_pruning_script", tmp_path)
    # 40 samples per rank, batch 8 -> 5 steps per epoch; updates at 0.5, 1.0, 1.5, 2.0
    assert [h["index"] for h in rank0["history"]] == [0, 1, 2, 3]
    assert [h["index"] for h in rank1["history"]] == [0, 1, 2, 3]
    for update0, update1 in zip(rank0["history"], rank1["history"], strict=True):
        # rank 1 proposed inverted masks; after the broadcast both hold rank 0's
        for name, mask in update0["masks"].items():
            assert torch.equal(mask, update1["masks"][name]), (update0["index"], name)
        # and rank 0's masks are what one process computes from the same weights
        single = compute_masks(
            update0["weights_before"],
            SCHEDULE.sparsity_at_index(update0["index"]),
            parse_mask_type("unstructured"),
            global_sparsity=True,
        )
        for name, mask in single.items():
            assert torch.equal(mask, update0["masks"][name]), (update0["index"], name)
    # DDP kept the weights in sync, and the pruned ones are zero on both ranks
    for name, weight in rank0["final"].items():
        assert torch.equal(weight, rank1["final"][name]), name
    total = sum(m.numel() for m in rank0["history"][-1]["masks"].values())
    zeros = sum(int((rank0["final"][n] == 0).sum()) for n in rank0["history"][-1]["masks"])
    assert zeros == round(0.8 * total)
