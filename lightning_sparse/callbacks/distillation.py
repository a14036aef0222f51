"""Knowledge distillation (Hinton et al. 2015) as a callback that contributes a loss term.

A callback cannot add to the training loss, so :class:`KnowledgeDistillation` implements
``loss_term`` and the LightningModule adds it through the ``CompressionModule`` mixin
(``loss + self.compression_loss(batch, logits)``, DESIGN.md contract 7). The contract is additive:
the module keeps its own task loss at full weight and the callback adds
``hardness * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (``batchmean``; the ``T^2``
keeps the gradient's scale independent of the temperature). ``hardness`` is therefore the weight
of the distillation term next to a task loss of weight 1, not SparseML's convex mix.

The teacher is held by the callback, never by the LightningModule: it is not a submodule, so it is
not in the model's ``state_dict``, its optimizer or DDP's wrapping. It is frozen, in eval mode and
on the student's device. Only output (logit) distillation is implemented; feature distillation on
named layers is not.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import CompressionCallback, fractional_epoch
from lightning_sparse.module import CompressionModule, checkpoint_path, read_state_dict

__all__ = ["SELF_TEACHER", "KnowledgeDistillation", "distillation_loss"]

SELF_TEACHER = "self"
_STATE_VERSION = 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    hardness: float = 1.0,
) -> torch.Tensor:
    """``hardness * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    Args:
        student_logits: ``[batch, classes]`` logits of the model being trained.
        teacher_logits: ``[batch, classes]`` logits of the teacher (no gradient needed).
        temperature: ``T``; above 1 softens both distributions so that the teacher's ranking of
            the wrong classes carries signal.
        hardness: weight of the term.

    Returns:
        A scalar tensor.
    """
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return hardness * temperature**2 * kl


def _inputs(batch: Any) -> Any:
    """The model input of a batch: its first element (``(inputs, labels)``) or the batch itself."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("input", "inputs", "x", "image", "images"):
            if key in batch:
                return batch[key]
        raise ValueError(
            f"KnowledgeDistillation cannot find the model input in a batch with keys "
            f"{sorted(batch)}; use (inputs, labels) tuples or one of the keys input/inputs/x/image."
        )
    return batch


def _freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, and no quantization forwards copied from the student."""
    for module in model.modules():
        # QAT installs a fake-quantizing `forward` as an instance attribute; a copy of the student
        # would carry it along. The teacher is the float model, so give every layer its own back.
        vars(module).pop("forward", None)
    model.eval()
    model.requires_grad_(False)
    return model


def _copy_of(pl_module: pl.LightningModule) -> nn.Module:
    """A deep copy of the module without its trainer (which must neither be copied nor shared)."""
    trainer = pl_module._trainer
    pl_module._trainer = None
    try:
        return copy.deepcopy(pl_module)
    finally:
        pl_module._trainer = trainer


class KnowledgeDistillation(CompressionCallback):
    """Distil a teacher's logits into the model being trained (and compressed).

    The loss term is added to the module's own loss (see the module docstring) while the fractional
    epoch is in ``[start_epoch, end_epoch)``; outside it the term is zero. Each training step logs
    ``compression/<name>/loss`` (the term) and ``compression/<name>/active`` (0 or 1), averaged
    per epoch.

    Teachers:

    - ``teacher="self"``: a frozen copy of the student taken at the first batch at or after
      ``start_epoch`` (on Lightning's fractional-epoch clock), so one run trains dense, then distils
      its dense self into the pruned student. Put ``start_epoch`` where pruning starts (with
      ``init_sparsity`` 0 the first pruning step removes nothing, so the copy is dense). The copy
      is taken once; its weights are in this callback's checkpoint state (plain tensors, readable
      with ``torch.load(weights_only=True)``), so a resumed run distils from the same teacher.
    - ``teacher=<run dir or checkpoint>``: the weights of a previous run, loaded into a copy of the
      student's architecture, or into ``teacher_model`` when given.
    - ``teacher=None`` with ``teacher_model``: a model config (``_target_``) that brings its own
      weights (e.g. a ``ClassificationModule`` with ``init_from``).

    Args:
        teacher: ``"self"``, a run dir or checkpoint file, or None (then ``teacher_model``).
        teacher_model: the teacher's architecture: a ``_target_`` config (Hydra's recursive
            instantiation may hand it over already built) or an ``nn.Module``. None: the student's.
        hardness: weight of the distillation term, > 0.
        temperature: softmax temperature ``T``, > 0.
        start_epoch: fractional epoch from which the term is added (and the self-teacher taken).
        end_epoch: fractional epoch from which the term is no longer added; None: to the end.
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range or ``teacher``/``teacher_model`` do not make a
            teacher (the message names the argument), at construction; at ``setup``, a module
            without the ``CompressionModule`` mixin, or teacher weights that do not fit.
        FileNotFoundError: ``teacher`` names no checkpoint (at construction, before training).

    Example::

        class MyModule(CompressionModule, LightningModule): ...  # adds self.compression_loss(...)

        Trainer(
            max_epochs=30,
            callbacks=[
                MagnitudePruning(final_sparsity=0.9, start_epoch=5, end_epoch=15),
                KnowledgeDistillation(teacher="self", start_epoch=5, hardness=1.0),
            ],
        ).fit(MyModule(), datamodule=...)
    """

    def __init__(
        self,
        teacher: str | Path | None = SELF_TEACHER,
        teacher_model: Mapping[str, Any] | nn.Module | None = None,
        hardness: float = 0.5,
        temperature: float = 2.0,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if teacher is not None and not isinstance(teacher, (str, Path)):
            raise ValueError(
                f"`teacher`={teacher!r} is not allowed; give 'self', a run dir or checkpoint "
                "file, or null (with `teacher_model`)."
            )
        if isinstance(teacher, str) and not teacher.strip():
            raise ValueError(
                "`teacher`='' is not allowed; give 'self', a run dir or checkpoint file, or null."
            )
        if teacher_model is not None and not (
            isinstance(teacher_model, nn.Module)
            or (isinstance(teacher_model, Mapping) and "_target_" in teacher_model)
        ):
            raise ValueError(
                f"`teacher_model`={teacher_model!r} is not allowed; give a model config with a "
                "`_target_` (or an nn.Module), or null for the student's architecture."
            )
        if teacher == SELF_TEACHER and teacher_model is not None:
            raise ValueError(
                "`teacher_model` is not allowed with `teacher`='self': the self-teacher is a copy "
                "of the student. Remove `teacher_model`, or give `teacher` a checkpoint."
            )
        if teacher is None and teacher_model is None:
            raise ValueError(
                "`teacher`=None needs `teacher_model`, a model config that brings its own weights; "
                "or give `teacher`='self' or a run dir or checkpoint file."
            )
        if teacher is not None and teacher != SELF_TEACHER:
            # Fails here, when the recipe is built, not after hours of training.
            checkpoint_path(teacher, field="teacher")
        if not _is_number(hardness) or hardness <= 0:
            raise ValueError(f"`hardness`={hardness!r} is not allowed; it must be a number > 0.")
        if not _is_number(temperature) or temperature <= 0:
            raise ValueError(
                f"`temperature`={temperature!r} is not allowed; it must be a number > 0."
            )
        if not _is_number(start_epoch) or start_epoch < 0:
            raise ValueError(
                f"`start_epoch`={start_epoch!r} is not allowed; it must be a number >= 0."
            )
        if end_epoch is not None and (not _is_number(end_epoch) or end_epoch <= start_epoch):
            raise ValueError(
                f"`end_epoch`={end_epoch!r} is not allowed; it must be null or a number > "
                f"`start_epoch`={start_epoch:g}."
            )
        self.teacher_source = None if teacher is None else str(teacher)
        self.teacher_model = teacher_model
        self.hardness = float(hardness)
        self.temperature = float(temperature)
        self.start_epoch = float(start_epoch)
        self.end_epoch = None if end_epoch is None else float(end_epoch)
        self._teacher: nn.Module | None = None
        # Teacher weights restored from a checkpoint before the module they fit is at hand.
        self._pending_teacher: dict[str, torch.Tensor] | None = None

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher, once there is one (the self-teacher only from ``start_epoch``)."""
        return self._teacher

    @property
    def teacher_taken(self) -> bool:
        """Whether the teacher exists (for ``teacher='self'``: whether the copy has been taken)."""
        return self._teacher is not None

    def active_at(self, epoch: float) -> bool:
        """Whether the term is added at fractional ``epoch``; a pure function of it."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not isinstance(pl_module, CompressionModule):
            raise TypeError(
                f"KnowledgeDistillation adds a loss term, but {type(pl_module).__name__} does not "
                "mix in lightning_sparse.module.CompressionModule, so the term would be silently "
                "dropped. Declare `class M(CompressionModule, LightningModule)` and return "
                "`loss + self.compression_loss(batch, outputs)` from training_step."
            )
        max_epochs = None if vars(trainer).get("fast_dev_run") else trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
            raise ValueError(
                f"`start_epoch`={self.start_epoch:g} is not before the trainer's max_epochs="
                f"{max_epochs}: distillation would never start."
            )
        if self._teacher is None and self.teacher_source != SELF_TEACHER:
            self._teacher = self._external_teacher(pl_module)

    def _external_teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        """The teacher from ``teacher_model`` and/or the ``teacher`` checkpoint."""
        if isinstance(self.teacher_model, nn.Module):
            model = copy.deepcopy(self.teacher_model)
        elif self.teacher_model is not None:
            built = instantiate(dict(self.teacher_model), _convert_="all")
            if not isinstance(built, nn.Module):
                raise ValueError(
                    f"`teacher_model` built a {type(built).__name__}, not an nn.Module."
                )
            model = built
        else:
            model = _copy_of(pl_module)
        if self.teacher_source is not None:
            state = read_state_dict(self.teacher_source, field="teacher")
            self._load_teacher_weights(model, state)
        return _freeze(model).to(pl_module.device)

    def _load_teacher_weights(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        try:
            model.load_state_dict(state, strict=True)
            return
        except RuntimeError as first:
            # A backbone given as `teacher_model` and a checkpoint of ClassificationModule
            # (keys `model.<layer>`): drop the wrapper's prefix.
            stripped = {
                k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")
            }
            try:
                if not stripped:
                    raise first
                model.load_state_dict(stripped, strict=True)
            except RuntimeError:
                raise ValueError(
                    f"`teacher`={self.teacher_source!r}: its weights do not fit the teacher "
                    f"model ({type(model).__name__}): {first}"
                ) from first

    def _take_self_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teacher = _freeze(_copy_of(pl_module)).to(pl_module.device)
        rank_zero_info(
            f"{self.log_name}: teacher = frozen copy of the model at epoch "
            f"{fractional_epoch(trainer):.3f}."
        )

    def _restore_self_teacher(self, pl_module: pl.LightningModule) -> None:
        assert self._pending_teacher is not None
        model = _freeze(_copy_of(pl_module))
        model.load_state_dict(self._pending_teacher, strict=True)
        self._teacher = model.to(pl_module.device)
        self._pending_teacher = None

    def _maybe_take_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher_source != SELF_TEACHER or self._teacher is not None:
            return
        if self._pending_teacher is not None:
            # Resumed: the teacher is the one the interrupted run took, never a new copy.
            self._restore_self_teacher(pl_module)
        elif fractional_epoch(trainer) >= self.start_epoch:
            self._take_self_teacher(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_take_teacher(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_take_teacher(trainer, pl_module)

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        """The distillation term for this training step (zero outside its epochs).

        Args:
            trainer: the trainer (for the clock).
            pl_module: the student module.
            batch: the training batch; its first element is the model input.
            outputs: the student's logits on ``batch``.

        Returns:
            A scalar tensor on the student's device.
        """
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(
                f"KnowledgeDistillation distils logits: `outputs` must be the student's logits "
                f"tensor, got {type(outputs).__name__}."
            )
        student = outputs
        active = self.active_at(fractional_epoch(trainer))
        if active and self._teacher is None:
            self._maybe_take_teacher(trainer, pl_module)
        if not active or self._teacher is None:
            term = torch.zeros((), device=student.device)
        else:
            # Lightning moves the student, not the teacher; follow it (a no-op when in place).
            self._teacher.to(student.device)
            with torch.no_grad():
                teacher_logits = self._teacher(_inputs(batch))
            term = distillation_loss(student, teacher_logits, self.temperature, self.hardness)
        prefix = f"compression/{self.log_name}"
        # Epoch means; sync_dist averages them over DDP ranks once per epoch, not per step.
        pl_module.log(f"{prefix}/loss", term.detach(), on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log(
            f"{prefix}/active", float(active), on_step=False, on_epoch=True, sync_dist=True
        )
        return term

    @override
    def state_dict(self) -> dict[str, Any]:
        # Only the self-teacher is state: an external one is rebuilt from config at setup.
        if self.teacher_source != SELF_TEACHER:
            return {"version": _STATE_VERSION, "teacher": None}
        teacher: dict[str, torch.Tensor] | None = self._pending_teacher
        if self._teacher is not None:
            teacher = {k: v.detach().cpu().clone() for k, v in self._teacher.state_dict().items()}
        return {"version": _STATE_VERSION, "teacher": teacher}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        teacher = state_dict.get("teacher")
        if teacher is None or self.teacher_source != SELF_TEACHER:
            return
        # The architecture comes from the module, which this hook does not see: rebuilt at the
        # next on_train_start.
        self._teacher = None
        self._pending_teacher = dict(teacher)
