"""Sparsity regularization as a loss term: L1, group lasso, or L1 on BatchNorm scales.

The penalty is added to the training loss through the ``CompressionModule`` mixin (DESIGN.md
contract 7), like distillation; the math is :mod:`lightning_sparse.core.regularization`. It drives
whole structures towards zero while the model trains, so that pruning them afterwards (channel
masks, channel removal) costs little accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import (
    LOSS,
    CompressionCallback,
    ScheduleLimit,
    fractional_epoch,
    is_number,
    smoke_run,
    steps_per_epoch,
    to_plain,
)
from lightning_sparse.core.masks import MaskType
from lightning_sparse.core.regularization import (
    PENALTIES,
    fraction_below,
    parse_groups,
    penalty,
    penalty_reach,
    resolve_penalty_params,
    strength_factor,
)
from lightning_sparse.core.targets import ALL_PRUNABLE

__all__ = ["SparsityRegularization"]


class SparsityRegularization(CompressionCallback):
    """Add ``strength(epoch) * sum over params of penalty(param)`` to the training loss.

    Penalties (:mod:`lightning_sparse.core.regularization`): ``l1`` (``sum |w|``), ``group_lasso``
    (``sum_g sqrt(|g|) ||w_g||_2`` over output channels or ``N:M`` groups; Wen et al. 2016) and
    ``bn_scale`` (``sum |gamma|`` of BatchNorm scales; Network Slimming, Liu et al. 2017).

    When it acts: on every training step through ``loss_term``, with the strength on the
    fractional-epoch clock (optimizer steps / steps per epoch): 0 before ``start_epoch``, a linear
    ramp to ``strength`` over ``ramp_epochs``, held, 0 from ``end_epoch`` on. The clock is its only
    state, so a resumed run adds the same term as an uninterrupted one. A technique that changes the
    structure in the same run (channel removal) replaces the parameters it cuts: the penalty
    follows, resolving ``params`` again on the changed model before its next term.

    Logged (``compression/<name>/...``, per epoch): ``penalty`` (the term added, epoch mean),
    ``strength`` (its current weight), ``below_threshold`` (share of all groups whose root mean
    square is below ``threshold``), and per target ``penalty/<param>`` (its unweighted penalty)
    and ``below_threshold/<param>``, measured at the end of each training epoch.

    Args:
        penalty: ``l1``, ``group_lasso`` or ``bn_scale``.
        strength: the weight of the penalty at full strength (``lambda``), > 0. Raw sums as in the
            papers: Network Slimming used 1e-4 to 1e-5 for ``bn_scale``.
        params: which weights: names, ``re:`` patterns or ``__ALL_PRUNABLE__``; Conv/Linear
            weights for ``l1``/``group_lasso``, BatchNorm scales for ``bn_scale`` (where
            ``__ALL_PRUNABLE__`` means every affine BatchNorm).
        groups: ``group_lasso``'s groups: ``channel`` (whole output channels), ``N:M`` (the ``M``
            consecutive input-dimension weights an N:M mask works on) or ``blockB``.
        start_epoch: fractional epoch from which the penalty is added.
        end_epoch: fractional epoch from which it is no longer added; None: to the end.
        ramp_epochs: epochs over which the strength rises linearly from 0 after ``start_epoch``.
        threshold: groups whose root mean square is below this count as "near zero" in the logs.
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range (the message names it), at construction; at
            ``setup``, ``params`` that match nothing or ``N:M`` groups that do not tile a weight.
        TypeError: at ``setup``, a module without the ``CompressionModule`` mixin.

    Example::

        trainer = Trainer(
            max_epochs=20,
            callbacks=[
                SparsityRegularization("group_lasso", strength=1e-4, end_epoch=10, ramp_epochs=2),
                MagnitudePruning(final_sparsity=0.5, mask_type="channel", start_epoch=10,
                                 end_epoch=12, params=["model.conv1.weight"]),
            ],
        )
    """

    changes = frozenset({LOSS})
    without_loss_term = "the penalty would be silently dropped"

    def __init__(
        self,
        penalty: str = "group_lasso",
        strength: float = 1e-4,
        params: str | Sequence[str] = ALL_PRUNABLE,
        groups: str = "channel",
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        ramp_epochs: float = 0.0,
        threshold: float = 1e-3,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if penalty not in PENALTIES:
            raise ValueError(f"`penalty`={penalty!r} is not allowed; choose one of {PENALTIES}.")
        if not is_number(strength) or not strength > 0:
            raise ValueError(f"`strength`={strength!r} is not allowed; it must be a number > 0.")
        params = to_plain(params)
        if isinstance(params, str):
            params = [params]
        if (
            not isinstance(params, list)
            or not params
            or not all(isinstance(p, str) for p in params)
        ):
            raise ValueError(
                f"`params`={params!r} is not allowed; give a parameter name, an `re:` pattern, "
                f"{ALL_PRUNABLE!r}, or a non-empty list of these."
            )
        self._structure: MaskType | None = (
            parse_groups(groups) if penalty == "group_lasso" else None
        )
        if not is_number(ramp_epochs) or ramp_epochs < 0:
            raise ValueError(
                f"`ramp_epochs`={ramp_epochs!r} is not allowed; it must be a number >= 0."
            )
        if not is_number(threshold) or threshold < 0:
            raise ValueError(f"`threshold`={threshold!r} is not allowed; it must be a number >= 0.")
        self._set_window(start_epoch, end_epoch, end_after_start=True)
        if self.end_epoch is not None and self.start_epoch + ramp_epochs > self.end_epoch:
            raise ValueError(
                f"`ramp_epochs`={ramp_epochs:g} runs past `end_epoch`={self.end_epoch:g}: the ramp "
                f"from `start_epoch`={self.start_epoch:g} must end by end_epoch (ramp_epochs <= "
                f"{self.end_epoch - self.start_epoch:g})."
            )
        self.penalty = penalty
        self.strength = float(strength)
        self.params: list[str] = params
        self.groups = str(groups)
        self.ramp_epochs = float(ramp_epochs)
        self.threshold = float(threshold)
        self._targets: dict[str, nn.Parameter] = {}

    # ----------------------------------------------------------------------------------------
    # The interface

    @override
    def schedule_limits(self) -> list[ScheduleLimit]:
        limits = [
            ScheduleLimit("start_epoch", self.start_epoch, True, "the penalty would never start")
        ]
        if self.end_epoch is not None:
            limits.append(
                ScheduleLimit("end_epoch", self.end_epoch, False, "the penalty must end within")
            )
        return limits

    @override
    def resolve_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return resolve_penalty_params(model, self.params, self.penalty, self._structure)

    @property
    @override
    def target_names(self) -> list[str]:
        return list(self._targets)

    @override
    def target_curve(self, epochs: list[float]) -> dict[str, list[float]] | None:
        return {"penalty strength (share of full)": [self.factor_at(e) for e in epochs]}

    def factor_at(self, epoch: float) -> float:
        """The share of ``strength`` in force at fractional ``epoch``, in [0, 1]."""
        return strength_factor(epoch, self.start_epoch, self.end_epoch, self.ramp_epochs)

    def strength_at(self, epoch: float) -> float:
        """The penalty's weight at fractional ``epoch``."""
        return self.strength * self.factor_at(epoch)

    def penalties(self) -> dict[str, torch.Tensor]:
        """Each target's unweighted penalty now (differentiable)."""
        return {
            name: penalty(weight, self.penalty, self._structure)
            for name, weight in self._targets.items()
        }

    def below_threshold(self) -> dict[str, float]:
        """Per target, the share of its groups whose root mean square is below ``threshold``."""
        return {
            name: fraction_below(weight, self.penalty, self._structure, self.threshold)
            for name, weight in self._targets.items()
        }

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._targets = self.resolve_targets(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.optimizers and not smoke_run(trainer):
            self.warn_if_out_of_reach(trainer)

    def warn_if_out_of_reach(self, trainer: pl.Trainer) -> float | None:
        """Warn when the penalty phase cannot shrink the targets by half their mean size.

        With Adam at lr 1e-3 a parameter moves by at most ~1e-3 per step: three epochs of 55 steps
        shrink every |gamma| by ~0.15 alike, far from the zeros a penalty is for (Network Slimming
        trained 160 epochs). Returns the reach (None: the optimizer is not one it can bound).
        """
        end = self.end_epoch if self.end_epoch is not None else float(trainer.max_epochs or 0)
        # The ramp counts half: its strength rises linearly from 0.
        epochs = max(0.0, end - self.start_epoch - self.ramp_epochs / 2)
        steps = epochs * steps_per_epoch(trainer)
        weights = list(self._targets.values())
        if not weights or steps <= 0:
            return None
        reach = penalty_reach(trainer.optimizers[0], weights, steps, self.strength)
        with torch.no_grad():
            size = float(torch.cat([w.detach().abs().flatten() for w in weights]).mean())
        if reach is not None and reach < 0.5 * size:
            optimizer = type(trainer.optimizers[0]).__name__
            rank_zero_warn(
                f"{self.log_name}: in {steps:.0f} optimizer steps (epochs {self.start_epoch:g}-"
                f"{end:g}) {optimizer} at its learning rate can move a penalised weight by at most "
                f"{reach:.3g}, but their mean size is {size:.3g}: the penalty cannot drive them "
                "to zero in this phase"
                + (" (a strong one shrinks them all alike)" if optimizer != "SGD" else "")
                + ". Lengthen the phase (start_epoch/end_epoch) or raise the learning rate"
                + (" or the strength" if optimizer == "SGD" else "")
                + "; see the README's sparsity regularization section."
            )
        return reach

    def follow_model(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The targets as ``model`` holds them now, resolved again if a parameter was replaced.

        A structure change (channel removal) sets a new, smaller ``nn.Parameter`` in place of a
        cut one; a penalty on the old tensor would add a constant with no gradient to the model.
        """
        for name, weight in self._targets.items():
            try:
                current = model.get_parameter(name)
            except AttributeError:
                current = None
            if current is not weight:
                self._targets = self.resolve_targets(model)
                break
        return self._targets

    @override
    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        """``strength_at(epoch) * sum of the targets' penalties`` for this step (0 outside)."""
        self.follow_model(pl_module)
        weight = self.strength_at(fractional_epoch(trainer))
        term = torch.zeros((), device=pl_module.device)
        if weight > 0:
            term = weight * torch.stack(list(self.penalties().values())).sum()
        prefix = f"compression/{self.log_name}"
        pl_module.log(
            f"{prefix}/penalty", term.detach(), on_step=False, on_epoch=True, sync_dist=True
        )
        pl_module.log(f"{prefix}/strength", weight, on_step=False, on_epoch=True, sync_dist=True)
        return term

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.follow_model(pl_module)
        prefix = f"compression/{self.log_name}"
        metrics: dict[str, float] = {}
        groups = 0
        below = 0.0
        with torch.no_grad():
            for name, value in self.penalties().items():
                metrics[f"{prefix}/penalty/{name}"] = float(value)
        for name, fraction in self.below_threshold().items():
            metrics[f"{prefix}/below_threshold/{name}"] = fraction
            count = self._group_count(name)
            groups += count
            below += fraction * count
        metrics[f"{prefix}/below_threshold"] = below / groups if groups else 0.0
        # Every rank holds the same weights; syncing only quiets Lightning's DDP warning.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def _group_count(self, name: str) -> int:
        weight = self._targets[name]
        if self._structure is None:
            return weight.numel()
        if self._structure.kind == "channel":
            return int(weight.shape[0])
        return weight.numel() // self._structure.group_size_along_input

    @override
    def state_dict(self) -> dict[str, Any]:
        # The strength is a function of the trainer's clock, which the checkpoint restores.
        return {"version": self.state_version}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_version(state_dict)
