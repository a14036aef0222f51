"""LightningModules that cooperate with compression callbacks, and loading weights into them.

A Lightning callback cannot add a term to the training loss, so techniques that need one
(distillation, regularisation) implement ``loss_term(trainer, pl_module, batch, outputs)`` and the
module adds :meth:`CompressionModule.compression_loss` to its loss (DESIGN.md, contract 7).

:func:`load_weights` starts a model from a previous run (a run dir or a checkpoint file): sparse
transfer learning, one-shot pruning of a trained model. A checkpoint that does not fit is an error
naming the first mismatched key; only the classification head may differ, and only in its class
count, in which case it is swapped for the model's freshly initialised one.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_sparse.core.changes import LOSS
from lightning_sparse.core.checkpoint import (
    CHECKPOINT_IN_RUN_DIR,
    checkpoint_path,
    read_checkpoint,
    read_state_dict,
)
from lightning_sparse.core.structure import (
    applied_changes,
    changes_in_checkpoint,
    replay,
    structure_state,
)

__all__ = [
    "CHECKPOINT_IN_RUN_DIR",
    "IGNORE_INDEX",
    "LR_PHASE_SCHEDULES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "ClassificationModule",
    "CompressionModule",
    "LrPhase",
    "checkpoint_path",
    "copy_without_trainer",
    "drop_instance_forwards",
    "find_head",
    "load_weights",
    "parse_lr_phases",
    "read_state_dict",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
# Labels of positions that do not count (padding of token classification), as Hugging Face marks
# them.
IGNORE_INDEX = -100
LR_SCHEDULES = ("constant", "cosine")
LR_PHASE_SCHEDULES = ("constant", "linear", "cosine")
_PHASE_KEYS = ("start_epoch", "end_epoch", "lr", "lr_scale", "schedule", "min_lr_ratio")


class LrPhase(NamedTuple):
    """One phase of a learning-rate schedule (an entry of ``lr_phases``), validated.

    Attributes:
        start_epoch: fractional epoch at which the phase starts (a warm restart at ``lr``). A
            phase that starts where the next one does is empty (recipes interpolate epochs).
        end_epoch: where its curve ends (None: where the next phase starts, or the end of
            training); from there to the next phase the rate stays at the curve's last value.
        lr: the learning rate at ``start_epoch`` (None when ``lr_scale`` gives it).
        lr_scale: the rate at ``start_epoch`` as a multiple of the module's ``lr``, so a recipe
            fits models of different rates (None when ``lr`` gives it).
        schedule: ``constant``, ``linear`` or ``cosine`` (half a cosine) down to
            ``lr * min_lr_ratio`` at ``end_epoch``.
        min_lr_ratio: the curve's last rate as a share of ``lr``, in [0, 1].
    """

    start_epoch: float
    end_epoch: float | None
    lr: float | None
    lr_scale: float | None
    schedule: str
    min_lr_ratio: float

    def rate(self, base_lr: float) -> float:
        """The rate at the phase's start, for a module whose ``lr`` is ``base_lr``."""
        return self.lr if self.lr is not None else base_lr * (self.lr_scale or 0.0)


class CompressionModule:
    """Mixin for a ``LightningModule``: loss terms of compression callbacks, changed structure.

    Call :meth:`compression_loss` from ``training_step`` and add it to the task loss. Callbacks that
    contribute a loss check for this mixin in ``setup`` so that a module without it fails loudly
    instead of silently training without the term.

    The mixin also carries structure changes (channels removed during training) through
    checkpoints: :meth:`on_save_checkpoint` stores the module's log of changes, and
    :meth:`on_load_checkpoint`, which Lightning calls before it loads the weights, replays them on
    this module, so a resumed run rebuilds the changed architecture. Techniques that change the
    structure require the mixin for that reason. A subclass that overrides either hook calls
    ``super()``'s.

    Example::

        class MyModule(CompressionModule, LightningModule):
            def training_step(self, batch, batch_idx):
                logits = self.net(batch[0])
                loss = F.cross_entropy(logits, batch[1])
                return loss + self.compression_loss(batch, logits)
    """

    def compression_loss(self, batch: Any, outputs: Any) -> torch.Tensor:
        """Sum of ``loss_term(trainer, self, batch, outputs)`` over the trainer's callbacks.

        Args:
            batch: the training batch as given to ``training_step``.
            outputs: the model's forward output on ``batch`` (logits for classification).

        Returns:
            A scalar tensor on the module's device; zero when no callback defines ``loss_term`` or
            the module is not attached to a trainer.
        """
        if not isinstance(self, pl.LightningModule):
            raise TypeError(
                f"{type(self).__name__} uses CompressionModule without being a LightningModule; "
                "declare it as `class M(CompressionModule, LightningModule)`."
            )
        total = torch.zeros((), device=self.device)
        for loss_term in self._loss_terms():
            total = total + loss_term(self._trainer, self, batch, outputs)
        return total

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the structure changes applied to this module (``checkpoint["structure"]``)."""
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        changes = applied_changes(self)  # type: ignore[arg-type]
        if changes:
            checkpoint["structure"] = structure_state(changes)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replay the checkpoint's structure changes on this module before its weights load."""
        replay(self, changes_in_checkpoint(checkpoint))  # type: ignore[arg-type]
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def has_compression_loss(self) -> bool:
        """Whether any of the trainer's callbacks contributes a loss term."""
        return bool(self._loss_terms())

    def _loss_terms(self) -> list[Any]:
        # `self.trainer` raises when detached; a detached module (plain forward, unit tests) has
        # no callbacks and so no loss terms.
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        terms = []
        for callback in trainer.callbacks:
            declared = getattr(callback, "changes", None)
            # A technique says whether it adds loss; a plain callback of the user's is taken at
            # its word when it has a `loss_term`.
            if declared is not None and LOSS not in declared:
                continue
            term = getattr(callback, "loss_term", None)
            if callable(term):
                terms.append(term)
        return terms


class ClassificationModule(CompressionModule, pl.LightningModule):
    """Cross-entropy classification around any backbone, with accuracy for every split.

    The backbone is ``self.model``, so parameters are named ``model.<layer>.weight`` (what recipe
    ``params`` patterns match), and a checkpoint's ``state_dict`` with the ``model.`` prefix removed
    loads into the plain backbone. Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc`` (plain accuracy, micro-averaged), plus
    ``train/compression_loss`` when a callback contributes one.

    Token classification works the same way: logits ``[batch, seq, classes]`` against labels
    ``[batch, seq]``, where label ``-100`` (padding) counts in neither loss nor accuracy. A batch's
    inputs may be a dict (``{input_ids, attention_mask}``), passed to the backbone as keyword
    arguments, and a backbone may answer with an object holding ``logits`` (a Hugging Face model:
    ``model=bert_tiny``, ``model=gpt2_tiny``).

    Args:
        model: the backbone: inputs in, logits out (built by Hydra from the nested ``model:``
            node).
        num_classes: number of classes the backbone predicts.
        lr: learning rate.
        weight_decay: weight decay (decoupled for ``adamw``).
        optimizer: ``adam``, ``adamw`` or ``sgd`` (with ``momentum``).
        momentum: momentum for ``sgd``.
        lr_schedule: ``constant``, or ``cosine``: the learning rate follows half a cosine from
            ``lr`` down to ``lr * min_lr_ratio`` over the trainer's optimizer steps
            (``Trainer.estimated_stepping_batches``, so ``max_epochs`` and gradient accumulation
            are accounted for), updated every step.
        min_lr_ratio: the cosine schedule's last learning rate as a share of ``lr``, in [0, 1].
        lr_phases: a learning rate per phase of training, as recipes set it (warm restarts where
            pruning and fine-tuning start, as SparseML's learning-rate modifiers): a list of
            ``{start_epoch, lr, schedule, end_epoch, min_lr_ratio}`` (``lr_scale`` instead of
            ``lr``: the rate as a multiple of ``lr``; ``schedule``: ``constant``,
            ``linear`` or ``cosine`` from ``lr`` down to ``lr * min_lr_ratio`` at ``end_epoch``,
            default ``constant``; ``end_epoch`` defaults to the next phase's start, the last
            phase's to the end of training; ``min_lr_ratio`` defaults to 0), in increasing
            ``start_epoch``. Epochs are fractional, on the optimizer-step clock the compression
            callbacks use; the rate is updated every optimizer step and resumes exactly. Before
            the first phase the rate is ``lr``. When set, ``lr_schedule`` and ``min_lr_ratio``
            are not used. None (the default): ``lr_schedule`` alone.
        init_from: start from these weights: a run dir (its ``checkpoints/last.ckpt``), a Lightning
            checkpoint of this module, or a plain ``state_dict`` of the backbone (e.g. torchvision
            weights saved with ``torch.save``). Loaded at construction; every key must match but
            the head's, which is swapped for a new one when its class count differs. Zeros of a
            sparse checkpoint come along (hold them with ``ConstantPruning``). When restoring with
            ``load_from_checkpoint``, pass ``init_from=None``: the checkpoint has the weights.
        reset_head: always start the head afresh (a new task, even with as many classes).
        head: name of the classification layer in the backbone (e.g. ``fc``); None takes its last
            ``nn.Linear``.

    Raises:
        ValueError: an argument is out of range; the head's outputs differ from ``num_classes``;
            ``init_from`` does not match the model (the first mismatched key is named); at
            ``setup``, the data module has another class count.
        FileNotFoundError: ``init_from`` does not exist or a run dir holds no checkpoint.

    Example::

        module = ClassificationModule(SmallCNN(), num_classes=10)
        Trainer(callbacks=[MagnitudePruning(final_sparsity=0.9, end_epoch=10)], max_epochs=12).fit(
            module, datamodule=DigitsDataModule()
        )
        # Sparse transfer: a pruned run's weights, a new 5-class head, every zero held.
        module = ClassificationModule(
            SmallCNN(num_classes=5), num_classes=5, init_from="runs/train/...", reset_head=True
        )
        Trainer(callbacks=[ConstantPruning()], max_epochs=10).fit(
            module, datamodule=DigitsDataModule(classes=[5, 6, 7, 8, 9])
        )
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        momentum: float = 0.9,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        lr_phases: Sequence[Mapping[str, Any]] | None = None,
        init_from: str | Path | None = None,
        reset_head: bool = False,
        head: str | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"`optimizer`={optimizer!r} is not allowed; choose one of {OPTIMIZERS}."
            )
        if not lr > 0:
            raise ValueError(f"`lr`={lr!r} is not allowed; it must be > 0.")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"`lr_schedule`={lr_schedule!r} is not allowed; choose one of {LR_SCHEDULES}."
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(
                f"`min_lr_ratio`={min_lr_ratio!r} is not allowed; it must be in [0, 1]."
            )
        if weight_decay < 0:
            raise ValueError(f"`weight_decay`={weight_decay!r} is not allowed; it must be >= 0.")
        # Plain dicts, not Hydra's containers: hyperparameters go into checkpoints, which must
        # load with `weights_only=True`.
        lr_phases = (
            None if lr_phases is None else [_phase_config(p) for p in parse_lr_phases(lr_phases)]
        )
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes`={num_classes!r} is not allowed; it must be >= 2.")
        # A str, not a Path: hyperparameters go into checkpoints, which must load with
        # `weights_only=True`, and that refuses pathlib objects.
        init_from = None if init_from is None else str(init_from)
        # The backbone is a module, not a hyperparameter; checkpoints hold its weights instead.
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = int(num_classes)
        self.train_acc = MulticlassAccuracy(
            self.num_classes, average="micro", ignore_index=IGNORE_INDEX
        )
        self.val_acc = MulticlassAccuracy(
            self.num_classes, average="micro", ignore_index=IGNORE_INDEX
        )
        self.test_acc = MulticlassAccuracy(
            self.num_classes, average="micro", ignore_index=IGNORE_INDEX
        )
        found = find_head(model, head)
        self.head_name = found[0] if found else None
        if found and found[1].out_features != self.num_classes:
            raise ValueError(
                f"`num_classes`={self.num_classes} but the backbone's head `{found[0]}` has "
                f"{found[1].out_features} outputs; build the backbone for {self.num_classes} "
                "classes too (the model configs pass it ${data.num_classes})"
                + ("" if head else ", or name the classification layer with `head`")
                + "."
            )
        if reset_head and init_from is None:
            raise ValueError(
                "`reset_head`=True needs `init_from`, the run dir or checkpoint to start from "
                "(with Hydra: model.init_from=...): a new head only makes sense on loaded weights."
            )
        if init_from is not None:
            if self.head_name is None and reset_head:
                raise ValueError(
                    "`reset_head`=True but the backbone has no nn.Linear to take for its head; "
                    "name the classification layer with `head`."
                )
            load_weights(
                self,
                init_from,
                head=f"model.{self.head_name}" if self.head_name else None,
                reset_head=reset_head,
            )

    @override
    def setup(self, stage: str) -> None:
        # Labels past the head would fail deep inside cross_entropy; a data module that states its
        # class count lets this fail first, naming both numbers.
        # `Trainer.datamodule` is set at runtime by its data connector, not declared on the class.
        datamodule = vars(self._trainer).get("datamodule") if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"`num_classes`={self.num_classes} but the data module "
                f"({type(datamodule).__name__}) has {data_classes} classes; set the model's "
                f"num_classes (and its head's) to {data_classes}."
            )

    @override
    def forward(self, x: Any) -> torch.Tensor:
        # Dict inputs ({input_ids, attention_mask}) are keyword arguments; a Hugging Face model
        # answers with a ModelOutput whose logits are what a classifier trains on.
        output = self.model(**x) if isinstance(x, Mapping) else self.model(x)
        # A tensor (or torch.fx's stand-in for one while tracing, as early exit does) is the logits.
        if isinstance(output, (torch.Tensor, torch.fx.Proxy)):
            return output  # type: ignore[return-value]
        return output.logits

    @override
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(_classes_first(logits), labels, ignore_index=IGNORE_INDEX)
        extra = self.compression_loss(batch, logits)
        if self.has_compression_loss():
            self.log("train/compression_loss", extra, on_step=False, on_epoch=True)
        self.train_acc(_classes_first(logits.detach()), labels)
        self.log("train/loss", loss + extra, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss + extra

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], split: str, metric: MulticlassAccuracy
    ) -> None:
        inputs, labels = batch
        logits = _classes_first(self(inputs))
        metric(logits, labels)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        # sync_dist averages the loss over DDP ranks; the metric object syncs itself.
        self.log(f"{split}/loss", loss, sync_dist=True)
        self.log(f"{split}/acc", metric, prog_bar=split == "val")

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer()
        if self.hparams.get("lr_phases") is not None:
            return self._phased_schedule(optimizer)
        if self.hparams.get("lr_schedule", "constant") == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        floor = float(self.hparams.get("min_lr_ratio", 0.0))
        # A partial keeps `total` out of LambdaLR's state_dict (it saves a callable's __dict__
        # only), so a run resumed with a larger max_epochs stretches the curve to its new end.
        factor = functools.partial(_cosine, total=total, floor=floor)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    @override
    def on_train_start(self) -> None:
        # A run resumed with a longer max_epochs restores the learning rate of the old curve's
        # step; put it on the new curve now rather than one step late.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            factors = scheduler.lr_lambdas
            ours = (_cosine, _phased)
            if not all(isinstance(f, functools.partial) and f.func in ours for f in factors):
                continue
            groups = scheduler.optimizer.param_groups
            for group, base, factor in zip(groups, scheduler.base_lrs, factors, strict=True):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports

    def _phased_schedule(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        phases = parse_lr_phases(self.hparams["lr_phases"])
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        # The compression callbacks' clock: optimizer steps per epoch as the trainer takes them
        # (the last window of an epoch steps even when accumulation does not divide it).
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "`lr_phases` are in epochs and need a train dataloader with a length; this one "
                "has none (an IterableDataset?)."
            )
        per_epoch = max(1, math.ceil(int(batches) / self.trainer.accumulate_grad_batches))
        end_of_training = total_steps / per_epoch
        for index, phase in enumerate(phases):
            # A phase that starts as training ends (e.g. fine-tuning after a pruning schedule
            # that runs to the last epoch) is harmless; one past the end is a mistake.
            smoke = bool(vars(self.trainer).get("fast_dev_run"))  # a few batches: cannot fit
            if phase.start_epoch > end_of_training + 1e-9 and not smoke:
                raise ValueError(
                    f"`lr_phases[{index}].start_epoch`={phase.start_epoch:g} is past the end of "
                    f"training (epoch {end_of_training:g}): the phase would never start."
                )
        if self.hparams.get("lr_schedule", "constant") != "constant":
            rank_zero_info(
                f"lr_phases are set: lr_schedule={self.hparams['lr_schedule']!r} is not used."
            )
        # As for the cosine: the numbers are the partial's arguments, not LambdaLR state, so a
        # resumed run with another length recomputes them; the step count is the state.
        factor = functools.partial(
            _phased,
            phases=tuple(phases),
            per_epoch=per_epoch,
            end_of_training=end_of_training,
            base_lr=float(self.hparams["lr"]),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _optimizer(self) -> torch.optim.Optimizer:
        params = self.parameters()
        lr, decay = self.hparams["lr"], self.hparams["weight_decay"]
        name = self.hparams["optimizer"]
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.hparams["momentum"], weight_decay=decay)


def _classes_first(logits: torch.Tensor) -> torch.Tensor:
    """Per-token logits ``[batch, seq, classes]`` as ``[batch, classes, seq]`` (what the loss and
    the metrics take); per-sample logits ``[batch, classes]`` as they are."""
    return logits.movedim(-1, 1) if logits.dim() > 2 else logits


def _cosine(step: int, total: int, floor: float) -> float:
    """``LambdaLR`` factor: half a cosine from 1 at step 0 to ``floor`` at step ``total``."""
    progress = min(step, total) / total
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_lr_phases(phases: Any) -> list[LrPhase]:
    """Validate ``lr_phases`` (a list of mappings, as a config gives them) into phases.

    Raises:
        ValueError: not a list of mappings, an unknown key, a missing ``start_epoch`` or ``lr``,
            a value out of range, phases out of order or overlapping; names the entry and key.
    """
    # Hydra's ListConfig and DictConfig are a Sequence and a Mapping.
    if isinstance(phases, (str, bytes)) or not isinstance(phases, Sequence):
        raise ValueError(
            f"`lr_phases`={phases!r} is not allowed; give a list of phases, each a mapping "
            f"with keys {', '.join(_PHASE_KEYS)}."
        )
    parsed: list[LrPhase] = []
    for index, raw in enumerate(phases):
        where = f"lr_phases[{index}]"
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"`{where}`={raw!r} is not a mapping with keys {', '.join(_PHASE_KEYS)}."
            )
        entry = {str(key): value for key, value in raw.items()}
        unknown = sorted(set(entry) - set(_PHASE_KEYS))
        if unknown:
            raise ValueError(f"`{where}` has unknown keys {unknown}; allowed: {list(_PHASE_KEYS)}.")
        if "start_epoch" not in entry:
            raise ValueError(f"`{where}` has no `start_epoch`; every phase needs one.")
        if ("lr" in entry) == ("lr_scale" in entry):
            raise ValueError(
                f"`{where}` needs exactly one of `lr` (a rate) and `lr_scale` (a multiple of the "
                "module's lr)."
            )
        start = entry["start_epoch"]
        rate_key = "lr" if "lr" in entry else "lr_scale"
        lr = entry[rate_key]
        end = entry.get("end_epoch")
        schedule = entry.get("schedule", "constant")
        floor = entry.get("min_lr_ratio", 0.0)
        if not _is_real(start) or start < 0:
            raise ValueError(f"`{where}.start_epoch`={start!r} is not allowed; it must be >= 0.")
        if not _is_real(lr) or not lr > 0:
            raise ValueError(f"`{where}.{rate_key}`={lr!r} is not allowed; it must be > 0.")
        if end is not None and (not _is_real(end) or end <= start):
            raise ValueError(
                f"`{where}.end_epoch`={end!r} is not allowed; it must be null or > its "
                f"start_epoch={start:g}."
            )
        if schedule not in LR_PHASE_SCHEDULES:
            raise ValueError(
                f"`{where}.schedule`={schedule!r} is not allowed; choose one of "
                f"{LR_PHASE_SCHEDULES}."
            )
        if not _is_real(floor) or not 0.0 <= floor <= 1.0:
            raise ValueError(
                f"`{where}.min_lr_ratio`={floor!r} is not allowed; it must be in [0, 1]."
            )
        if parsed:
            previous = parsed[-1]
            if start < previous.start_epoch:
                raise ValueError(
                    f"`{where}.start_epoch`={start:g} is before the previous phase's "
                    f"start_epoch={previous.start_epoch:g}; list phases in increasing start_epoch."
                )
            if previous.end_epoch is not None and previous.end_epoch > start:
                raise ValueError(
                    f"`lr_phases[{index - 1}].end_epoch`={previous.end_epoch:g} is after the next "
                    f"phase's start_epoch={start:g}; phases must not overlap."
                )
        parsed.append(
            LrPhase(
                float(start),
                None if end is None else float(end),
                float(lr) if rate_key == "lr" else None,
                float(lr) if rate_key == "lr_scale" else None,
                schedule,
                float(floor),
            )
        )
    if not parsed:
        raise ValueError("`lr_phases` is empty; give at least one phase, or null for none.")
    return parsed


def _phase_config(phase: LrPhase) -> dict[str, Any]:
    """A phase as its config gives it back (what ``parse_lr_phases`` reads)."""
    return {key: value for key, value in phase._asdict().items() if value is not None}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _phased(
    step: int,
    phases: tuple[LrPhase, ...],
    per_epoch: int,
    end_of_training: float,
    base_lr: float,
) -> float:
    """``LambdaLR`` factor at optimizer step ``step``: the phase in force, as a share of ``lr``."""
    epoch = step / per_epoch
    current = None
    for index, phase in enumerate(phases):
        if phase.start_epoch <= epoch:
            current = index
    if current is None:
        return 1.0
    phase = phases[current]
    end = phase.end_epoch
    if end is None:
        end = phases[current + 1].start_epoch if current + 1 < len(phases) else end_of_training
    span = end - phase.start_epoch
    progress = min(1.0, (epoch - phase.start_epoch) / span) if span > 0 else 1.0
    if phase.schedule == "constant":
        shape = 1.0
    elif phase.schedule == "linear":
        shape = 1.0 - (1.0 - phase.min_lr_ratio) * progress
    else:
        shape = phase.min_lr_ratio + (1.0 - phase.min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )
    return phase.rate(base_lr) * shape / base_lr


_M = TypeVar("_M", bound=nn.Module)


def copy_without_trainer(pl_module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of the module; its trainer is neither copied nor shared."""
    trainer = pl_module._trainer
    pl_module._trainer = None
    try:
        return copy.deepcopy(pl_module)
    finally:
        pl_module._trainer = trainer


def drop_instance_forwards(model: _M) -> _M:
    """Give every layer its class's ``forward`` back; returns ``model``.

    QAT installs a fake-quantizing ``forward`` as an instance attribute of each quantized layer,
    which a copy of the model carries along; a float copy (a teacher, a dense snapshot) drops it.
    """
    for module in model.modules():
        vars(module).pop("forward", None)
    return model


def find_head(model: nn.Module, head: str | None = None) -> tuple[str, nn.Linear] | None:
    """The classification layer of ``model``: the ``nn.Linear`` named ``head``, else the last one.

    Returns:
        ``(name in model, layer)``, or None when ``head`` is None and there is no ``nn.Linear``.

    Raises:
        ValueError: ``head`` names no ``nn.Linear`` of ``model``.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if head is None:
        return linears[-1] if linears else None
    for name, module in linears:
        if name == head:
            return name, module
    raise ValueError(
        f"`head`={head!r} is not an nn.Linear of the backbone; its Linear layers: "
        f"{[name for name, _ in linears] or 'none'}."
    )


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def load_weights(
    module: nn.Module,
    path: str | Path,
    *,
    head: str | None = None,
    reset_head: bool = False,
    field: str = "init_from",
) -> list[str]:
    """Load the weights at ``path`` into ``module``, every key matched; swap the head if asked.

    A plain backbone ``state_dict`` (no key starting with ``model.``) is read as the ``model.``
    backbone of a :class:`ClassificationModule`. With ``head`` given (its name in ``module``, e.g.
    ``model.fc2``), the head is left as initialised, i.e. swapped, when ``reset_head`` is set or
    when the checkpoint's head has another class count; every other key must match exactly.

    Args:
        module: the model to fill, e.g. a :class:`ClassificationModule`.
        path: run dir, Lightning checkpoint, or ``state_dict`` file.
        head: name of the head layer in ``module``; None: nothing may differ (one-shot pruning).
        reset_head: never load the head.
        field: the argument name used in error messages.

    Structure changes recorded in the checkpoint (channels removed during training) are replayed on
    ``module`` first, so the model its config builds takes a changed model's weights.

    Returns:
        The keys left as initialised (the head's when it was swapped), in ``module``'s order.

    Raises:
        FileNotFoundError: see :func:`checkpoint_path`.
        ValueError: the checkpoint does not match: the message names the first mismatched key
            (missing, unexpected or of another shape) and how many keys differ; or a recorded
            structure change does not fit ``module``.
    """
    state, changes = read_checkpoint(path, field)
    if changes:
        try:
            replay(module, changes)
        except ValueError as err:
            raise ValueError(f"`{field}`={str(path)!r}: {err}") from err
    target = module.state_dict()
    prefixed = all(k.startswith("model.") for k in target)
    if prefixed and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    head_keys = [k for k in target if head is not None and k.startswith(f"{head}.")]
    head_weight = f"{head}.weight"
    swap = bool(head_keys) and (
        reset_head
        or (
            head_weight in state
            and state[head_weight].dim() == 2
            and state[head_weight].shape[1:] == target[head_weight].shape[1:]
            and any(k in state and state[k].shape != target[k].shape for k in head_keys)
        )
    )
    skipped = head_keys if swap else []
    problems: list[str] = []
    for key, value in target.items():
        if key in skipped:
            continue
        if key not in state:
            problems.append(f"{key!r} is missing from the checkpoint")
        elif state[key].shape != value.shape:
            problems.append(
                f"{key!r} has shape {_shape(state[key])} in the checkpoint but "
                f"{_shape(value)} in the model"
            )
    problems += [
        f"{key!r} is in the checkpoint but not in the model"
        for key in state
        if key not in target and key not in skipped
    ]
    if problems:
        raise ValueError(
            f"`{field}`={str(path)!r} does not match the model; first mismatched key: "
            f"{problems[0]} ({len(problems)} mismatched keys in all). Is it a checkpoint of this "
            "model, built with the same config?"
        )
    module.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    if swap:
        old = state.get(head_weight)
        classes = f"{old.shape[0]} classes in the checkpoint" if old is not None else "no head"
        rank_zero_info(
            f"{field}: loaded {path}; new head `{head}` for {target[head_weight].shape[0]} classes "
            f"({classes}{', reset_head' if reset_head else ''})."
        )
    return skipped
