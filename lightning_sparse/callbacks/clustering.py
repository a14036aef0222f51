"""Weight sharing (Deep Compression's trained quantization) as a callback.

From ``start_epoch`` each target weight is a small codebook of shared values (centroids) and, per
weight, the index of its centroid; pruned weights stay zero and belong to no cluster. From then on
training updates the centroids, not the weights: each centroid moves by the gradients of all the
weights that share it, summed (Han et al., *Deep Compression*, 2016), and every weight is its
centroid again after each step.

How (docs/decisions.md, "Weight sharing: the centroids belong to the callback"): the centroids are
tensors of this callback with their own optimizer (``centroid_optimizer`` at ``centroid_lr``), like
distillation's projections. Before every optimizer step the callback sums each target weight's
gradient into its centroids, steps its optimizer, and takes the weight's gradient away
(``grad = None``), so the model's optimizer skips the weight: neither its momentum nor its weight
decay moves a shared value apart from its cluster. After the step every target weight is written
back as ``reconstruct(centroids, assignments, mask)``. The model's ``state_dict`` keeps its keys
and plain float weights (``k`` distinct values per layer, zeros where pruned); the compressed
format finds the codebook in them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import (
    MASKS,
    QUANTIZATION,
    CompressionCallback,
    ScheduleLimit,
    check_timing,
    compression_callbacks,
    fractional_epoch,
    is_number,
    to_plain,
)
from lightning_sparse.core.clustering import INITS, centroid_gradients, kmeans_codebook, reconstruct
from lightning_sparse.core.targets import ALL_PRUNABLE, resolve_params

__all__ = ["CENTROID_OPTIMIZERS", "WeightClustering"]

CENTROID_OPTIMIZERS = ("adam", "sgd")
MAX_CLUSTERS = 1 << 16


class _Codebook:
    """One clustered weight: its centroids (trained), assignments and keep-mask (fixed)."""

    def __init__(self, centroids: torch.Tensor, assignments: torch.Tensor, mask: torch.Tensor):
        self.centroids = centroids.detach().clone().requires_grad_(True)
        self.assignments = assignments.to(torch.int64)
        self.mask = mask.to(torch.bool)

    def weight(self) -> torch.Tensor:
        return reconstruct(self.centroids.detach(), self.assignments, self.mask)

    def state(self) -> dict[str, torch.Tensor]:
        # Indices fit in 8 or 16 bits; a checkpoint need not hold them as int64.
        k = self.centroids.shape[-1]
        small = torch.uint8 if k <= 256 else torch.int32
        return {
            "centroids": self.centroids.detach().cpu().clone(),
            "assignments": self.assignments.cpu().to(small),
            "mask": self.mask.cpu().clone(),
        }


class WeightClustering(CompressionCallback):
    """Weight sharing: cluster each target weight into ``num_clusters`` trained shared values.

    When it acts: at ``start_epoch`` on the fractional-epoch clock (right after the optimizer step
    that reaches it, or at ``on_train_start`` when it is 0) every target weight is clustered by
    1-D k-means (:func:`~lightning_sparse.core.clustering.kmeans_codebook`) on rank 0 and the
    codebooks are broadcast, so every DDP rank holds the same ones. Pruned weights stay zero and are
    never a centroid: the keep-mask is that of the techniques that declare masks (a pruning
    schedule, which must have ended by then) and else the weight's non-zeros at that moment. From
    then until ``end_epoch`` (None: the end of training), before every optimizer step each
    weight's gradient (already averaged over ranks by DDP) is summed into its centroids, this
    callback's optimizer steps the centroids, and the weight's gradient is dropped so the model's
    optimizer leaves it alone; after the step the weight is written back from its codebook. After
    ``end_epoch`` the codebooks are frozen. Codebooks and the centroid optimizer's state are in the
    checkpoint (``torch.load(weights_only=True)`` reads them); a resumed run continues bit for bit.
    It composes with pruning before it and with QAT after it (QAT then fake-quantizes the shared
    values; gradients reach the centroids through its straight-through estimator). Logs
    ``compression/<name>/clustered`` and, per weight, ``compression/<name>/distinct/<param>``
    (distinct non-zero values: at most ``num_clusters`` per layer, or per channel).

    Args:
        num_clusters: shared values per weight (per output channel with ``per_channel``), 2 to
            65536; 16 is 4-bit indices.
        start_epoch: fractional epoch at which the weights are clustered.
        end_epoch: fractional epoch from which the centroids stop training (None: never).
        params: parameter names, ``re:`` regexes or ``__ALL_PRUNABLE__`` (every Conv/Linear
            weight). Two instances with disjoint ``params`` and a ``name`` each may cluster
            layers differently (Deep Compression: 256 values for convs, 32 for fc layers).
        init: ``linear`` (evenly over the weight range: Deep Compression found it best, it keeps
            the rare large weights), ``density`` (evenly over the weights' CDF) or ``random``.
        per_channel: one codebook per output channel instead of one per layer.
        centroid_lr: learning rate of the centroids' optimizer, > 0.
        centroid_optimizer: ``adam`` or ``sgd`` (plain: the centroid moves by ``lr`` times its
            summed gradient, Deep Compression's update).
        follow_lr_schedule: scale ``centroid_lr`` by the model's learning-rate schedule (its
            current rate over its initial rate, for the weight's parameter group), so warm
            restarts and decays of the recipe apply to the centroids too.
        iterations: most k-means (Lloyd) iterations.
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range or unknown (the message names it), at
            construction; at ``setup``: ``params`` match nothing, the schedule does not fit in
            training, or a pruning schedule still changes the weights at ``start_epoch``.

    Example::

        trainer = Trainer(
            max_epochs=40,
            callbacks=[
                MagnitudePruning(final_sparsity=0.95, start_epoch=5, end_epoch=20),
                WeightClustering(num_clusters=16, start_epoch=25),
            ],
        )
    """

    changes = frozenset({QUANTIZATION})

    def __init__(
        self,
        num_clusters: int = 16,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        params: str | Sequence[str] = ALL_PRUNABLE,
        init: str = "linear",
        per_channel: bool = False,
        centroid_lr: float = 1e-4,
        centroid_optimizer: str = "adam",
        follow_lr_schedule: bool = True,
        iterations: int = 30,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if (
            not isinstance(num_clusters, int)
            or isinstance(num_clusters, bool)
            or not 2 <= num_clusters <= MAX_CLUSTERS
        ):
            raise ValueError(
                f"`num_clusters`={num_clusters!r} is not allowed; it must be an integer in "
                f"[2, {MAX_CLUSTERS}]."
            )
        self._set_window(start_epoch, end_epoch, end_after_start=True)
        params = to_plain(params)
        if isinstance(params, str):
            params = [params]
        if (
            not isinstance(params, list)
            or not params
            or not all(isinstance(p, str) for p in params)
        ):
            raise ValueError(
                f"`params`={params!r} must be a parameter name, an `re:` pattern, "
                f"{ALL_PRUNABLE!r}, or a non-empty list of these."
            )
        if init not in INITS:
            raise ValueError(f"`init`={init!r} is not allowed; choose one of {list(INITS)}.")
        for field, value in (
            ("per_channel", per_channel),
            ("follow_lr_schedule", follow_lr_schedule),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"`{field}`={value!r} is not allowed; it must be true or false.")
        if not is_number(centroid_lr) or not centroid_lr > 0 or not math.isfinite(centroid_lr):
            raise ValueError(f"`centroid_lr`={centroid_lr!r} is not allowed; it must be > 0.")
        if centroid_optimizer not in CENTROID_OPTIMIZERS:
            raise ValueError(
                f"`centroid_optimizer`={centroid_optimizer!r} is not allowed; choose one of "
                f"{list(CENTROID_OPTIMIZERS)}."
            )
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
            raise ValueError(f"`iterations`={iterations!r} is not allowed; it must be an int >= 0.")
        self.num_clusters = int(num_clusters)
        self.params: list[str] = params
        self.init = init
        self.per_channel = per_channel
        self.centroid_lr = float(centroid_lr)
        self.centroid_optimizer = centroid_optimizer
        self.follow_lr_schedule = follow_lr_schedule
        self.iterations = iterations
        self._targets: dict[str, nn.Parameter] = {}
        self._codebooks: dict[str, _Codebook] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------
    # The interface

    @property
    def clustered(self) -> bool:
        """Whether the target weights are clustered (from ``start_epoch`` on)."""
        return bool(self._codebooks)

    @property
    def codebooks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{name: (centroids, assignments, mask)}`` once clustered (detached tensors)."""
        return {
            name: (book.centroids.detach(), book.assignments, book.mask)
            for name, book in self._codebooks.items()
        }

    @property
    @override
    def target_names(self) -> list[str]:
        return list(self._targets)

    @override
    def resolve_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return resolve_params(model, self.params)

    @property
    @override
    def changes_weights_until(self) -> tuple[str, float] | None:
        return ("end_epoch", math.inf if self.end_epoch is None else self.end_epoch)

    @property
    @override
    def needs_settled_weights_from(self) -> tuple[str, float] | None:
        # The keep-masks are read when clustering starts: pruning must have ended by then.
        return ("start_epoch", self.start_epoch)

    @override
    def schedule_limits(self) -> list[ScheduleLimit]:
        limits = [ScheduleLimit("start_epoch", self.start_epoch, True, "it would never cluster")]
        if self.end_epoch is not None:
            limits.append(
                ScheduleLimit("end_epoch", self.end_epoch, False, "the schedule must end within")
            )
        return limits

    def training_centroids(self, epoch: float) -> bool:
        """Whether the centroids train at fractional ``epoch`` (clustered, before ``end_epoch``)."""
        return self.clustered and self.active_at(epoch)

    # ----------------------------------------------------------------------------------------
    # Hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        check_timing({cb.log_name: cb for cb in compression_callbacks(trainer.callbacks)})  # type: ignore[attr-defined]
        self._targets = self.resolve_targets(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        self._maybe_cluster(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.clustered:
            return
        train = self.training_centroids(fractional_epoch(trainer))
        stepped = []
        for name, book in self._codebooks.items():
            param = self._targets[name]
            grad = param.grad
            # The model's optimizer skips a parameter without a gradient: no momentum or weight
            # decay pulls a shared value away from its cluster.
            param.grad = None
            if not train or grad is None:
                continue
            book.centroids.grad = centroid_gradients(
                grad, book.assignments, book.centroids.shape[-1], book.mask, self.per_channel
            ).to(book.centroids.dtype)
            stepped.append(book.centroids.grad)
        if not stepped or self._optimizer is None:
            return
        # Skip the step with the model's (an fp16 grad scaler skips it on overflow).
        if all(bool(torch.isfinite(g).all()) for g in stepped):
            lr = self.centroid_lr * self._lr_factor(optimizer)
            for group in self._optimizer.param_groups:
                group["lr"] = lr
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.clustered:
            self._write_weights()
        self._maybe_cluster(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._targets:
            return
        prefix = f"compression/{self.log_name}"
        metrics = {f"{prefix}/clustered": float(self.clustered)}
        for name, param in self._targets.items():
            values = param.detach()
            metrics[f"{prefix}/distinct/{name}"] = float(torch.unique(values[values != 0]).numel())
        # Every rank holds the same codebooks; syncing only quiets Lightning's DDP warning.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    # ----------------------------------------------------------------------------------------
    # Clustering

    def _maybe_cluster(self, trainer: pl.Trainer) -> None:
        # Guarded by the state itself: a resumed run that was clustered never clusters again.
        if self.clustered or not self._targets or fractional_epoch(trainer) < self.start_epoch:
            return
        masks = self._keep_masks(trainer)
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in self._targets.items():
            centroids, assignments = kmeans_codebook(
                param.detach(),
                self.num_clusters,
                init=self.init,
                per_channel=self.per_channel,
                iterations=self.iterations,
                mask=masks[name],
                seed=0,
            )
            state[name] = _Codebook(centroids, assignments, masks[name]).state()
        # Weights are equal on every rank under DDP, and k-means is deterministic; rank 0's
        # codebooks win anyway, so no floating-point difference can split the ranks.
        state = trainer.strategy.broadcast(state, src=0)
        self._set_codebooks(state)
        self._build_optimizer()
        self._write_weights()
        rank_zero_info(
            f"{self.log_name}: {len(self._codebooks)} weights clustered into "
            f"{self.num_clusters} shared values {'per channel' if self.per_channel else 'each'} "
            f"at epoch {fractional_epoch(trainer):.3f}."
        )

    def _keep_masks(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        """The keep-mask of every target: the masks techniques hold, else its non-zeros now."""
        held: dict[str, torch.Tensor] = {}
        for technique in compression_callbacks(trainer.callbacks):  # type: ignore[attr-defined]
            if technique is self or MASKS not in technique.changes:
                continue
            for name, mask in technique.masks.items():
                if name in self._targets:
                    mask = mask.to(self._targets[name].device, torch.bool)
                    held[name] = held[name] & mask if name in held else mask
        return {
            name: held[name] if name in held else param.detach() != 0
            for name, param in self._targets.items()
        }

    def _set_codebooks(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        unknown = sorted(set(state) - set(self._targets))
        if unknown:
            raise ValueError(
                f"{self.state_key}: the checkpoint holds codebooks for {unknown}, which "
                f"`params`={self.params!r} does not select in this model."
            )
        missing = sorted(set(self._targets) - set(state))
        if missing:
            raise ValueError(
                f"{self.state_key}: the checkpoint holds no codebook for {missing}, which "
                f"`params`={self.params!r} selects; resume with the params it was trained with."
            )
        books = {}
        for name, param in self._targets.items():
            entry = state[name]
            books[name] = _Codebook(
                entry["centroids"].to(param.device, param.dtype),
                entry["assignments"].to(param.device),
                entry["mask"].to(param.device),
            )
            if books[name].assignments.shape != param.shape:
                raise ValueError(
                    f"{self.state_key}: the checkpoint's codebook for {name!r} is for shape "
                    f"{list(books[name].assignments.shape)}, the model's weight is "
                    f"{list(param.shape)}."
                )
        self._codebooks = books

    def _build_optimizer(self) -> None:
        centroids = [book.centroids for book in self._codebooks.values()]
        if self.centroid_optimizer == "adam":
            self._optimizer = torch.optim.Adam(centroids, lr=self.centroid_lr)
        else:
            self._optimizer = torch.optim.SGD(centroids, lr=self.centroid_lr)

    def _lr_factor(self, optimizer: torch.optim.Optimizer) -> float:
        if not self.follow_lr_schedule:
            return 1.0
        first = next(iter(self._targets.values()))
        for group in optimizer.param_groups:
            if any(p is first for p in group["params"]):
                # LR schedulers record the group's starting rate as `initial_lr`.
                initial = group.get("initial_lr", group["lr"])
                return float(group["lr"]) / float(initial) if initial else 1.0
        return 1.0

    @torch.no_grad()
    def _write_weights(self) -> None:
        for name, book in self._codebooks.items():
            self._targets[name].copy_(book.weight())

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return self._pending
        if not self.clustered:
            return {"version": self.state_version, "codebooks": None, "optimizer": None}
        return {
            "version": self.state_version,
            "codebooks": {name: book.state() for name, book in self._codebooks.items()},
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_version(state_dict)
        if state_dict.get("codebooks") is None:
            return
        # Applied at on_train_start, once the strategy has placed the model on its device.
        self._codebooks, self._optimizer = {}, None
        self._pending = dict(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._set_codebooks(state["codebooks"])
        self._build_optimizer()
        if state.get("optimizer") is not None:
            assert self._optimizer is not None
            self._optimizer.load_state_dict(state["optimizer"])
        self._write_weights()
