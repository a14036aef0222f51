"""Low-rank factorization: each target layer becomes two smaller ones, then training goes on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import (
    STRUCTURE,
    fractional_epoch,
    invalid_number,
    is_number,
    to_plain,
)
from lightning_sparse.callbacks.structure import StructuralCompression
from lightning_sparse.core.lowrank import (
    layer_dims,
    rank_for_energy,
    rank_for_ratio,
    singular_values,
    worth_factorizing,
)
from lightning_sparse.core.structure import FACTORIZE
from lightning_sparse.core.targets import ALL_PRUNABLE, output_weight_excluded, resolve_params

__all__ = ["LowRankFactorization", "factorizable"]


def factorizable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer low-rank factorization supports: Linear, ungrouped Conv2d."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _check_share(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if not is_number(value) or not 0 < value <= 1:
        raise invalid_number(field, value, "it must be in (0, 1], or null")
    return float(value)


class LowRankFactorization(StructuralCompression):
    """Replace Linear and Conv2d layers by two low-rank factors once, then fine-tune them.

    When it acts: at the first training batch at or after ``start_epoch`` (fractional, on
    Lightning's clock; right after the optimizer step that reaches it), once. Each target layer's
    weight, seen as an ``out x fan_in`` matrix, is split by truncated SVD at a rank chosen from
    its singular values (``energy``) or its size (``rank_ratio``): a Linear becomes
    ``Linear(in, r) -> Linear(r, out)``, a Conv2d a ``k x k`` conv to ``r`` channels followed by a
    ``1 x 1`` conv (``core.lowrank``). A layer whose factors would cost as many multiply-accumulates
    as it does, or more (``r * (fan_in + out) >= fan_in * out``), is left alone, as is the model's
    output layer. The optimizer steps the factors from then on (the bias, which moves to the
    second factor, keeps its moments), under DDP the model is wrapped anew and every rank applies
    rank 0's ranks. The change is recorded in the checkpoint, so resume, export, one-shot and
    ``init_from`` rebuild the factorized model (the LightningModule must mix in
    ``CompressionModule``). Logs ``compression/<name>/macs``, ``.../macs_removed`` and
    ``.../params`` per epoch once applied.

    Exactly one of ``energy`` and ``rank_ratio`` is set.

    Args:
        start_epoch: fractional epoch at which the layers are factorized.
        energy: each layer keeps the smallest rank whose singular values hold this share of the
            sum of their squares, in (0, 1].
        rank_ratio: each layer keeps this share of its full rank ``min(out, fan_in)`` (rounded
            up), in (0, 1].
        params: weights of the layers to factorize: names, ``re:`` patterns or
            ``__ALL_PRUNABLE__`` (every Linear and ungrouped Conv2d but the output layer). A name
            must be a Linear or ungrouped Conv2d weight; patterns pass over other layers.
        head: the output layer's name (``model.fc``); None: the model's last Conv/Linear layer.
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range, both or neither of ``energy`` and
            ``rank_ratio`` are set, or ``start_epoch`` is not before ``max_epochs`` (the message
            names the field); at ``setup``, ``params`` naming the output layer, a layer that does
            not factorize, or nothing.
        TypeError: at ``setup``, a LightningModule without the ``CompressionModule`` mixin.

    Example::

        factorize = LowRankFactorization(start_epoch=5, energy=0.9)
        trainer = Trainer(max_epochs=10, callbacks=[factorize])
        trainer.fit(ClassificationModule(MLP(input_dim=64, hidden=[256, 256])), datamodule)
    """

    changes = frozenset({STRUCTURE})

    def __init__(
        self,
        start_epoch: float = 1.0,
        energy: float | None = None,
        rank_ratio: float | None = None,
        params: str | Sequence[str] = ALL_PRUNABLE,
        head: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self._set_window(start_epoch, None)
        self.energy = _check_share("energy", energy)
        self.rank_ratio = _check_share("rank_ratio", rank_ratio)
        if (self.energy is None) == (self.rank_ratio is None):
            raise ValueError(
                f"`energy`={energy!r} and `rank_ratio`={rank_ratio!r}: set exactly one of them "
                "(energy: kept share of the squared singular values; rank_ratio: kept share of "
                "each layer's full rank), the other to null."
            )
        plain = to_plain(params)
        plain = [plain] if isinstance(plain, str) else plain
        if not isinstance(plain, list) or not plain or not all(isinstance(p, str) for p in plain):
            raise ValueError(
                f"`params`={params!r} must be a parameter name, an `re:` pattern, "
                f"{ALL_PRUNABLE!r}, or a non-empty list of these."
            )
        if head is not None and (not isinstance(head, str) or not head):
            raise ValueError(f"`head`={head!r} is not allowed; give a layer name or null.")
        self.params: list[str] = plain
        self.head = head
        self._targets: list[str] = []
        self._done = False
        self._ranks: dict[str, int] = {}

    # ----------------------------------------------------------------------------------------
    # The declared interface

    @property
    @override
    def changes_weights_until(self) -> tuple[str, float] | None:
        # Scales frozen before the factorization would not fit the factors.
        return ("start_epoch", self.start_epoch)

    @override
    def resolve_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        chosen = resolve_params(
            model, self.params, exclude=output_weight_excluded(model, self.head)
        )
        modules = dict(model.named_modules())
        targets: dict[str, nn.Parameter] = {}
        for weight_name, weight in chosen.items():
            layer = modules.get(weight_name.removesuffix(".weight"))
            if layer is not None and factorizable(layer) and weight_name.endswith(".weight"):
                targets[weight_name] = weight
            elif weight_name in self.params:
                kind = type(layer).__name__ if layer is not None else "not a layer's weight"
                raise ValueError(
                    f"`params` entry {weight_name!r} ({kind}) does not factorize; low-rank "
                    "factorization takes Linear and ungrouped Conv2d weights. Leave it out."
                )
        if not targets:
            raise ValueError(
                f"`params`={self.params!r} selects no Linear or ungrouped Conv2d weight besides "
                "the output layer: there is nothing to factorize."
            )
        return targets

    @property
    @override
    def target_names(self) -> list[str]:
        return list(self._targets)

    @property
    def ranks(self) -> dict[str, int]:
        """The rank each factorized layer kept, by layer name (empty before ``start_epoch``)."""
        return dict(self._ranks)

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self._done:
            self._targets = list(self.resolve_targets(pl_module))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._keep_example(batch)
        self._maybe_apply(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._maybe_apply(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._done:
            return
        metrics = self._size_metrics(pl_module)
        # Every rank holds the same structure; syncing only quiets Lightning's DDP warning.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    # ----------------------------------------------------------------------------------------
    # The factorization

    def _maybe_apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Guarded by `_done` (in the checkpoint): a resume never factorizes twice.
        if self._done or fractional_epoch(trainer) < self.start_epoch:
            return
        measured = self._example is not None
        if measured:
            self._dense_macs = self._count_macs(pl_module)
        change = self.apply_structure_change(
            trainer, pl_module, lambda: self.propose_change(pl_module)
        )
        self._done = True
        if change is None:
            rank_zero_info(
                f"{self.log_name} at epoch {fractional_epoch(trainer):.3f}: no target layer "
                "would be cheaper factorized at its rank; the model is left as it is."
            )
            return
        self._ranks = {name: int(data["rank"]) for name, data in change["layers"].items()}
        if measured and self._dense_macs:
            self._macs = self._count_macs(pl_module)
            rank_zero_info(
                f"{self.log_name} at epoch {fractional_epoch(trainer):.3f}: "
                f"{len(self._ranks)} layers factorized (ranks "
                f"{', '.join(f'{n}: {r}' for n, r in self._ranks.items())}); MACs "
                f"{self._macs:,} = {self._macs / self._dense_macs:.1%} of before."
            )

    def rank_for(self, layer: nn.Linear | nn.Conv2d) -> int:
        """The rank ``layer`` would keep (overridable, e.g. for a rank per layer)."""
        if self.energy is not None:
            return rank_for_energy(singular_values(layer), self.energy)
        assert self.rank_ratio is not None
        return rank_for_ratio(tuple(layer.weight.shape), self.rank_ratio)

    def propose_change(self, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """The ``factorize`` change for the targets as their weights are now; None if none pays.

        Every rank calls it and rank 0's result is applied everywhere.
        """
        modules = dict(pl_module.named_modules())
        layers: dict[str, dict[str, int]] = {}
        for weight_name in self._targets:
            layer_name = weight_name.removesuffix(".weight")
            layer = modules.get(layer_name)
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            rank = self.rank_for(layer)
            fan_in, out = layer_dims(layer)
            if worth_factorizing(fan_in, out, rank):
                layers[layer_name] = {"rank": rank}
        return {"kind": FACTORIZE, "layers": layers} if layers else None

    # ----------------------------------------------------------------------------------------
    # State

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.state_version,
            "done": self._done,
            "ranks": dict(self._ranks),
            **self._structure_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_version(state_dict)
        self._done = bool(state_dict.get("done", False))
        self._ranks = {str(k): int(v) for k, v in (state_dict.get("ranks") or {}).items()}
        self._load_structure(state_dict)
