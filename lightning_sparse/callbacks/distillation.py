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
on the student's device.

Feature distillation (``features=[...]``, FitNets-style hints, Romero et al. 2015) adds, per named
layer, the student's squared error to the teacher's output relative to the teacher's mean square
(scale-free, so layers of different magnitude weigh alike). Where the widths differ, a learned
projection (a linear map over the one dimension that differs, e.g. conv channels) maps the student's
output to the teacher's width. The projections are also the callback's, not the model's: they are
trained by the callback's own Adam optimizer (stepped when the model's optimizer steps, gradients
averaged over DDP ranks), kept in the callback's checkpoint state, and never exported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import (
    LOSS,
    CompressionCallback,
    ScheduleLimit,
    fractional_epoch,
    invalid_number,
    step_own_parameters,
)
from lightning_sparse.core.batch import model_inputs, token_mask
from lightning_sparse.core.checkpoint import read_state_dict, readable_checkpoint
from lightning_sparse.core.nodes import build_node
from lightning_sparse.core.taps import OutputTap
from lightning_sparse.module import copy_without_trainer, drop_instance_forwards

__all__ = ["SELF_TEACHER", "KnowledgeDistillation", "distillation_loss", "feature_loss"]

SELF_TEACHER = "self"
# Keeps the relative feature error finite when a teacher layer outputs all zeros.
_FEATURE_EPS = 1e-8
# Projections start from this seed on every rank, so DDP ranks hold the same ones without a
# broadcast (their gradients are averaged from then on).
_PROJECTION_SEED = 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    hardness: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hardness * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over predictions.

    Args:
        student_logits: ``[batch, classes]`` logits of the model being trained, or
            ``[batch, seq, classes]`` for one prediction per token.
        teacher_logits: the teacher's logits of the same shape (no gradient needed).
        temperature: ``T``; above 1 softens both distributions so that the teacher's ranking of
            the wrong classes carries signal.
        hardness: weight of the term.
        mask: for per-token logits, which positions are real tokens (``[batch, seq]``); padding
            positions are left out of the mean. Without it every position counts.

    Returns:
        A scalar tensor: the KL divergence averaged over the predictions (samples, or the real
        tokens of every sample).
    """
    if student_logits.dim() > 2:
        # One prediction per token: average over the (real) tokens, not over the batch, so the
        # term does not grow with the sequence length nor count padding.
        classes = student_logits.shape[-1]
        if mask is not None:
            keep = mask.reshape(-1).bool()
            student_logits = student_logits.reshape(-1, classes)[keep]
            teacher_logits = teacher_logits.reshape(-1, classes)[keep]
        else:
            student_logits = student_logits.reshape(-1, classes)
            teacher_logits = teacher_logits.reshape(-1, classes)
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return hardness * temperature**2 * kl


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((student - teacher)^2) / mean(teacher^2)``: the squared error relative to the teacher.

    Dividing by the teacher's mean square makes the term independent of the layer's scale, so
    several layers (and a projection's arbitrary initial scale) weigh alike.

    Args:
        student: the student's (projected) output of a layer.
        teacher: the teacher's output of the matching layer, same shape.

    Returns:
        A scalar tensor.
    """
    teacher = teacher.detach()
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(_FEATURE_EPS)


class _Projection(nn.Module):
    """A learned linear map over one dimension of a feature map (the one whose width differs).

    For ``[batch, channels, H, W]`` conv outputs that is the channel dimension (a 1x1 convolution);
    for ``[batch, tokens, width]`` the last. No bias: the term compares the shapes of activations.
    """

    def __init__(self, in_width: int, out_width: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        bound = 1.0 / math.sqrt(in_width)
        generator = torch.Generator().manual_seed(_PROJECTION_SEED)
        weight = torch.empty(out_width, in_width).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = x.movedim(self.dim, -1)
        return F.linear(moved, self.weight.to(moved.dtype)).movedim(-1, self.dim)


def _projection_dim(student: torch.Size, teacher: torch.Size) -> int | None:
    """The one non-batch dimension in which two feature shapes differ; None when they are equal.

    Raises:
        ValueError: the ranks differ, or more than one dimension differs (a projection maps one
            width, it does not resample space).
    """
    if student == teacher:
        return None
    same_rank = len(student) == len(teacher)
    differing = [d for d in range(1, len(student)) if same_rank and student[d] != teacher[d]]
    if not same_rank or len(differing) != 1 or student[0] != teacher[0]:
        raise ValueError(
            f"shapes {list(student)} (student) and {list(teacher)} (teacher) differ in more than "
            "one dimension; a projection maps one width (e.g. channels), so pick layers whose "
            "outputs differ at most in that."
        )
    return differing[0]


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _find_layer(model: nn.Module, name: str, side: str) -> nn.Module:
    """The submodule ``name`` of the student or teacher; a clear error listing what exists.

    On the teacher, ``model.<layer>`` (the student's ClassificationModule naming) also finds
    ``<layer>`` in a plain backbone given as ``teacher_model``.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    if side == "teacher" and name.startswith("model.") and name[len("model.") :] in modules:
        return modules[name[len("model.") :]]
    names = _module_names(model)
    shown = ", ".join(names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    raise ValueError(f"`features`: the {side} has no layer {name!r}; its layers are: {shown}.")


def _normalise_features(features: Any) -> dict[str, str]:
    """``features`` as ``{student layer: teacher layer}``; a list names the same layer on both."""
    if features is None:
        return {}
    if isinstance(features, Mapping):
        pairs = [(k, v) for k, v in features.items()]
    elif isinstance(features, (list, tuple)):
        pairs = [(name, name) for name in features]
    else:
        raise ValueError(
            f"`features`={features!r} is not allowed; give a list of layer names (the same in "
            "student and teacher) or a mapping {student layer: teacher layer}."
        )
    if not pairs:
        raise ValueError("`features`=[] is not allowed; give layer names, or null for none.")
    chosen: dict[str, str] = {}
    for student, teacher in pairs:
        for value in (student, teacher):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"`features`: {value!r} is not a layer name; names are non-empty strings "
                    "such as 'model.conv2' (see model.named_modules())."
                )
        if student in chosen:
            raise ValueError(f"`features`: the student layer {student!r} is named twice.")
        chosen[student] = teacher
    return chosen


def _tensor_output(key: str, output: Any) -> None:
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"`features`: layer {key!r} returns a {type(output).__name__}, not a tensor; "
            "name a layer whose output is one tensor."
        )


def _freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, and no quantization forwards copied from the student."""
    drop_instance_forwards(model)  # the teacher is the float model
    model.eval()
    model.requires_grad_(False)
    return model


class KnowledgeDistillation(CompressionCallback):
    """Distil a teacher's logits into the model being trained (and compressed).

    The loss term is added to the module's own loss (see the module docstring) while the fractional
    epoch is in ``[start_epoch, end_epoch)``; outside it the term is zero. Each training step logs
    ``compression/<name>/loss`` (the whole term) and ``compression/<name>/active`` (0 or 1), and
    with ``features`` also ``compression/<name>/logit_loss`` and
    ``compression/<name>/feature_loss``, averaged per epoch.

    Feature distillation: ``features`` names layers (``model.named_modules()`` names, e.g.
    ``model.conv2``); each adds ``feature_hardness * mean over layers of feature_loss(...)``
    (:func:`feature_loss`). A list names the same layer in student and teacher, a mapping
    ``{student layer: teacher layer}`` pairs different ones; on a plain backbone given as
    ``teacher_model``, ``model.conv2`` also finds ``conv2``. Where the outputs differ in one
    dimension (a wider teacher), a learned projection maps the student's to the teacher's width
    (see the module docstring); any other shape difference is an error at the first step.

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
        teacher_ckpt: another spelling of ``teacher=<run dir or checkpoint>`` (SparseML's name).
        hardness: weight of the distillation term, > 0.
        temperature: softmax temperature ``T``, > 0.
        start_epoch: fractional epoch from which the term is added (and the self-teacher taken).
        end_epoch: fractional epoch from which the term is no longer added; None: to the end.
        features: layers whose outputs to distil, a list or ``{student: teacher}`` mapping; None
            for logit distillation only.
        feature_hardness: weight of the feature term, > 0.
        projection_lr: learning rate of the Adam optimizer that trains the projections, > 0.
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range or ``teacher``/``teacher_model`` do not make a
            teacher (the message names the argument), at construction; at ``setup``, teacher
            weights that do not fit or a ``features`` layer that does not exist (the layers that
            do are listed).
        FileNotFoundError: ``teacher`` names no checkpoint (at construction, before training).
        TypeError: at ``setup``, a module without the ``CompressionModule`` mixin; a ``features``
            layer whose output is not a tensor, at the first step.

    Example::

        class MyModule(CompressionModule, LightningModule): ...  # adds self.compression_loss(...)

        Trainer(
            max_epochs=30,
            callbacks=[
                MagnitudePruning(final_sparsity=0.9, start_epoch=5, end_epoch=15),
                KnowledgeDistillation(teacher="self", start_epoch=5, hardness=1.0),
            ],
        ).fit(MyModule(), datamodule=...)
        # A wider teacher from another run, its conv2 taught to the student's through a projection:
        KnowledgeDistillation(
            teacher="runs/train/2026-11-26/10-00-00",
            teacher_model={"_target_": "lightning_sparse.models.SmallCNN", "width": 64},
            features=["model.conv2"],
        )
    """

    changes = frozenset({LOSS})

    def __init__(
        self,
        teacher: str | Path | None = SELF_TEACHER,
        teacher_model: Mapping[str, Any] | nn.Module | None = None,
        teacher_ckpt: str | Path | None = None,
        hardness: float = 0.5,
        temperature: float = 2.0,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        features: Sequence[str] | Mapping[str, str] | None = None,
        feature_hardness: float = 1.0,
        projection_lr: float = 1e-3,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if teacher_ckpt is not None:
            # SparseML-style spelling of `teacher=<checkpoint>`.
            if teacher not in (SELF_TEACHER, None) and str(teacher) != str(teacher_ckpt):
                raise ValueError(
                    f"`teacher`={teacher!r} and `teacher_ckpt`={str(teacher_ckpt)!r} name two "
                    "teachers; give the checkpoint in one of them."
                )
            teacher = teacher_ckpt
        # The argument the user gave the checkpoint in, for error messages.
        self._teacher_field = "teacher" if teacher_ckpt is None else "teacher_ckpt"
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
            readable_checkpoint(teacher, field=self._teacher_field)
        chosen_features = _normalise_features(features)
        if not _is_number(hardness) or hardness < 0 or (hardness == 0 and not chosen_features):
            raise invalid_number(
                "hardness",
                hardness,
                "it must be a number > 0 (or 0 with `features`, to distil the named layers only)",
            )
        for field, value in (
            ("feature_hardness", feature_hardness),
            ("projection_lr", projection_lr),
        ):
            if not _is_number(value) or value <= 0:
                raise invalid_number(field, value, "it must be a number > 0")
        if not _is_number(temperature) or temperature <= 0:
            raise invalid_number("temperature", temperature, "it must be a number > 0")
        self._set_window(start_epoch, end_epoch, end_after_start=True)
        self.teacher_source = None if teacher is None else str(teacher)
        self.teacher_model = teacher_model
        self.hardness = float(hardness)
        self.temperature = float(temperature)
        self.features = chosen_features
        self.feature_hardness = float(feature_hardness)
        self.projection_lr = float(projection_lr)
        self._teacher: nn.Module | None = None
        # Teacher weights restored from a checkpoint before the module they fit is at hand.
        self._pending_teacher: dict[str, torch.Tensor] | None = None
        self._student_tap = OutputTap(check=_tensor_output)
        self._teacher_tap = OutputTap(check=_tensor_output)
        # Per student layer: its projection, or None where the widths agree; built at the first
        # step with features (their shapes are known only then).
        self._projections: dict[str, _Projection | None] | None = None
        self._projection_optimizer: torch.optim.Optimizer | None = None
        self._pending_projections: dict[str, Any] | None = None

    @property
    def projections(self) -> dict[str, nn.Module]:
        """The learned projections by student layer (only layers whose widths differ)."""
        return {k: v for k, v in (self._projections or {}).items() if v is not None}

    @override
    def schedule_limits(self) -> list[ScheduleLimit]:
        return [
            ScheduleLimit("start_epoch", self.start_epoch, True, "distillation would never start")
        ]

    @override
    def check_model(self, pl_module: nn.Module) -> None:
        """Check that the ``features`` layers exist, before any training.

        The self-teacher is a copy of the student, so its layers are checked here too; another
        teacher's are checked when it is built at ``setup``.

        Raises:
            ValueError: a layer is missing; the message lists the layers there are.
        """
        for student, teacher in self.features.items():
            _find_layer(pl_module, student, "student")
            if self.teacher_source == SELF_TEACHER:
                _find_layer(pl_module, teacher, "teacher")

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher, once there is one (the self-teacher only from ``start_epoch``)."""
        return self._teacher

    @property
    def teacher_taken(self) -> bool:
        """Whether the teacher exists (for ``teacher='self'``: whether the copy has been taken)."""
        return self._teacher is not None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.check_model(pl_module)
        if self._teacher is None and self.teacher_source != SELF_TEACHER:
            self._set_teacher(self._external_teacher(pl_module), pl_module)
        self._student_tap.attach(
            {name: _find_layer(pl_module, name, "student") for name in self.features}
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # No hooks left on the model once training is over (export, inference, a later fit).
        self._student_tap.detach()

    def _set_teacher(self, model: nn.Module, pl_module: pl.LightningModule) -> None:
        """Make ``model`` the frozen teacher on the student's device, its feature layers tapped."""
        self._student_tap.drop_from(model)  # a copy of the student carries the student's hooks
        teacher = _freeze(model).to(pl_module.device)
        self._teacher_tap.attach(
            {
                student: _find_layer(teacher, name, "teacher")
                for student, name in self.features.items()
            }
        )
        self._teacher = teacher

    def _external_teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        """The teacher from ``teacher_model`` and/or the ``teacher`` checkpoint."""
        if isinstance(self.teacher_model, nn.Module):
            model = copy.deepcopy(self.teacher_model)
        elif self.teacher_model is not None:
            built = build_node(self.teacher_model, field="teacher_model")
            if not isinstance(built, nn.Module):
                raise ValueError(
                    f"`teacher_model` built a {type(built).__name__}, not an nn.Module."
                )
            model = built
        else:
            model = copy_without_trainer(pl_module)
        if self.teacher_source is not None:
            state = read_state_dict(self.teacher_source, field=self._teacher_field)
            self._load_teacher_weights(model, state)
        return model

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
        self._set_teacher(copy_without_trainer(pl_module), pl_module)
        rank_zero_info(
            f"{self.log_name}: teacher = frozen copy of the model at epoch "
            f"{fractional_epoch(trainer):.3f}."
        )

    def _restore_self_teacher(self, pl_module: pl.LightningModule) -> None:
        assert self._pending_teacher is not None
        model = copy_without_trainer(pl_module)
        self._student_tap.drop_from(model)
        # Strict: the copy's QAT forwards are dropped by _set_teacher, its state is the float one.
        model.load_state_dict(self._pending_teacher, strict=True)
        self._set_teacher(model, pl_module)
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
        super().on_train_start(trainer, pl_module)
        self._maybe_take_teacher(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_take_teacher(trainer, pl_module)
        # Keep the student's layer outputs of this step's forward, for the feature term.
        self._student_tap.armed = bool(self.features) and self.active_at(fractional_epoch(trainer))

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._student_tap.armed = False
        self._student_tap.take()  # drop references to this step's activations

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Step the projections with the model: the gradients of every micro-batch are in."""
        if self._projection_optimizer is None:
            return
        step_own_parameters(trainer, self._projection_optimizer, self._projection_parameters())

    def _projection_parameters(self) -> list[nn.Parameter]:
        return [p for proj in self.projections.values() for p in proj.parameters()]

    def _build_projections(
        self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]
    ) -> None:
        """A projection per layer whose width differs, and their optimizer (restored on resume)."""
        projections: dict[str, _Projection | None] = {}
        for name, teacher_name in self.features.items():
            try:
                dim = _projection_dim(student[name].shape, teacher[name].shape)
            except ValueError as err:
                raise ValueError(f"`features`: {name!r} -> {teacher_name!r}: {err}") from err
            if dim is None:
                projections[name] = None
                continue
            projection = _Projection(student[name].shape[dim], teacher[name].shape[dim], dim)
            projections[name] = projection.to(student[name].device)
        self._projections = projections
        params = self._projection_parameters()
        self._projection_optimizer = (
            torch.optim.Adam(params, lr=self.projection_lr) if params else None
        )
        pending, self._pending_projections = self._pending_projections, None
        if pending is not None:
            for name, state in pending["layers"].items():
                stored = projections.get(name)
                if stored is None:
                    raise ValueError(
                        f"`features`: the checkpoint holds a projection for {name!r}, but this "
                        "run's layers there have the same width; resume with the same features "
                        "and teacher."
                    )
                stored.load_state_dict(state)
            if self._projection_optimizer is not None and pending.get("optimizer"):
                self._projection_optimizer.load_state_dict(pending["optimizer"])

    def _feature_term(self, student_device: torch.device) -> torch.Tensor:
        student = self._student_tap.take()
        teacher = self._teacher_tap.take()
        missing = [name for name in self.features if name not in student or name not in teacher]
        if missing:
            raise RuntimeError(
                f"`features`: no output was recorded for {missing} in this step; the layers must "
                "run in the module's forward (student) and the teacher's forward on the batch."
            )
        if self._projections is None:
            self._build_projections(student, teacher)
        assert self._projections is not None
        terms = []
        for name in self.features:
            projection = self._projections[name]
            output = student[name] if projection is None else projection(student[name])
            terms.append(feature_loss(output, teacher[name]))
        return self.feature_hardness * torch.stack(terms).mean().to(student_device)

    @override
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
        zero = torch.zeros((), device=student.device)
        logit_term, feature_term = zero, zero
        if active and self._teacher is not None:
            # Lightning moves the student, not the teacher; follow it (a no-op when in place).
            self._teacher.to(student.device)
            self._teacher_tap.armed = bool(self.features)
            try:
                with torch.no_grad():
                    teacher_logits = self._teacher(model_inputs(batch))
            finally:
                self._teacher_tap.armed = False
            if self.hardness > 0:
                logit_term = distillation_loss(
                    student,
                    teacher_logits,
                    self.temperature,
                    self.hardness,
                    mask=token_mask(batch, student),
                )
            if self.features:
                feature_term = self._feature_term(student.device)
        self._student_tap.take()
        term = logit_term + feature_term
        prefix = f"compression/{self.log_name}"
        # Epoch means; sync_dist averages them over DDP ranks once per epoch, not per step.
        log = {"loss": term}
        if self.features:
            log |= {"logit_loss": logit_term, "feature_loss": feature_term}
        for key, value in log.items():
            pl_module.log(
                f"{prefix}/{key}", value.detach(), on_step=False, on_epoch=True, sync_dist=True
            )
        pl_module.log(
            f"{prefix}/active", float(active), on_step=False, on_epoch=True, sync_dist=True
        )
        return term

    @override
    def state_dict(self) -> dict[str, Any]:
        # The self-teacher is state; an external one is rebuilt from config at setup. Projections
        # and their optimizer are state either way.
        state: dict[str, Any] = {
            "version": self.state_version,
            "teacher": None,
            "projections": self._projection_state(),
        }
        if self.teacher_source != SELF_TEACHER:
            return state
        teacher: dict[str, torch.Tensor] | None = self._pending_teacher
        if self._teacher is not None:
            teacher = {k: v.detach().cpu().clone() for k, v in self._teacher.state_dict().items()}
        state["teacher"] = teacher
        return state

    def _projection_state(self) -> dict[str, Any] | None:
        if self._projections is None:
            return self._pending_projections
        optimizer = self._projection_optimizer
        return {
            "layers": {
                name: {k: v.detach().cpu().clone() for k, v in proj.state_dict().items()}
                for name, proj in self.projections.items()
            },
            "optimizer": None if optimizer is None else optimizer.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_version(state_dict)
        projections = state_dict.get("projections")
        if projections is not None:
            # Built at the next step with features, when the layers' shapes are known.
            self._projections, self._projection_optimizer = None, None
            self._pending_projections = projections
        teacher = state_dict.get("teacher")
        if teacher is None or self.teacher_source != SELF_TEACHER:
            return
        # The architecture comes from the module, which this hook does not see: rebuilt at the
        # next on_train_start.
        self._teacher = None
        self._pending_teacher = dict(teacher)
