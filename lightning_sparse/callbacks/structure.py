"""The base of techniques that remove or replace parameters while training goes on.

Such a change (channel removal, low-rank factorization) is described as plain data and applied by
``lightning_sparse.core.structure``; this base does what Lightning needs around it (DESIGN.md,
contract 3):

- every rank applies rank 0's change (one broadcast of the plain data);
- the optimizers follow: each optimizer's param groups point at the new parameters, with their
  state (momentum, Adam's moments) cut as the parameters were, so a kept channel keeps its moments
  and the removed tensors are no longer stepped; the optimizer object itself, its learning rates
  and its schedulers stay;
- under DDP the model is wrapped anew, so gradient buckets match the new parameters;
- the change is recorded in the callback's state, and the module's
  :class:`~lightning_sparse.module.CompressionModule` hooks replay the log on a fresh model before
  a checkpoint's weights load (Lightning calls the module's ``on_load_checkpoint`` before it loads
  them, and no callback hook comes earlier with the checkpoint), so resume, export, one-shot and
  ``init_from`` rebuild the architecture from the checkpoint alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_sparse.callbacks.base import MASKS, STRUCTURE, CompressionCallback
from lightning_sparse.core.structure import (
    FORMAT,
    ParamChange,
    applied_changes,
    apply_change,
    count_macs,
    remap_optimizer,
    structure_state,
)
from lightning_sparse.module import CompressionModule, copy_without_trainer, drop_instance_forwards

__all__ = ["StructuralCompression", "follow_structure_change", "plain_copy"]


def plain_copy(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` in eval mode to trace and measure (no trainer, no fake quant)."""
    if isinstance(model, pl.LightningModule):
        return drop_instance_forwards(copy_without_trainer(model)).eval()
    return drop_instance_forwards(copy.deepcopy(model)).eval()


def _example(batch: Any) -> torch.Tensor | None:
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return inputs[:1].detach() if isinstance(inputs, torch.Tensor) else None


def follow_structure_change(trainer: pl.Trainer, changes: list[ParamChange]) -> None:
    """Make training go on with the replaced parameters: optimizers and the DDP wrapper.

    Call on every rank, at the same point, after the model changed (wrapping in DDP is collective).
    """
    for optimizer in trainer.optimizers:
        remap_optimizer(optimizer, changes)
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        # DDP sized its gradient buckets, and hooked each parameter, at wrapping time: wrap the
        # changed module anew (the old wrapper's hooks sit on parameters no longer in use).
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


class StructuralCompression(CompressionCallback):
    """The base of techniques that change the model's structure on the epoch clock.

    A subclass declares ``changes = frozenset({STRUCTURE})`` and calls
    :meth:`apply_structure_change` with a change it proposes (a plain ``dict`` of a kind known to
    ``core.structure``); rank 0's proposal is applied on every rank, the optimizers and DDP follow
    it, and it is kept in :meth:`state_dict` under ``structure``. It needs the LightningModule to
    mix in :class:`~lightning_sparse.module.CompressionModule`, whose ``on_load_checkpoint``
    replays the changes before a resumed run's weights load.

    Args:
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        TypeError: at ``setup``, a LightningModule without the ``CompressionModule`` mixin.
        ValueError: at ``setup``, a technique holding masks in the same run (its masks would stay
            on the replaced tensors).
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name)
        if STRUCTURE not in self.changes:
            raise TypeError(f"{type(self).__name__} must declare `changes` with {STRUCTURE!r}.")
        self._structure: list[dict[str, Any]] = []
        # What the changes cost: per-sample MACs before the first change and after the last,
        # counted on one sample of the first training batch.
        self._example: torch.Tensor | None = None
        self._dense_macs: int | None = None
        self._macs: int | None = None

    @property
    def structure_changes(self) -> list[dict[str, Any]]:
        """The changes this technique applied (plain data, in order)."""
        return [dict(change) for change in self._structure]

    @property
    def dense_macs(self) -> int | None:
        """Per-sample MACs of the model before the first change (None until measured)."""
        return self._dense_macs

    @property
    def macs(self) -> int | None:
        """Per-sample MACs of the model after the last change (None until measured)."""
        return self._macs

    def _keep_example(self, batch: Any) -> None:
        """Keep one sample of the first training batch to count MACs on."""
        if self._example is None:
            self._example = _example(batch)

    def _count_macs(self, pl_module: pl.LightningModule) -> int:
        """Per-sample MACs of ``pl_module`` now (on the kept example; call after keeping one)."""
        assert self._example is not None
        return count_macs(plain_copy(pl_module), self._example.to(pl_module.device))

    def _size_metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """``params``, and ``macs`` with ``macs_removed`` once measured, under the log prefix."""
        prefix = f"compression/{self.log_name}"
        metrics = {f"{prefix}/params": float(sum(p.numel() for p in pl_module.parameters()))}
        if self._macs is not None and self._dense_macs:
            metrics[f"{prefix}/macs"] = float(self._macs)
            metrics[f"{prefix}/macs_removed"] = 1.0 - self._macs / self._dense_macs
        return metrics

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not isinstance(pl_module, CompressionModule):
            raise TypeError(
                f"{type(self).__name__} changes the model's structure, and a resumed run must "
                "rebuild it before the checkpoint's weights load, which Lightning lets only the "
                f"LightningModule do; {type(pl_module).__name__} does not mix in "
                "lightning_sparse.module.CompressionModule. Declare "
                "`class M(CompressionModule, LightningModule)`."
            )
        if stage == "fit":
            callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
            for other in callbacks:
                if isinstance(other, CompressionCallback) and MASKS in other.changes:
                    raise ValueError(
                        f"{type(self).__name__} ({self.state_key}) and {type(other).__name__} "
                        f"({other.state_key}) cannot train together yet: masks are held on the "
                        "parameters that a structure change replaces. Remove channels first and "
                        "prune the smaller model in a run of its own (model.init_from=<its run>)."
                    )

    def apply_structure_change(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        propose: Callable[[], Mapping[str, Any] | None],
    ) -> dict[str, Any] | None:
        """Apply rank 0's proposed change on every rank and let training follow it.

        Args:
            trainer: the trainer (its optimizers and strategy follow the change).
            pl_module: the module to change.
            propose: returns the change (without ``seq``), or None for none; called on every rank,
                only rank 0's result counts.

        Returns:
            The change as applied (with its ``seq``), or None when rank 0 proposed none.
        """
        proposal = propose()
        if trainer.world_size > 1:
            proposal = trainer.strategy.broadcast(
                None if proposal is None else dict(proposal), src=0
            )
        if proposal is None:
            return None
        replaced = apply_change(pl_module, proposal)
        change = applied_changes(pl_module)[-1]
        self._structure.append(change)
        follow_structure_change(trainer, replaced)
        return change

    def _structure_state(self) -> dict[str, Any]:
        """The state entries of this base: ``dense_macs``, ``macs`` and ``structure``."""
        return {
            "dense_macs": self._dense_macs,
            "macs": self._macs,
            "structure": structure_state(self._structure),
        }

    def _load_structure(self, state: Mapping[str, Any]) -> None:
        dense, macs = state.get("dense_macs"), state.get("macs")
        self._dense_macs = None if dense is None else int(dense)
        self._macs = None if macs is None else int(macs)
        structure = state.get("structure")
        if isinstance(structure, Mapping) and structure.get("format") == FORMAT:
            self._structure = [dict(change) for change in structure.get("changes", [])]
