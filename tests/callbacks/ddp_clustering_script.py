"""Run by tests/callbacks/test_weight_clustering.py: weight clustering under CPU DDP (gloo).

A standalone module: each rank runs this command (tests.helpers.run_ddp_script starts both,
as torchrun does; alone, Lightning's launcher would start rank 1 by re-running it).
Usage, from the repository root: python -m tests.callbacks.ddp_clustering_script OUT_DIR
Each rank writes OUT_DIR/rank<r>.pt with its codebooks at clustering and at the end, and its final
weights. Rank 1's weights are perturbed just before clustering, so its own k-means would differ:
the broadcast must make rank 0's codebooks win.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sparse.callbacks import WeightClustering
from tests.helpers import TinyData, TinyModule, end_ddp, quiet_trainer


class RecordingClustering(WeightClustering):
    """Records the centroids as clustered; rank 1 clusters from perturbed weights."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at_clustering: dict[str, torch.Tensor] = {}

    def _maybe_cluster(self, trainer: pl.Trainer) -> None:
        due = not self.clustered and self._targets and trainer.global_step >= 5
        if due and trainer.global_rank == 1:
            with torch.no_grad():
                for param in self._targets.values():
                    param.mul_(1.5)
        super()._maybe_cluster(trainer)
        if due and self.clustered:
            self.at_clustering = {n: c.clone() for n, (c, _, _) in self.codebooks.items()}


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    clustering = RecordingClustering(num_clusters=4, start_epoch=1.0, centroid_lr=1e-2)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[clustering])
    module = TinyModule()
    trainer.fit(module, TinyData())
    torch.save(
        {
            "codebooks": {
                n: {"centroids": c.clone(), "assignments": a.clone(), "mask": m.clone()}
                for n, (c, a, m) in clustering.codebooks.items()
            },
            "at_clustering": clustering.at_clustering,
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "world_size": trainer.world_size,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
    end_ddp()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
