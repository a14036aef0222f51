"""Early exits as a callback: heads on named layers, a joint loss, calibrated thresholds.

BranchyNet (Teerapittayanon et al. 2016): classifiers attached after intermediate layers let easy
inputs leave the network early. :class:`EarlyExit` attaches a head (pool + linear,
:class:`~lightning_sparse.core.early_exit.ExitHead`) after each named layer, adds their weighted
cross-entropy to the training loss through the ``CompressionModule`` mixin, and after every
validation epoch calibrates a confidence threshold per exit so that the cascade loses at most
``max_accuracy_drop`` against the full model on the validation split. Export as ONNX stages and the
runner that stops at the first confident exit are in :mod:`lightning_sparse.deploy.early_exit`.

The heads belong to the callback, not to the model (as distillation's projections do, see
docs/decisions.md): they are in no ``state_dict`` of the model, in no optimizer of the model and
outside DDP's wrapping. The callback trains them with its own Adam (``head_lr``), stepped when the
model's optimizer steps, with gradients averaged over DDP ranks; they start from a fixed seed on
every rank, and they and their optimizer's moments are in the callback's checkpoint state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_sparse.callbacks.base import (
    LOSS,
    CompressionCallback,
    ScheduleLimit,
    fractional_epoch,
    is_number,
    step_own_parameters,
    to_plain,
)
from lightning_sparse.core.batch import model_inputs
from lightning_sparse.core.early_exit import (
    ACTIVATIONS,
    HEAD_SEED,
    ExitHead,
    batch_labels,
    calibrate_thresholds,
    cascade,
    joint_exit_loss,
    trace_with_cuts,
)
from lightning_sparse.core.taps import OutputTap

__all__ = ["EarlyExit"]


def _logits(outputs: Any) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, or an object with ``.logits``)."""
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"EarlyExit needs the model's logits as `outputs`, got {type(outputs).__name__}."
        )
    return logits


# The key under which the tap keeps the module's own output (logits), for calibration: its first
# output in a step (under DDP, Lightning runs the step as the module's forward, whose output is the
# step's, around the inner `self(x)`).
_FINAL = "\x00final"


class EarlyExit(CompressionCallback):
    """Train exit heads after named layers and calibrate their confidence thresholds.

    When it acts: each training step in ``[start_epoch, end_epoch)`` (fractional epochs) the exit
    layers' outputs of the module's forward go through the heads, and
    ``sum_i weights[i] * CE(head_i, labels)`` is added to the loss
    (:func:`~lightning_sparse.core.early_exit.joint_exit_loss`); the heads step with the model's
    optimizer. After each validation epoch (not the sanity check) the thresholds are recalibrated
    on the validation split (every DDP rank's share gathered, so they agree):
    :func:`~lightning_sparse.core.early_exit.calibrate_thresholds` keeps the cascade within
    ``max_accuracy_drop`` of the full model's accuracy there. The last validation's thresholds are
    in force (:attr:`thresholds`) and in the checkpoint. :meth:`calibrate` does the same on any
    data loader.

    Logged (``compression/<name>/...``): ``loss`` and ``loss/<exit>`` per training epoch; per
    validation epoch ``threshold/<exit>``, ``exit_fraction/<exit>`` (and ``exit_fraction/final``),
    ``val_acc`` (the cascade's) and ``val_acc_full`` (the full model's).

    Stages: the exits must cut the module's forward cleanly (traced with ``torch.fx``; an
    ``nn.Sequential``-like backbone, SmallCNN, MLP, LeNet5, a ResNet at whole blocks); that is
    checked before training, so that the trained model can be exported as stages. Modules that
    ``torch.fx`` cannot trace, and layers inside a skip connection, are refused with an error
    naming the model type.

    Args:
        exits: layer names in the LightningModule (``model.named_modules()``), in forward order,
            e.g. ``[model.conv1, model.conv2]``.
        weights: weight of each exit's loss; one number for all, or one per exit (>= 0).
        head_lr: learning rate of the heads' Adam optimizer, > 0.
        pool_size: average-pool output size per spatial dimension (1: global average pooling).
        activation: ``relu`` (applied to the layer output before pooling) or ``none``.
        max_accuracy_drop: accuracy the cascade may lose against the full model on validation,
            a fraction (0.005 = half a point), in [0, 1].
        detach: train only the heads (features detached); False trains the backbone jointly.
        start_epoch: fractional epoch from which the heads train.
        end_epoch: fractional epoch from which they no longer train; None: to the end.
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range (the message names it), at construction; before
            training, an exit that is not a layer of the module or does not cut it cleanly.
        TypeError: at ``setup``, a module without the ``CompressionModule`` mixin.

    Example::

        early_exit = EarlyExit(exits=["model.conv1"], pool_size=4, max_accuracy_drop=0.005)
        Trainer(max_epochs=20, callbacks=[early_exit]).fit(module, datamodule)
        export_early_exit(module, early_exit.exits, early_exit.heads, early_exit.thresholds,
                          example, "export/early_exit")
    """

    changes = frozenset({LOSS})
    without_loss_term = "the heads would never train"

    def __init__(
        self,
        exits: Sequence[str],
        weights: float | Sequence[float] = 1.0,
        head_lr: float = 1e-2,
        pool_size: int = 1,
        activation: str = "relu",
        max_accuracy_drop: float = 0.005,
        detach: bool = False,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        exits = to_plain(exits)
        if isinstance(exits, str):
            exits = [exits]
        if (
            not isinstance(exits, list)
            or not exits
            or not all(isinstance(e, str) and e.strip() for e in exits)
        ):
            raise ValueError(
                f"`exits`={exits!r} is not allowed; give a non-empty list of layer names such as "
                "[model.conv1, model.conv2] (see model.named_modules())."
            )
        if len(set(exits)) != len(exits):
            raise ValueError(f"`exits`={exits!r} names a layer twice.")
        weights = to_plain(weights)
        chosen: Any = [weights] * len(exits) if is_number(weights) else weights
        if (
            not isinstance(chosen, list)
            or len(chosen) != len(exits)
            or not all(is_number(w) and w >= 0 for w in chosen)
            or not any(w > 0 for w in chosen)
        ):
            raise ValueError(
                f"`weights`={weights!r} is not allowed; give a number > 0, or one number >= 0 per "
                f"exit ({len(exits)}), not all 0."
            )
        if not is_number(head_lr) or not head_lr > 0:
            raise ValueError(f"`head_lr`={head_lr!r} is not allowed; it must be a number > 0.")
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
            raise ValueError(f"`pool_size`={pool_size!r} is not allowed; it must be an int >= 1.")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation`={activation!r} is not allowed; choose one of {ACTIVATIONS}."
            )
        if not is_number(max_accuracy_drop) or not 0 <= max_accuracy_drop <= 1:
            raise ValueError(
                f"`max_accuracy_drop`={max_accuracy_drop!r} is not allowed; it must be a fraction "
                "in [0, 1] (0.005 = half a point)."
            )
        if not isinstance(detach, bool):
            raise ValueError(f"`detach`={detach!r} is not allowed; it must be true or false.")
        self._set_window(start_epoch, end_epoch, end_after_start=True)
        self.exits: list[str] = exits
        self.weights: list[float] = [float(w) for w in chosen]
        self.head_lr = float(head_lr)
        self.pool_size = pool_size
        self.activation = activation
        self.max_accuracy_drop = float(max_accuracy_drop)
        self.detach = detach
        self._heads: list[ExitHead] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer: dict[str, Any] | None = None
        self._thresholds: list[float] | None = None
        self._tap = OutputTap(keep_first=[_FINAL])
        # Per validation batch: (confidence [exits, batch], head correct [exits, batch],
        # full model correct [batch]).
        self._collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._last_calibration: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------
    # What it exposes

    @property
    def heads(self) -> list[nn.Module]:
        """The exit heads in ``exits`` order (empty before the first step or checkpoint)."""
        return list(self._heads or [])

    @property
    def thresholds(self) -> list[float] | None:
        """The calibrated threshold per exit (1.0: off); None before the first calibration."""
        return None if self._thresholds is None else list(self._thresholds)

    @property
    def last_calibration(self) -> dict[str, Any]:
        """What the last calibration measured: accuracies and the share leaving at each exit."""
        return dict(self._last_calibration)

    @override
    def deployment(self) -> tuple[str, dict[str, Any]] | None:
        # Stages and heads for the export (deploy/early_exit.py); nothing before the heads exist.
        if not self._heads:
            return None
        return "early_exit", {
            "exits": list(self.exits),
            "heads": self.heads,
            "thresholds": self.thresholds,
        }

    @override
    def schedule_limits(self) -> list[ScheduleLimit]:
        return [ScheduleLimit("start_epoch", self.start_epoch, True, "the heads would never train")]

    @override
    def check_model(self, model: nn.Module) -> None:
        """Check that every exit is a layer and that the exits cut the forward into stages.

        Raises:
            ValueError: a layer is missing (the layers there are, listed), or the forward cannot
                be cut there (names the model type and the exit).
        """
        modules = dict(model.named_modules())
        for name in self.exits:
            if not name or name not in modules:
                names = [n for n in modules if n]
                shown = ", ".join(names[:25]) + (f", ... ({len(names)})" if len(names) > 25 else "")
                raise ValueError(f"`exits`: the model has no layer {name!r}; its layers: {shown}.")
        trace_with_cuts(model, self.exits)

    # ----------------------------------------------------------------------------------------
    # Heads and their optimizer

    def _build_heads(self, shapes: Sequence[Sequence[int]], num_classes: int) -> None:
        self._heads = [
            ExitHead(shape, num_classes, self.pool_size, self.activation, seed=HEAD_SEED + index)
            for index, shape in enumerate(shapes)
        ]

    def _ready_heads(self, features: Sequence[torch.Tensor], num_classes: int) -> list[ExitHead]:
        """The heads on the features' device (built at the first call), and their optimizer."""
        shapes = [list(f.shape[1:]) for f in features]
        if self._heads is None:
            self._build_heads(shapes, num_classes)
        assert self._heads is not None
        for head, shape, name in zip(self._heads, shapes, self.exits, strict=True):
            if head.feature_shape != shape or head.num_classes != num_classes:
                raise ValueError(
                    f"`exits`: the head for {name!r} takes [batch, {head.feature_shape}] and "
                    f"predicts {head.num_classes} classes, but the layer now outputs "
                    f"[batch, {shape}] for {num_classes} classes; resume with the same model."
                )
            head.to(features[0].device)
        if self._optimizer is None:
            params = [p for head in self._heads for p in head.parameters()]
            self._optimizer = torch.optim.Adam(params, lr=self.head_lr)
            if self._pending_optimizer is not None:
                # Loaded after the heads are on their device, so Adam's moments follow them.
                self._optimizer.load_state_dict(self._pending_optimizer)
                self._pending_optimizer = None
        return self._heads

    def _features(self, outputs: dict[str, Any]) -> list[torch.Tensor]:
        missing = [name for name in self.exits if name not in outputs]
        if missing:
            raise RuntimeError(
                f"`exits`: no output was recorded for {missing} in this step; the exit layers "
                "must run in the module's forward."
            )
        features = []
        for name in self.exits:
            output = outputs[name]
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"`exits`: layer {name!r} returns a {type(output).__name__}, not a tensor; "
                    "name a layer whose output is one tensor."
                )
            features.append(output)
        return features

    # ----------------------------------------------------------------------------------------
    # Lightning hooks: training

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.check_model(pl_module)
        self._attach(pl_module)

    def _attach(self, pl_module: nn.Module) -> None:
        modules = dict(pl_module.named_modules())
        self._tap.attach({**{name: modules[name] for name in self.exits}, _FINAL: pl_module})

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # No hooks left on the model once training is over (export, inference, a later fit).
        self._tap.detach()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._tap.armed = self.active_at(fractional_epoch(trainer))

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._tap.armed = False
        self._tap.take()  # drop references to this step's activations

    @override
    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        """``sum_i weights[i] * CE(head_i(exit layer i's output), labels)`` (0 outside the window).

        Args:
            trainer: the trainer (for the clock).
            pl_module: the module being trained.
            batch: the training batch; its labels are ``batch[1]`` (or a ``labels`` key).
            outputs: the module's logits on ``batch`` (their width is the class count).
        """
        logits = _logits(outputs)
        recorded = self._tap.take()
        prefix = f"compression/{self.log_name}"
        if not self.active_at(fractional_epoch(trainer)):
            term = logits.new_zeros(())
            pl_module.log(f"{prefix}/loss", term, on_step=False, on_epoch=True, sync_dist=True)
            return term
        features = self._features(recorded)
        heads = self._ready_heads(features, logits.shape[-1])
        labels = batch_labels(batch)
        head_logits = [
            head(f.detach() if self.detach else f) for head, f in zip(heads, features, strict=True)
        ]
        term = joint_exit_loss(head_logits, labels, self.weights)
        log = {"loss": term.detach()}
        for name, exit_logits in zip(self.exits, head_logits, strict=True):
            log[f"loss/{name}"] = nn.functional.cross_entropy(exit_logits.detach(), labels)
        for key, value in log.items():
            pl_module.log(f"{prefix}/{key}", value, on_step=False, on_epoch=True, sync_dist=True)
        return term

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Step the heads with the model: the gradients of every micro-batch are in."""
        if self._optimizer is None or self._heads is None:
            return
        params = [p for head in self._heads for p in head.parameters()]
        step_own_parameters(trainer, self._optimizer, params)

    # ----------------------------------------------------------------------------------------
    # Lightning hooks: calibration on the validation split

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collected = []

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Only once heads exist (after the first training step or a checkpoint); the sanity
        # check's batches come before that and say nothing about trained heads.
        self._tap.armed = (
            self._heads is not None and not trainer.sanity_checking and dataloader_idx == 0
        )

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        armed, self._tap.armed = self._tap.armed, False
        recorded = self._tap.take()
        if armed:
            self._collect(recorded, batch, pl_module)

    def _collect(self, recorded: dict[str, Any], batch: Any, module: nn.Module) -> None:
        if _FINAL not in recorded:
            raise RuntimeError(
                f"EarlyExit calibrates against the output of {type(module).__name__}.forward, "
                "which this validation step did not call; compute the logits with "
                "`self(inputs)` in validation_step."
            )
        features = self._features(recorded)
        logits = _logits(recorded[_FINAL])
        labels = batch_labels(batch)
        heads = self._ready_heads(features, logits.shape[-1])
        with torch.no_grad():
            probs = [
                torch.softmax(head(f).float(), dim=-1)
                for head, f in zip(heads, features, strict=True)
            ]
        confidence = torch.stack([p.max(dim=-1).values for p in probs]).cpu()
        correct = torch.stack([p.argmax(dim=-1) == labels for p in probs]).cpu()
        self._collected.append((confidence, correct, (logits.argmax(-1) == labels).cpu()))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        collected, self._collected = self._collected, []
        # Every rank decides alike whether to calibrate (heads exist everywhere from one step).
        if trainer.sanity_checking or self._heads is None:
            return
        if collected:
            confidence = torch.cat([c for c, _, _ in collected], dim=1)
            correct = torch.cat([c for _, c, _ in collected], dim=1)
            full = torch.cat([f for _, _, f in collected])
        else:
            confidence = torch.zeros(len(self.exits), 0)
            correct = torch.zeros(len(self.exits), 0, dtype=torch.bool)
            full = torch.zeros(0, dtype=torch.bool)
        stacked = torch.cat([confidence, correct.float(), full.float()[None]], dim=0)
        stacked = _gather_columns(trainer, stacked.to(pl_module.device)).cpu()
        if stacked.shape[1] == 0:
            return
        exits = len(self.exits)
        self._calibrate_on(stacked[:exits], stacked[exits : 2 * exits].bool(), stacked[-1].bool())
        prefix = f"compression/{self.log_name}"
        metrics = {f"{prefix}/{key}": value for key, value in self._metrics().items()}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def _calibrate_on(
        self, confidence: torch.Tensor, correct: torch.Tensor, full: torch.Tensor
    ) -> list[float]:
        thresholds = calibrate_thresholds(confidence, correct, full, self.max_accuracy_drop)
        accuracy, fractions = cascade(confidence, correct, full, thresholds)
        self._thresholds = thresholds
        self._last_calibration = {
            "inputs": int(full.numel()),
            "accuracy": accuracy,
            "accuracy_full": float(full.float().mean()),
            "exit_fractions": fractions,
            "head_accuracy": [float(c.float().mean()) for c in correct],
        }
        return thresholds

    def _metrics(self) -> dict[str, float]:
        calibration = self._last_calibration
        assert self._thresholds is not None
        metrics = {
            "val_acc": calibration["accuracy"],
            "val_acc_full": calibration["accuracy_full"],
            "exit_fraction/final": calibration["exit_fractions"][-1],
        }
        for index, name in enumerate(self.exits):
            metrics[f"threshold/{name}"] = self._thresholds[index]
            metrics[f"exit_fraction/{name}"] = calibration["exit_fractions"][index]
        return metrics

    def calibrate(self, pl_module: nn.Module, dataloader: DataLoader) -> list[float]:
        """Calibrate the thresholds on ``dataloader`` (one process), set and return them.

        Runs ``pl_module`` in eval mode without gradients on its device; for a module that was
        trained with this callback, e.g. to calibrate on another split or after more training.

        Raises:
            RuntimeError: there are no heads yet (no training step taken, no checkpoint loaded).
        """
        if self._heads is None:
            raise RuntimeError(
                "EarlyExit.calibrate needs trained heads: fit with this callback first, or load "
                "its checkpoint state (load_state_dict)."
            )
        attached = self._tap.attached
        if not attached:
            self._attach(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        device = next(pl_module.parameters()).device
        collected, self._collected = self._collected, []
        try:
            with torch.no_grad():
                for batch in dataloader:
                    inputs = model_inputs(batch).to(device)
                    labels = batch_labels(batch).to(device)
                    self._tap.armed = True
                    pl_module(inputs)
                    self._tap.armed = False
                    self._collect(self._tap.take(), (inputs, labels), pl_module)
            confidence = torch.cat([c for c, _, _ in self._collected], dim=1)
            correct = torch.cat([c for _, c, _ in self._collected], dim=1)
            full = torch.cat([f for _, _, f in self._collected])
        finally:
            self._collected = collected
            self._tap.armed = False
            pl_module.train(was_training)
            if not attached:
                self._tap.detach()
        return self._calibrate_on(confidence, correct, full)

    # ----------------------------------------------------------------------------------------
    # Checkpoint state

    @override
    def state_dict(self) -> dict[str, Any]:
        heads = None
        if self._heads is not None:
            heads = [
                {
                    **head.spec(),
                    "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
                }
                for head in self._heads
            ]
        optimizer = self._pending_optimizer
        if self._optimizer is not None:
            optimizer = self._optimizer.state_dict()
        return {
            "version": self.state_version,
            "heads": heads,
            "optimizer": optimizer,
            "thresholds": self.thresholds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_version(state_dict)
        heads = state_dict.get("heads")
        if heads is not None:
            if len(heads) != len(self.exits):
                raise ValueError(
                    f"`exits`={self.exits} has {len(self.exits)} exits, but the checkpoint holds "
                    f"{len(heads)} heads; resume with the same exits."
                )
            classes = {int(h["num_classes"]) for h in heads}
            self._build_heads([h["feature_shape"] for h in heads], classes.pop())
            assert self._heads is not None
            for head, stored in zip(self._heads, heads, strict=True):
                head.load_state_dict(stored["state"])
            # Built when the heads are first used, on their device.
            self._optimizer = None
            self._pending_optimizer = state_dict.get("optimizer")
        thresholds = state_dict.get("thresholds")
        self._thresholds = None if thresholds is None else [float(t) for t in thresholds]


def _gather_columns(trainer: pl.Trainer, local: torch.Tensor) -> torch.Tensor:
    """``[rows, n_rank]`` from every DDP rank as ``[rows, sum of n]``, in rank order."""
    if trainer.world_size <= 1:
        return local
    count = torch.tensor([local.shape[1]], device=local.device)
    counts = trainer.strategy.all_gather(count).reshape(-1).tolist()
    width = int(max(counts))
    padded = torch.zeros(local.shape[0], width, device=local.device, dtype=local.dtype)
    padded[:, : local.shape[1]] = local
    gathered = trainer.strategy.all_gather(padded)  # [ranks, rows, width]
    return torch.cat([gathered[r, :, : int(n)] for r, n in enumerate(counts)], dim=1)
