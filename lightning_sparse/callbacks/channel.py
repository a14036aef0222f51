"""Channel pruning that removes channels: a smaller, faster model, not a masked one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import (
    STRUCTURE,
    ScheduledCompression,
    fractional_epoch,
    to_plain,
)
from lightning_sparse.callbacks.structure import StructuralCompression, plain_copy
from lightning_sparse.core.channels import (
    IMPORTANCES,
    TARGETS,
    ChannelPlan,
    check_allocation,
    plan_removal,
)
from lightning_sparse.core.pruning_backend import channel_groups, require
from lightning_sparse.core.structure import applied_changes
from lightning_sparse.core.targets import (
    ALL_PRUNABLE,
    output_layer,
    output_weight_excluded,
    prunable_parameters,
    resolve_params,
)

__all__ = [
    "ChannelPruning",
    "kept_outputs",
    "plain_copy",
    "propose_channel_removal",
]


def kept_outputs(model: nn.Module, selected: Sequence[str], head: str | None) -> list[str]:
    """Layers whose outputs must all stay: the head and every Conv/Linear not in ``selected``."""
    chosen = {name.removesuffix(".weight") for name in selected}
    layers = [name.removesuffix(".weight") for name in prunable_parameters(model)]
    keep = [name for name in layers if name not in chosen]
    head_layer = output_layer(model, head)
    return keep if head_layer in keep else [*keep, head_layer]


def propose_channel_removal(
    model: nn.Module,
    example: torch.Tensor,
    *,
    sparsity: float,
    target: str,
    importance: str,
    selected: Sequence[str],
    head: str | None,
    dense_macs: int,
    round_to: int = 1,
    taylor: dict[str, torch.Tensor] | None = None,
    from_dense: bool = True,
    allocation: str = "uniform",
    max_group_sparsity: float = 0.9,
) -> ChannelPlan:
    """The channels to remove from ``model`` now (see ``core.channels.plan_removal``).

    Args:
        model: the model as it is; traced on a copy, so it is left exactly as it was.
        example: an input batch for the trace.
        sparsity: share of the dense ``target`` removed after this removal.
        target: ``macs`` or ``channels``.
        importance: ``l1``, ``l2``, ``bn_scale`` or ``taylor``.
        selected: weights whose output channels may go (resolved ``params``).
        head: the output layer (None: the last Conv/Linear layer), which keeps its outputs.
        dense_macs: per-sample MACs of the dense model.
        round_to: keep channel counts multiple of this.
        taylor: accumulated ``|w * grad|`` by weight name, for ``importance="taylor"``.
        from_dense: channel shares are of the widths before the model's earlier removals (a
            schedule's later updates); False: of the widths as they are (a one-shot step).
        allocation: ``uniform`` (every group keeps the same share) or ``global`` (one ranking
            across groups).
        max_group_sparsity: with ``global``, the most of a group's width that may go.
    """
    copied = plain_copy(model)
    # The graph is traced through autograd: a frozen layer would be invisible to it.
    for param in copied.parameters():
        param.requires_grad_(True)
    with torch.enable_grad():
        groups = channel_groups(copied, example, kept_outputs(copied, selected, head))
    return plan_removal(
        copied,
        example,
        groups,
        sparsity=sparsity,
        target=target,
        importance=importance,
        dense_macs=dense_macs,
        history=applied_changes(model) if from_dense else (),
        round_to=round_to,
        taylor=taylor,
        allocation=allocation,
        max_group_sparsity=max_group_sparsity,
    )


class ChannelPruning(ScheduledCompression, StructuralCompression):
    """Remove the least important channels during training, until a share of the MACs is gone.

    Unlike ``MagnitudePruning(mask_type="channel")``, which zeroes channels and keeps computing
    them, this removes them: Conv/Linear layers get fewer filters, the layers that read them fewer
    inputs, and the exported model does less work. Coupled layers shrink together (found by
    torch-pruning's dependency graph): a residual stage's blocks and its shortcut, a depthwise
    convolution's inputs and outputs, BatchNorm features, the next layer's inputs, the inputs
    after a flatten or a concatenation. The model's output layer keeps all its outputs.

    When it acts: updates fall at ``start_epoch``, every ``update_frequency`` epochs after it and
    at ``end_epoch``, on the fractional-epoch clock; an update due at optimizer step ``s`` is
    applied right after that step (before the first batch for step 0). An update removes channels
    so that ``init_sparsity`` .. ``final_sparsity`` (interpolated by ``inter_func``) of the dense
    model's MACs (``target="macs"``) or of its prunable channels (``target="channels"``) are gone,
    every group of coupled channels keeping the same share of its dense width, its least important
    channels going first; with ``allocation="global"`` the least important channels go wherever
    they are (one ranking across groups, as Network Slimming's threshold on |gamma|), so layers end
    up with different widths, none losing more than ``max_group_sparsity``. The optimizer
    follows the smaller parameters (their moments cut alike), under DDP the model is wrapped
    anew, and every rank removes rank 0's choice. Each removal is
    recorded in the checkpoint, so resume, export, one-shot and ``init_from`` rebuild the smaller
    model (the LightningModule must mix in ``CompressionModule``). Logs
    ``compression/<name>/macs``, ``.../macs_removed`` and ``.../params`` per epoch.

    Args:
        final_sparsity: share of the dense model's MACs (or channels) removed at ``end_epoch``,
            in [0, 1).
        init_sparsity: share removed at ``start_epoch``, in [0, final_sparsity].
        start_epoch: fractional epoch of the first update.
        end_epoch: fractional epoch of the last update.
        update_frequency: epochs between updates.
        inter_func: ``linear``, ``cubic`` (fast early) or ``inverse_cubic``.
        target: ``macs`` (multiply-accumulates of the Conv/Linear layers on one sample) or
            ``channels`` (output channels of the prunable groups).
        importance: how channels are ranked: ``l1`` / ``l2`` (norm of the weights a channel owns:
            its filter and the next layers' weights that read it), ``bn_scale`` (|gamma| of its
            BatchNorm), ``taylor`` (|w * grad| of those weights, accumulated over the optimizer
            steps since the last update; needs ``start_epoch`` > 0).
        params: Conv/Linear weights whose output channels may go: names, ``re:`` patterns or
            ``__ALL_PRUNABLE__``. A group of coupled channels goes only if every layer whose outputs
            it removes is selected. The output layer is never selected.
        head: the output layer's name (``model.fc``); None: the model's last Conv/Linear layer.
        round_to: keep channel counts multiple of this (e.g. 8 for vector units).
        allocation: ``uniform`` (every group of coupled channels keeps the same share of its
            dense width) or ``global`` (one ranking across groups: ``bn_scale`` compares |gamma|
            directly, weight norms as a share of their layer's mean; see ``core.channels``).
        max_group_sparsity: with ``global``, the most of one group's dense width that may go,
            in [0, 1) (a global ranking could otherwise empty a layer).
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range or unknown (the message names it); at ``setup``,
            ``params`` naming the output layer or nothing.
        TypeError: at ``setup``, a LightningModule without the ``CompressionModule`` mixin.
        ImportError: torch-pruning is not installed (extra ``structured``).

    Example::

        trainer = Trainer(
            max_epochs=8,
            callbacks=[ChannelPruning(final_sparsity=0.75, start_epoch=0.5, end_epoch=3)],
        )
        trainer.fit(ClassificationModule(resnet18(num_classes=10, in_channels=1)), datamodule)
    """

    changes = frozenset({STRUCTURE})

    def __init__(
        self,
        final_sparsity: float,
        init_sparsity: float = 0.0,
        start_epoch: float = 0.0,
        end_epoch: float = 5.0,
        update_frequency: float = 1.0,
        inter_func: str = "cubic",
        target: str = "macs",
        importance: str = "l1",
        params: str | Sequence[str] = ALL_PRUNABLE,
        head: str | None = None,
        round_to: int = 1,
        allocation: str = "uniform",
        max_group_sparsity: float = 0.9,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self._set_schedule(
            init_sparsity,
            final_sparsity,
            start_epoch,
            end_epoch,
            update_frequency,
            inter_func,
            grows="channels only go",
        )
        if target not in TARGETS:
            raise ValueError(f"`target`={target!r} is not allowed; choose one of {TARGETS}.")
        if importance not in IMPORTANCES:
            raise ValueError(
                f"`importance`={importance!r} is not allowed; choose one of {IMPORTANCES}."
            )
        if importance == "taylor" and start_epoch <= 0:
            raise ValueError(
                f"`importance`='taylor' ranks channels by gradients accumulated before each "
                f"update, but `start_epoch`={start_epoch} leaves no step before the first one; "
                "set start_epoch > 0 (e.g. 0.25)."
            )
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise ValueError(f"`round_to`={round_to!r} is not allowed; it must be an int >= 1.")
        check_allocation(allocation, max_group_sparsity)
        plain = to_plain(params)
        plain = [plain] if isinstance(plain, str) else plain
        if not isinstance(plain, list) or not plain or not all(isinstance(p, str) for p in plain):
            raise ValueError(
                f"`params`={params!r} must be a parameter name, an `re:` pattern, "
                f"{ALL_PRUNABLE!r}, or a non-empty list of these."
            )
        if head is not None and (not isinstance(head, str) or not head):
            raise ValueError(f"`head`={head!r} is not allowed; give a layer name or null.")
        self.target = target
        self.importance = importance
        self.params: list[str] = plain
        self.head = head
        self.round_to = round_to
        self.allocation = allocation
        self.max_group_sparsity = float(max_group_sparsity)
        self._targets: list[str] = []
        self._taylor: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------
    # The declared interface

    @override
    def resolve_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return resolve_params(model, self.params, exclude=output_weight_excluded(model, self.head))

    @property
    @override
    def target_names(self) -> list[str]:
        return list(self._targets)

    @override
    def check_model(self, model: nn.Module) -> None:
        self.resolve_targets(model)
        require(type(self).__name__)

    @override
    def target_curve(self, epochs: list[float]) -> dict[str, list[float]] | None:
        label = "target MACs removed" if self.target == "macs" else "target channels removed"
        return {label: [self.schedule.sparsity_at(e) for e in epochs]}

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._targets = list(self.resolve_targets(pl_module))
            require(type(self).__name__)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._keep_example(batch)
        self._maybe_update(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.importance != "taylor" or self._applied_index >= self.schedule.num_updates - 1:
            return
        with torch.no_grad():
            for name, weight in prunable_parameters(pl_module).items():
                if weight.grad is None:
                    continue
                score = (weight.detach() * weight.grad).abs()
                total = self._taylor.get(name)
                if total is None or total.shape != score.shape:
                    self._taylor[name] = score.clone()
                else:
                    self._taylor[name] = total.to(score.device) + score

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._maybe_update(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {
            **self._size_metrics(pl_module),
            f"compression/{self.log_name}/target": float(
                self.schedule.sparsity_at_index(self._applied_index)
            ),
        }
        # Every rank holds the same structure; syncing only quiets Lightning's DDP warning.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    # ----------------------------------------------------------------------------------------
    # Updates

    def _maybe_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.should_update(trainer)
        if due is None or self._example is None:
            return
        sparsity = self.schedule.sparsity_at_index(due)
        change = self.apply_structure_change(
            trainer, pl_module, lambda: self.propose_change(trainer, pl_module, sparsity)
        )
        self._applied_index = due
        self._taylor = {}
        self._macs = self._count_macs(pl_module)
        if change is not None:
            dense = self._dense_macs or self._macs
            rank_zero_info(
                f"{self.log_name} at epoch {fractional_epoch(trainer):.3f}: "
                f"{sum(len(s.get('out', [])) for s in change['layers'].values())} output channels "
                f"removed; MACs {self._macs:,} = {self._macs / dense:.1%} of dense (target "
                f"{1 - sparsity:.1%} of {self.target})."
            )

    def propose_change(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsity: float
    ) -> dict[str, Any] | None:
        """The ``remove_channels`` change that brings the model to ``sparsity``; None if none.

        Overridable (e.g. to rank channels another way). Runs on a copy of the module, so the
        model's BatchNorm statistics and quantization observers are left alone; every rank calls
        it and rank 0's result is applied everywhere.
        """
        assert self._example is not None
        example = self._example.to(pl_module.device)
        if self._dense_macs is None:
            self._dense_macs = self._count_macs(pl_module)
        plan = propose_channel_removal(
            pl_module,
            example,
            sparsity=sparsity,
            target=self.target,
            importance=self.importance,
            selected=self._targets,
            head=self.head,
            dense_macs=self._dense_macs,
            round_to=self.round_to,
            taylor=self._taylor,
            allocation=self.allocation,
            max_group_sparsity=self.max_group_sparsity,
        )
        if not plan.reached:
            fewest = (
                f"{max(1, self.round_to)} channel(s) per group"
                if self.allocation == "uniform"
                else f"{1 - self.max_group_sparsity:.0%} of each group (max_group_sparsity)"
            )
            rank_zero_warn(
                f"{self.log_name}: removing {sparsity:.1%} of the {self.target} is more than the "
                f"prunable layers hold; keeping {fewest}."
            )
        return plan.change if plan.change["layers"] else None

    # ----------------------------------------------------------------------------------------
    # State

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.state_version,
            "applied_index": self._applied_index,
            **self._structure_state(),
            "taylor": {name: t.detach().cpu().clone() for name, t in self._taylor.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_version(state_dict)
        self._applied_index = int(state_dict["applied_index"])
        self._load_structure(state_dict)
        self._taylor = dict(state_dict.get("taylor") or {})
