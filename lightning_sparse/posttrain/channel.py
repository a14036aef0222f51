"""One-shot channel removal of a trained model (a step of ``lightning_sparse.oneshot``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import is_number, to_plain
from lightning_sparse.callbacks.channel import plain_copy, propose_channel_removal
from lightning_sparse.core.channels import IMPORTANCES, TARGETS, check_allocation
from lightning_sparse.core.pruning_backend import require
from lightning_sparse.core.structure import apply_change, count_macs
from lightning_sparse.core.targets import ALL_PRUNABLE, output_weight_excluded, resolve_params
from lightning_sparse.posttrain.oneshot import OneShotStep

__all__ = ["OneShotChannelPruning"]


def _inputs(batch: Any) -> torch.Tensor:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(
            f"one-shot channel removal traces the model on a calibration batch, but the batch's "
            f"inputs are a {type(inputs).__name__}, not a tensor."
        )
    return inputs[:1]


class OneShotChannelPruning(OneShotStep):
    """Remove channels of a trained model at once, until a share of its MACs is gone.

    When it acts: once, in :meth:`apply`, before the optional fine-tune. Coupled layers shrink
    together and every group of coupled channels keeps the same share of its width, the least
    important channels (by ``importance``) going first (``allocation="global"``: one ranking
    across groups, none losing more than ``max_group_sparsity``); the output layer keeps all
    its outputs. The removal is recorded in the run's checkpoint, so ``export`` and
    ``init_from`` rebuild the smaller model from it. A fine-tune afterwards (``finetune_epochs``)
    trains the smaller model as it is; there are no zeros to hold.

    Args:
        sparsity: share of the model's MACs (``target="macs"``) or prunable channels
            (``"channels"``) removed, in [0, 1); of the model as it is loaded (a model whose
            channels were removed before loses that share of what it has).
        target: ``macs`` or ``channels``.
        importance: ``l1``, ``l2`` (norm of the weights each channel owns) or ``bn_scale``
            (|gamma| of its BatchNorm). ``taylor`` needs gradients: use ``ChannelPruning`` while
            training.
        params: Conv/Linear weights whose output channels may go: names, ``re:`` patterns or
            ``__ALL_PRUNABLE__``; never the output layer.
        head: the output layer's name; None: the model's last Conv/Linear layer.
        round_to: keep channel counts multiple of this.
        allocation: ``uniform`` or ``global`` (see ``ChannelPruning``).
        max_group_sparsity: with ``global``, the most of one group's width that may go, in [0, 1).
        calibration_batches: training batches read (the first one traces the model).

    Raises:
        ValueError: an argument is out of range (the message names it); at ``check``, ``params``
            naming the output layer or nothing.
        ImportError: torch-pruning is not installed (extra ``structured``).

    Example::

        step = OneShotChannelPruning(sparsity=0.5)
        summary = oneshot(module, datamodule, [step], finetune_epochs=3)
    """

    def __init__(
        self,
        sparsity: float,
        target: str = "macs",
        importance: str = "l1",
        params: str | Sequence[str] = ALL_PRUNABLE,
        head: str | None = None,
        round_to: int = 1,
        calibration_batches: int = 1,
        allocation: str = "uniform",
        max_group_sparsity: float = 0.9,
    ) -> None:
        if not is_number(sparsity) or not 0 <= sparsity < 1:
            raise ValueError(f"`sparsity`={sparsity!r} is not allowed; it must be in [0, 1).")
        if target not in TARGETS:
            raise ValueError(f"`target`={target!r} is not allowed; choose one of {TARGETS}.")
        if importance == "taylor":
            raise ValueError(
                "`importance`='taylor' ranks channels by gradients accumulated while training; "
                "a one-shot step takes none. Use l1, l2 or bn_scale here, or ChannelPruning "
                "(recipe=channel) to remove channels during training."
            )
        if importance not in IMPORTANCES:
            raise ValueError(
                f"`importance`={importance!r} is not allowed; choose one of "
                f"{[i for i in IMPORTANCES if i != 'taylor']}."
            )
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise ValueError(f"`round_to`={round_to!r} is not allowed; it must be an int >= 1.")
        check_allocation(allocation, max_group_sparsity)
        if (
            not isinstance(calibration_batches, int)
            or isinstance(calibration_batches, bool)
            or calibration_batches < 1
        ):
            raise ValueError(
                f"`calibration_batches`={calibration_batches!r} is not allowed; the model is "
                "traced on a training batch, so it must be an integer >= 1."
            )
        plain = to_plain(params)
        plain = [plain] if isinstance(plain, str) else plain
        if not isinstance(plain, list) or not plain or not all(isinstance(p, str) for p in plain):
            raise ValueError(
                f"`params`={params!r} must be a parameter name, an `re:` pattern, "
                f"{ALL_PRUNABLE!r}, or a non-empty list of these."
            )
        self.sparsity = float(sparsity)
        self.target = target
        self.importance = importance
        self.params: list[str] = plain
        self.head = head
        self.round_to = round_to
        self.allocation = allocation
        self.max_group_sparsity = float(max_group_sparsity)
        self._calibration_batches = calibration_batches

    @property
    @override
    def calibration_batches(self) -> int:
        return self._calibration_batches

    def _resolve(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return resolve_params(
            module, self.params, exclude=output_weight_excluded(module, self.head)
        )

    @override
    def check(self, module: nn.Module) -> None:
        self._resolve(module)
        require(type(self).__name__)

    @override
    def apply(self, module: nn.Module, calibration: Sequence[Any]) -> dict[str, Any]:
        example = _inputs(calibration[0]).to(next(module.parameters()).device)
        params_before = sum(p.numel() for p in module.parameters())
        macs_before = count_macs(plain_copy(module), example)
        plan = propose_channel_removal(
            module,
            example,
            sparsity=self.sparsity,
            target=self.target,
            importance=self.importance,
            selected=list(self._resolve(module)),
            head=self.head,
            dense_macs=macs_before,
            round_to=self.round_to,
            from_dense=False,
            allocation=self.allocation,
            max_group_sparsity=self.max_group_sparsity,
        )
        if plan.change["layers"]:
            apply_change(module, plan.change)
        macs_after = count_macs(plain_copy(module), example)
        return {
            **self.config(),
            "macs_before": macs_before,
            "macs_after": macs_after,
            "params_before": params_before,
            "params_after": sum(p.numel() for p in module.parameters()),
            "channels_removed": {
                layer: len(sides["out"])
                for layer, sides in plan.change["layers"].items()
                if sides.get("out")
            },
            "target_reached": plan.reached,
        }

    @override
    def config(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "target": self.target,
            "importance": self.importance,
            "params": list(self.params),
            "head": self.head,
            "round_to": self.round_to,
            "allocation": self.allocation,
            "max_group_sparsity": self.max_group_sparsity,
            "calibration_batches": self._calibration_batches,
        }
