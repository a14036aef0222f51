"""The technique interface every compression callback declares, and the clock they share.

A technique is a :class:`CompressionCallback`. Code outside a technique's own module (recipe
checks, reports, plots, the dense snapshot, one-shot, export) reads only what this base declares,
never the concrete class:

- **the epoch window**: ``start_epoch``, ``end_epoch`` (None: to the end of training),
  :meth:`~CompressionCallback.active_at`, and :attr:`~CompressionCallback.in_force_until` (how long
  its effect holds, e.g. masks kept after the schedule ends);
- **what it changes**: :attr:`~CompressionCallback.changes`, a subset of :data:`MASKS`,
  :data:`QUANTIZATION`, :data:`STRUCTURE`, :data:`LOSS`; and until when it changes the weights
  (:attr:`~CompressionCallback.changes_weights_until`) or needs them settled
  (:attr:`~CompressionCallback.needs_settled_weights_from`);
- **the targets**: :meth:`~CompressionCallback.resolve_targets` on a model (before training) and
  :attr:`~CompressionCallback.target_names` (once set up), :attr:`~CompressionCallback.masks`;
- **the fits-in-training check**: :meth:`~CompressionCallback.schedule_limits`, checked once by
  :meth:`~CompressionCallback.check_schedule` (by the recipe before anything is built, and in
  ``setup`` for plain-Python users);
- **its model check**: :meth:`~CompressionCallback.check_model`, before any training;
- **a loss term**: :meth:`~CompressionCallback.loss_term` for techniques that change the loss
  (called by :class:`~lightning_sparse.module.CompressionModule`);
- **a target curve** for plots: :meth:`~CompressionCallback.target_curve`.

The clock is Lightning's own: a fractional epoch is optimizer steps taken divided by optimizer steps
per epoch, both read from the trainer, so gradient accumulation, ``limit_train_batches`` and
``max_steps`` are accounted for without a user-supplied ``steps_per_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch import nn
from typing_extensions import override

from lightning_sparse.core.changes import CHANGES, LOSS, MASKS, QUANTIZATION, STRUCTURE
from lightning_sparse.core.schedule import INTERPOLATIONS, SparsitySchedule
from lightning_sparse.module import CompressionModule

__all__ = [
    "CHANGES",
    "LOSS",
    "MASKS",
    "QUANTIZATION",
    "STRUCTURE",
    "CompressionCallback",
    "ScheduleLimit",
    "ScheduledCompression",
    "StateVersionError",
    "broadcast_masks",
    "check_state_version",
    "check_strategy",
    "check_timing",
    "compression_callbacks",
    "fractional_epoch",
    "invalid_number",
    "is_number",
    "smoke_run",
    "step_own_parameters",
    "steps_per_epoch",
    "to_plain",
]


class StateVersionError(ValueError):
    """A checkpoint holds a technique state written by a newer version of the technique."""


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one training epoch, as the trainer will take them.

    Lightning steps at the end of every ``accumulate_grad_batches`` window and once more at the end
    of an epoch whose batch count the window does not divide, hence the ceiling.

    Raises:
        ValueError: the train dataloader has no length, so an epoch has no fixed number of steps.
    """
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "Compression schedules are in epochs and need a train dataloader with a length; "
            "this one has none (an IterableDataset?). Give the dataset a `__len__`."
        )
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))


def fractional_epoch(trainer: pl.Trainer) -> float:
    """Optimizer steps taken so far, in epochs."""
    return trainer.global_step / steps_per_epoch(trainer)


def check_strategy(trainer: pl.Trainer, technique: str) -> None:
    """Refuse strategies that shard parameters: masks need every weight whole on every rank."""
    strategy = trainer.strategy
    supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(
        strategy, DeepSpeedStrategy
    )
    if not supported:
        raise ValueError(
            f"{technique} does not support strategy {type(strategy).__name__}: it needs every "
            "parameter whole on each process. Supported: single device, 'ddp', 'ddp_spawn' "
            "(DDPStrategy)."
        )


def _is_plain(value: Any) -> bool:
    """Config-like data: None, a bool, number or string, or lists and dicts of those."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def is_number(value: Any) -> bool:
    """A real number from a config: int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def invalid_number(field: str, value: Any, allowed: str) -> ValueError:
    """The error for a numeric argument: "not a number" when it is none (``=abc`` on a command
    line), else "not allowed"; ``allowed`` says what is (``it must be in [0, 1)``)."""
    if value is not None and not is_number(value):
        return ValueError(f"`{field}`={value!r} is not a number; {allowed}.")
    return ValueError(f"`{field}`={value!r} is not allowed; {allowed}.")


def check_state_version(state: Mapping[str, Any], supported: int, owner: str) -> None:
    """Refuse a checkpoint state written by a newer version of a technique than this one.

    Raises:
        StateVersionError: ``state['version']`` is greater than ``supported``; names ``owner``.
    """
    version = state.get("version", 1)
    if not isinstance(version, int) or version > supported:
        raise StateVersionError(
            f"{owner}: the checkpoint's state has version {version!r}, newer than this "
            f"lightning_sparse reads (up to {supported}); upgrade lightning_sparse to resume it."
        )


class ScheduleLimit(NamedTuple):
    """An epoch of a technique's schedule that must fall within training.

    Attributes:
        field: the argument that sets it (``end_epoch``), named in the error.
        epoch: its value.
        strict: it must come before ``max_epochs`` (something starts there); else at or before
            it (something ends there).
        what: what would not happen, for the message (``distillation would never start``).
    """

    field: str
    epoch: float
    strict: bool
    what: str


def smoke_run(trainer: pl.Trainer) -> bool:
    # `fast_dev_run` is set on the trainer at runtime but missing from its type annotations.
    return bool(vars(trainer).get("fast_dev_run"))


class CompressionCallback(Callback):
    """The base of every technique: its epoch window, targets, what it changes, its checks.

    Subclasses declare :attr:`changes` and set ``start_epoch``/``end_epoch`` (through
    :meth:`_set_window`, which validates them); they override what applies to them. Everything
    here is read by the recipe checks, the report, the plots and the dense snapshot, so a new
    technique takes part in all of them by declaring, not by being named anywhere else.

    When it acts: ``setup(stage="fit")`` refuses sharding strategies and checks the schedule
    against the trainer (once); the rest is the technique's own.

    Args:
        name: tells two instances of one technique apart in checkpoints and logs; defaults to the
            class name.

    Raises:
        ValueError: ``name`` is not a non-empty string.
    """

    #: What the technique changes: a subset of :data:`CHANGES`.
    changes: ClassVar[frozenset[str]] = frozenset()
    #: What a LOSS technique's term being lost means, in the error for a module without the
    #: ``CompressionModule`` mixin (which is what adds the term to the loss).
    without_loss_term: ClassVar[str] = "the term would be silently dropped"
    #: The version of :meth:`state_dict`'s layout; a newer one in a checkpoint is refused.
    state_version: ClassVar[int] = 1

    def __init__(self, name: str | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"`name`={name!r} must be a non-empty string or None.")
        unknown = set(self.changes) - CHANGES
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.changes declares {sorted(unknown)}; allowed: "
                f"{sorted(CHANGES)}."
            )
        self.name = name
        self.start_epoch = 0.0
        self.end_epoch: float | None = None
        self._checked_schedule: tuple[int | None, int | None] | None = None

    # ----------------------------------------------------------------------------------------
    # Identity

    @property
    @override
    def state_key(self) -> str:
        # A readable, stable key (not a hash of the settings), so a recipe may change a value and
        # still resume, and two named instances coexist in one checkpoint.
        return f"{type(self).__qualname__}[{self.name}]" if self.name else type(self).__qualname__

    @property
    def log_name(self) -> str:
        """Prefix under ``compression/`` for this instance's logged metrics."""
        return self.name or type(self).__name__

    def __repr__(self) -> str:
        # The settings a user gave, as they would write them: plain values only (a schedule or
        # spec object built from them would repeat them), and the name only when there is one.
        shown = {
            key: value
            for key, value in self.settings().items()
            if _is_plain(value) and not (key == "name" and value is None)
        }
        settings = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({settings})"

    def settings(self) -> dict[str, Any]:
        """The public configuration (constructor arguments as stored), for reprs and reports."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    # ----------------------------------------------------------------------------------------
    # The epoch window

    def _set_window(
        self, start_epoch: Any, end_epoch: Any, *, end_after_start: bool = False
    ) -> None:
        """Validate and keep the window; ``end_epoch`` None means to the end of training.

        Raises:
            ValueError: an epoch is not a number >= 0, or ``end_epoch`` is before ``start_epoch``
                (or not after it, with ``end_after_start``).
        """
        if not is_number(start_epoch) or start_epoch < 0:
            raise invalid_number("start_epoch", start_epoch, "it must be a number >= 0")
        if end_epoch is not None:
            if end_after_start and (not is_number(end_epoch) or end_epoch <= start_epoch):
                raise invalid_number(
                    "end_epoch",
                    end_epoch,
                    f"it must be null or a number > `start_epoch`={start_epoch:g}",
                )
            if not is_number(end_epoch) or end_epoch < 0:
                raise invalid_number("end_epoch", end_epoch, "it must be a number >= 0")
            if end_epoch < start_epoch:
                raise ValueError(
                    f"`end_epoch`={end_epoch} is before `start_epoch`={start_epoch}; "
                    "end_epoch must be >= start_epoch."
                )
        self.start_epoch = float(start_epoch)
        self.end_epoch = None if end_epoch is None else float(end_epoch)

    def active_at(self, epoch: float) -> bool:
        """Whether the technique acts at fractional ``epoch``: in ``[start_epoch, end_epoch)``."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    @property
    def in_force_until(self) -> float:
        """The epoch until which its effect holds (``inf``: to the end of training)."""
        return math.inf if self.end_epoch is None else self.end_epoch

    @property
    def changes_weights_until(self) -> tuple[str, float] | None:
        """(field, epoch) until which it changes the weights' values or layout; None: never."""
        return None

    @property
    def needs_settled_weights_from(self) -> tuple[str, float] | None:
        """(field, epoch) from which it assumes the weights no longer change; None: never."""
        return None

    def schedule_limits(self) -> list[ScheduleLimit]:
        """The epochs that must fall within training (checked by :meth:`check_schedule`)."""
        if self.end_epoch is not None:
            return [
                ScheduleLimit("end_epoch", self.end_epoch, False, "the schedule must end within")
            ]
        return [ScheduleLimit("start_epoch", self.start_epoch, True, "it would never start")]

    def check_schedule(
        self,
        max_epochs: int | None,
        max_steps: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        """Refuse a schedule that training would not reach; once per set of limits.

        Args:
            max_epochs: the trainer's ``max_epochs`` (None or negative: unbounded).
            max_steps: the trainer's ``max_steps`` (None or negative: unbounded).
            steps_per_epoch: optimizer steps per epoch, needed with ``max_steps``.

        Raises:
            ValueError: a limit lies past ``max_epochs`` (or ``max_steps``); names the field.
        """
        key = (max_epochs, max_steps if steps_per_epoch else None)
        if self._checked_schedule == key:
            return
        for limit in self.schedule_limits():
            if max_epochs is not None and max_epochs >= 0:
                late = limit.epoch >= max_epochs if limit.strict else limit.epoch > max_epochs
                if late and limit.strict:
                    raise ValueError(
                        f"`{limit.field}`={limit.epoch:g} is not before the trainer's max_epochs="
                        f"{max_epochs}: {limit.what}."
                    )
                if late:
                    raise ValueError(
                        f"`{limit.field}`={limit.epoch:g} is past the trainer's max_epochs="
                        f"{max_epochs}; {limit.what} training ({limit.field} <= {max_epochs})."
                    )
            if max_steps is not None and max_steps >= 0 and steps_per_epoch:
                steps = limit.epoch * steps_per_epoch
                if steps > max_steps + 1e-9:
                    raise ValueError(
                        f"`{limit.field}`={limit.epoch:g} is {steps:.0f} optimizer steps, past the "
                        f"trainer's max_steps={max_steps} ({steps_per_epoch} steps per epoch)."
                    )
        self._checked_schedule = key

    # ----------------------------------------------------------------------------------------
    # Targets and the model

    def resolve_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters of ``model`` it acts on, by name (empty for loss-only techniques).

        Raises:
            ValueError: its selection matches nothing in ``model``; names the field.
        """
        return {}

    @property
    def target_names(self) -> list[str]:
        """Names of the parameters it acts on, once set up for fit (empty before)."""
        return []

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks in force by parameter name (``True`` = kept); empty if it holds none."""
        return {}

    def check_model(self, model: nn.Module) -> None:
        """Check the technique against the model it will act on, before training.

        Raises:
            ValueError: something it names does not exist or does not fit; names the field.
        """
        self.resolve_targets(model)

    def target_curve(self, epochs: list[float]) -> dict[str, list[float]] | None:
        """Its scheduled target at ``epochs`` by label (e.g. ``{"target sparsity": [...]}``)."""
        return None

    def deployment(self) -> tuple[str, dict[str, Any]] | None:
        """A deployment form it asks the export for beyond the plain model, or None.

        ``(kind, data)``: a kind registered in the deploy layer
        (:func:`lightning_sparse.deploy.export.register_deployment`) and what it needs (modules and
        plain values), e.g. early exit's stages: ``("early_exit", {"exits", "heads",
        "thresholds"})``. The training job's export writes it to ``export/<kind>/`` and reports
        what it measured under ``<kind>`` in the summary.
        """
        return None

    # ----------------------------------------------------------------------------------------
    # Loss terms

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        """The term it adds to the training loss now (techniques that declare :data:`LOSS`)."""
        raise NotImplementedError(f"{type(self).__name__} declares no loss term.")

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, type(self).__name__)
            if LOSS in self.changes and not isinstance(pl_module, CompressionModule):
                raise TypeError(
                    f"{type(self).__name__} adds a loss term, but {type(pl_module).__name__} does "
                    "not mix in lightning_sparse.module.CompressionModule, so "
                    f"{self.without_loss_term}. Declare `class M(CompressionModule, "
                    "LightningModule)` and return `loss + self.compression_loss(batch, outputs)` "
                    "from training_step."
                )
            # fast_dev_run is a smoke test of a few batches: the schedule cannot fit and need not.
            if not smoke_run(trainer):
                self.check_schedule(trainer.max_epochs)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps >= 0 and not smoke_run(trainer):
            self.check_schedule(
                None if smoke_run(trainer) else trainer.max_epochs,
                trainer.max_steps,
                steps_per_epoch(trainer),
            )

    def _check_loaded_version(self, state_dict: Mapping[str, Any]) -> None:
        check_state_version(state_dict, self.state_version, self.state_key)


def check_timing(techniques: Mapping[str, CompressionCallback]) -> None:
    """Refuse a technique that needs settled weights while another still changes them.

    E.g. quantization scales frozen (``disable_quantization_observer_epoch``) while pruning still
    changes the weights (up to its ``end_epoch``): the frozen scales would not fit the final
    weights. Recipe validation calls this with ``{"recipe.<entry>": technique}``; techniques call
    it in ``setup`` with the trainer's callbacks, so plain-Python users get the same error.

    Raises:
        ValueError: names both techniques, both fields and the fix.
    """
    for settled_label, settled in techniques.items():
        needs = settled.needs_settled_weights_from
        if needs is None:
            continue
        needs_field, needs_epoch = needs
        for changing_label, changing in techniques.items():
            changes = changing.changes_weights_until
            if changing is settled or changes is None:
                continue
            change_field, change_epoch = changes
            if settled.start_epoch < change_epoch and needs_epoch < change_epoch:
                raise ValueError(
                    f"{settled_label}.{needs_field}={needs_epoch:g} comes before "
                    f"{changing_label}.{change_field}={change_epoch:g}, while {changing_label} "
                    f"still changes the weights ({settled_label} starts at "
                    f"{settled_label}.start_epoch={settled.start_epoch:g}); what it fixes then "
                    f"would not fit the final weights. Set {settled_label}.{needs_field} >= "
                    f"{change_epoch:g}, or start {settled_label} when {changing_label} ends "
                    f"({settled_label}.start_epoch >= {change_epoch:g})."
                )


class ScheduledCompression(CompressionCallback):
    """A technique that acts at the updates of a schedule rising to ``final_sparsity``.

    Gradual pruning and channel removal share this: the schedule's validation (the messages name
    each field), the window, the update guard (:meth:`should_update`, by update index, so neither
    a resume nor a repeated check within one accumulation window applies an update twice), and
    what the interface says about it (the weights change until ``end_epoch``, which must fall
    within training).
    """

    def _set_schedule(
        self,
        init_sparsity: Any,
        final_sparsity: Any,
        start_epoch: Any,
        end_epoch: Any,
        update_frequency: Any,
        inter_func: Any,
        grows: str = "sparsity only grows",
    ) -> None:
        """Validate and keep the schedule; ``grows`` explains why init <= final in the message.

        Raises:
            ValueError: a value is out of range, not a number, or unknown; names the field.
        """
        for field, value in (("final_sparsity", final_sparsity), ("init_sparsity", init_sparsity)):
            if not is_number(value) or not 0 <= value < 1:
                raise invalid_number(field, value, "it must be in [0, 1)")
        if init_sparsity > final_sparsity:
            raise ValueError(
                f"`init_sparsity`={init_sparsity} is greater than `final_sparsity`="
                f"{final_sparsity}; {grows}, so init_sparsity <= final_sparsity."
            )
        if end_epoch is None:
            raise ValueError("`end_epoch`=None is not allowed; it must be a number >= 0.")
        self._set_window(start_epoch, end_epoch)
        if not is_number(update_frequency) or update_frequency <= 0:
            raise invalid_number("update_frequency", update_frequency, "it must be > 0 epochs")
        if inter_func not in INTERPOLATIONS:
            raise ValueError(
                f"`inter_func`={inter_func!r} is not allowed; choose one of "
                f"{sorted(INTERPOLATIONS)}."
            )
        self.final_sparsity = float(final_sparsity)
        self.init_sparsity = float(init_sparsity)
        self.update_frequency = float(update_frequency)
        self.inter_func = str(inter_func)
        self.schedule = SparsitySchedule(
            init_sparsity=self.init_sparsity,
            final_sparsity=self.final_sparsity,
            start_epoch=self.start_epoch,
            end_epoch=self.end_epoch_,
            update_frequency=self.update_frequency,
            inter_func=self.inter_func,
        )
        self._applied_index = -1

    @property
    def end_epoch_(self) -> float:
        """``end_epoch`` as a number (always set for a schedule)."""
        assert self.end_epoch is not None
        return self.end_epoch

    @property
    def applied_index(self) -> int:
        """Index of the last schedule update applied (-1 before the first)."""
        return self._applied_index

    @property
    @override
    def changes_weights_until(self) -> tuple[str, float] | None:
        return ("end_epoch", self.end_epoch_)

    @override
    def schedule_limits(self) -> list[ScheduleLimit]:
        return [ScheduleLimit("end_epoch", self.end_epoch_, False, "the schedule must end within")]

    def should_update(self, trainer: pl.Trainer) -> int | None:
        """The index of the schedule's update due now, or None (none due, or applied already).

        Overridable, e.g. to skip updates.
        """
        due = self.schedule.due_index(fractional_epoch(trainer))
        return None if due <= self._applied_index else due


def compression_callbacks(callbacks: Any) -> list[CompressionCallback]:
    """The techniques among ``callbacks`` (a list, or a mapping's values), in order."""
    values = callbacks.values() if isinstance(callbacks, Mapping) else callbacks
    return [cb for cb in values if isinstance(cb, CompressionCallback)]


def step_own_parameters(
    trainer: pl.Trainer, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]
) -> None:
    """Step a callback's own optimizer over parameters that live outside the model.

    Such parameters (distillation's projections, early-exit heads) are not in DDP's wrapping, so
    their gradients are averaged over the ranks here (every rank takes the same step; a no-op on
    one process) and unscaled when fp16 AMP scaled the loss. A step with a non-finite gradient is
    skipped, as the model's own is. Gradients are cleared afterwards either way.
    """
    with_grads = [p for p in params if p.grad is not None]
    if with_grads:
        grads = torch.cat([p.grad.reshape(-1) for p in with_grads])  # type: ignore[union-attr]
        grads = trainer.strategy.reduce(grads, reduce_op="mean")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 AMP scaled the loss; the model's grads are unscaled
            grads = grads / scaler.get_scale()
        if torch.isfinite(grads).all():
            offset = 0
            for p in with_grads:
                count = p.numel()
                p.grad.copy_(grads[offset : offset + count].view_as(p))  # type: ignore[union-attr]
                offset += count
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def broadcast_masks(trainer: pl.Trainer, tensors: list[torch.Tensor]) -> None:
    """Overwrite bool ``tensors`` in place with rank 0's (one collective for all of them)."""
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.uint8) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].reshape(tensor.shape).to(tensor.dtype))
        offset += count


def to_plain(value: Any) -> Any:
    """Hydra hands lists as ``ListConfig``; keep callback attributes plain Python."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "__iter__") and not isinstance(value, dict):
        return [to_plain(v) for v in value]
    return value
