"""A pruning criterion of your own: first-order Taylor importance, on the project's schedule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sparse import GradualPruning


class TaylorPruning(GradualPruning):
    """Keep the weights with the largest |W * dL/dW|, summed over the steps since the last update.

    Scheduling, N:M/block/channel shapes, enforcement, resume and the DDP broadcast come from
    GradualPruning; only the scores are new (Molchanov et al. 2019, per weight).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.importance: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # pruned grads zeroed
        for name, weight in self.targets.items():
            if weight.grad is not None:
                step = (weight.detach() * weight.grad).abs()
                prior = self.importance.get(name)
                self.importance[name] = step if prior is None else prior.to(step.device) + step

    def scores(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        weights = {name: w.detach().abs() for name, w in self.targets.items()}
        scores = {name: self.importance.get(name, w) for name, w in weights.items()}
        self.importance = {}  # the next update ranks the steps after this one
        return scores

    def state_dict(self) -> dict[str, Any]:  # exact resume: the sums so far are state
        importance = {name: t.cpu() for name, t in self.importance.items()}
        return {**super().state_dict(), "importance": importance}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.importance = dict(state_dict.get("importance", {}))
