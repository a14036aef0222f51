"""Quantization-aware training (QAT) as a callback, and post-training quantization (PTQ).

Both quantize the weights of Conv/Linear layers (and Hugging Face's Conv1D, and any quantizable
kind registered in :mod:`lightning_sparse.core.layers`) to int8 (or 4-bit) and their inputs to
uint8, as ONNX Runtime's integer kernels compute. The layers are prepared once, in ``setup``: each
gets a forward that fake-quantizes its weight and input when switched on (the ops are in
``lightning_sparse.quant_backend``). Parameters keep their names and types, so pruning masks keep
holding on them by name and a checkpoint loads into the plain model with ``strict=True``; scales
and observer ranges live in the callback's state, not in the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_sparse.callbacks.base import (
    QUANTIZATION,
    CompressionCallback,
    ScheduleLimit,
    check_timing,
    fractional_epoch,
    invalid_number,
    to_plain,
)
from lightning_sparse.core.fake_quant import (
    SUPPORTED_BITS,
    QuantizationError,
    QuantizedModel,
    QuantSpec,
    install,
    is_quantizable,
)
from lightning_sparse.core.layers import layer_weights
from lightning_sparse.core.structure import change_count

__all__ = [
    "QuantizationAwareTraining",
    "select_layers",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_spec(num_bits: Any, symmetric: Any, per_channel: Any) -> QuantSpec:
    if (
        not isinstance(num_bits, int)
        or isinstance(num_bits, bool)
        or num_bits not in SUPPORTED_BITS
    ):
        raise ValueError(
            f"`num_bits`={num_bits!r} is not allowed; weights can be quantized to "
            f"{' or '.join(map(str, sorted(SUPPORTED_BITS, reverse=True)))} bits "
            "(inputs are always 8-bit)."
        )
    for field, value in (("symmetric", symmetric), ("per_channel", per_channel)):
        if not isinstance(value, bool):
            raise ValueError(f"`{field}`={value!r} is not allowed; it must be true or false.")
    return QuantSpec(num_bits=num_bits, symmetric=symmetric, per_channel=per_channel)


def _check_ignore(ignore: Any) -> list[str]:
    ignore = to_plain(ignore)
    if ignore is None:
        return []
    if isinstance(ignore, str):
        ignore = [ignore]
    if not isinstance(ignore, list) or not all(
        isinstance(entry, str) and entry for entry in ignore
    ):
        raise ValueError(
            f"`ignore`={ignore!r} is not allowed; give a list of layer names (`model.fc2`), "
            "`re:` patterns or layer type names (`Linear`)."
        )
    return list(ignore)


def _matches(entry: str, name: str, module: nn.Module) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    kind = type(module)
    return (
        entry in (kind.__name__, f"{kind.__module__}.{kind.__qualname__}")
        or name == entry
        or name.startswith(entry + ".")
    )


def select_layers(
    model: nn.Module, ignore: Sequence[str] = (), exclude_first_last: bool = False
) -> list[str]:
    """Names of the Conv/Linear layers of ``model`` to quantize.

    Args:
        model: usually the LightningModule, so names read ``model.fc1``.
        ignore: layers left in float: a layer name (also covers the layers inside it), an ``re:``
            pattern matched from the start of the name, or a type name (``Linear``,
            ``torch.nn.modules.conv.Conv2d``).
        exclude_first_last: also leave the first and last quantizable layers in float, in the
            order ``model.named_modules()`` lists them (registration order).

    Raises:
        ValueError: the model has no quantizable layer; an ``ignore`` entry matches none (or is
            not a valid regex); nothing is left to quantize.
    """
    modules = {n: m for n, m in model.named_modules() if is_quantizable(m)}
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no layer that quantization supports (Conv1d, Conv2d, "
            "Conv3d, Linear, Conv1D, or a type registered with `register_layer_kind`): there is "
            "nothing to quantize."
        )
    ignored: set[str] = set()
    for entry in ignore:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as err:
                raise ValueError(f"`ignore` entry {entry!r} is not a valid regex: {err}.") from err
        matched = {name for name, module in modules.items() if _matches(entry, name, module)}
        if not matched:
            kinds = sorted({type(m).__name__ for m in modules.values()})
            raise ValueError(
                f"`ignore` entry {entry!r} matches no quantizable layer by name or type. "
                f"Layers: {', '.join(modules)}; types: {', '.join(kinds)}."
            )
        ignored |= matched
    order = list(modules)
    edges = {order[0], order[-1]} if exclude_first_last else set()
    chosen = [name for name in order if name not in ignored and name not in edges]
    if not chosen:
        raise ValueError(
            f"`ignore`={list(ignore)!r} and `exclude_first_last`={exclude_first_last} leave no "
            f"layer to quantize (quantizable layers: {', '.join(order)})."
        )
    return chosen


class QuantizationAwareTraining(CompressionCallback):
    """Quantization-aware training: train through int8 rounding so the int8 model keeps accuracy.

    When it acts: in ``setup(stage="fit")`` (before a checkpoint is restored, DDP wraps the model or
    optimizers exist) the Conv/Linear layers get a forward that can fake-quantize; nothing changes
    yet. At the start of every training batch the phase follows the fractional-epoch clock:

    - before ``start_epoch``: plain float training;
    - from ``start_epoch``: weights (per output channel, symmetric int8 by default, so a pruned
      zero stays exactly zero) and layer inputs (per tensor, uint8 affine) are fake-quantized, and
      observers track the ranges: weight scales follow the weights, input ranges a moving average;
    - from ``disable_quantization_observer_epoch``: scales are frozen;
    - from ``freeze_bn_stats_epoch``: BatchNorm layers use their running statistics.

    Validation and test see the phase of the last training batch. Observer ranges are averaged over
    DDP processes after every step, so every rank holds the same scales. The phase flags are logged
    per epoch (``compression/<name>/fake_quant_enabled``, ``.../observer_enabled``,
    ``.../bn_stats_frozen``). Export (``lightning_sparse.export``) turns the result into an int8
    ONNX model and a compact checkpoint.

    Args:
        start_epoch: fractional epoch from which training is quantization-aware.
        freeze_bn_stats_epoch: epoch from which BatchNorm statistics stop updating (None: never).
        disable_quantization_observer_epoch: epoch from which scales stop updating; must be after
            ``start_epoch`` (None: never).
        num_bits: bits per weight, 8 or 4. Inputs are always 8-bit.
        symmetric: symmetric weights (zero point 0); else affine.
        per_channel: one weight scale per output channel; else one per layer.
        ignore: layers left in float: names (``model.fc2``, covering sublayers), ``re:`` patterns
            or type names (``Linear``). Each entry must match a quantizable layer.
        exclude_first_last: also leave the first and last Conv/Linear layers in float.
        name: distinguishes two instances in checkpoints and logs.

    Raises:
        ValueError: an argument is out of range (the message names it), at construction; at
            ``setup``: no quantizable layer, an ``ignore`` entry matching none, ``start_epoch`` not
            before ``max_epochs``, or observers freezing while a ``MagnitudePruning`` still prunes.

    Example::

        trainer = Trainer(
            max_epochs=20,
            callbacks=[
                MagnitudePruning(final_sparsity=0.9, start_epoch=1, end_epoch=10),
                QuantizationAwareTraining(start_epoch=10, disable_quantization_observer_epoch=18),
            ],
        )
    """

    def __init__(
        self,
        start_epoch: float = 0.0,
        freeze_bn_stats_epoch: float | None = None,
        disable_quantization_observer_epoch: float | None = None,
        num_bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        ignore: Sequence[str] = (),
        exclude_first_last: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self._set_window(start_epoch, None)
        for field, value in (
            ("freeze_bn_stats_epoch", freeze_bn_stats_epoch),
            ("disable_quantization_observer_epoch", disable_quantization_observer_epoch),
        ):
            if value is not None and (not _is_number(value) or value < start_epoch):
                raise invalid_number(
                    field, value, f"it must be null or a number >= `start_epoch`={start_epoch:g}"
                )
        if (
            disable_quantization_observer_epoch is not None
            and disable_quantization_observer_epoch <= start_epoch
        ):
            raise ValueError(
                f"`disable_quantization_observer_epoch`={disable_quantization_observer_epoch:g} "
                f"is not after `start_epoch`={start_epoch:g}: the observers would never see a "
                "batch, so there would be no scales. Make it > start_epoch or null."
            )
        self.spec = _check_spec(num_bits, symmetric, per_channel)
        if not isinstance(exclude_first_last, bool):
            raise ValueError(
                f"`exclude_first_last`={exclude_first_last!r} is not allowed; it must be true or "
                "false."
            )
        self.freeze_bn_stats_epoch = (
            None if freeze_bn_stats_epoch is None else float(freeze_bn_stats_epoch)
        )
        self.disable_quantization_observer_epoch = (
            None
            if disable_quantization_observer_epoch is None
            else float(disable_quantization_observer_epoch)
        )
        self.num_bits = int(num_bits)
        self.symmetric = bool(symmetric)
        self.per_channel = bool(per_channel)
        self.ignore = _check_ignore(ignore)
        self.exclude_first_last = bool(exclude_first_last)
        self._quantized: QuantizedModel | None = None
        self._structure_seen = 0
        self._pending_state: dict[str, Any] | None = None
        self._bn_frozen = False
        self._announced: tuple[bool, bool, bool] | None = None

    changes = frozenset({QUANTIZATION})

    @property
    @override
    def needs_settled_weights_from(self) -> tuple[str, float] | None:
        # Frozen scales fit the weights at the freeze; later weight changes would make them stale.
        freeze = self.disable_quantization_observer_epoch
        return None if freeze is None else ("disable_quantization_observer_epoch", freeze)

    @override
    def schedule_limits(self) -> list[ScheduleLimit]:
        return [
            ScheduleLimit(
                "start_epoch",
                self.start_epoch,
                True,
                "quantization-aware training would never start",
            )
        ]

    @override
    def resolve_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        names = set(select_layers(model, self.ignore, self.exclude_first_last))
        # Weight names from the layer kinds (a registered kind may call its weight e.g. `kernel`).
        return {
            weight_name: cast(nn.Parameter, getattr(layer, kind.weight))
            for weight_name, layer, kind in layer_weights(model)
            if weight_name.rpartition(".")[0] in names
        }

    @property
    @override
    def target_names(self) -> list[str]:
        # The weight's own name from its layer kind (a registered kind may call it e.g. `kernel`).
        if self._quantized is None:
            return []
        return [
            f"{name}.{quantizer.kind.weight}" if name else quantizer.kind.weight
            for name, quantizer in self._quantized.layers.items()
        ]

    @property
    def quantized(self) -> QuantizedModel | None:
        """The handle on the quantized layers, once ``setup`` has prepared them."""
        return self._quantized

    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``pl_module.named_modules()``) of the layers being quantized."""
        return list(self._quantized.layers) if self._quantized else []

    @property
    def fake_quant_enabled(self) -> bool:
        """Whether forward passes are quantized now."""
        return bool(self._quantized and self._quantized.fake_quant_enabled)

    @property
    def observer_enabled(self) -> bool:
        """Whether training batches update the scales now."""
        return bool(self._quantized and self._quantized.observer_enabled)

    @property
    def bn_stats_frozen(self) -> bool:
        """Whether BatchNorm layers are held in eval mode during training now."""
        return self._bn_frozen

    def phase_at(self, epoch: float) -> tuple[bool, bool, bool]:
        """(fake quant, observers, BN frozen) at fractional ``epoch``; a pure function of it."""
        fake_quant = epoch >= self.start_epoch
        freeze = self.disable_quantization_observer_epoch
        observe = fake_quant and (freeze is None or epoch < freeze)
        bn_frozen = self.freeze_bn_stats_epoch is not None and epoch >= self.freeze_bn_stats_epoch
        return fake_quant, observe, bn_frozen

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self._quantized is not None and self._quantized.model is pl_module:
            return  # a second fit on the same module: already prepared
        check_timing(
            {cb.log_name: cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)}  # type: ignore[attr-defined]
        )
        names = select_layers(pl_module, self.ignore, self.exclude_first_last)
        try:
            self._quantized = install(pl_module, names, self.spec)
        except QuantizationError as err:
            raise ValueError(f"{self.state_key}: {err}") from err
        self._structure_seen = change_count(pl_module)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._update_phase(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update_phase(trainer, pl_module)

    def _follow_structure(self) -> None:
        """Quantize the layers of the model as a structure change left it.

        A layer replaced by others (low-rank factors) is a new module: the layers are selected
        anew (``ignore``, ``exclude_first_last``) and the new ones quantized; layers changed in
        place (channels removed) keep their observers. Checked before and after every batch, when
        a state is saved and before one is restored (the resumed run replayed the changes after
        ``setup`` prepared the layers).
        """
        if self._quantized is None:
            return
        model = self._quantized.model
        if change_count(model) == self._structure_seen:
            return
        names = select_layers(model, self.ignore, self.exclude_first_last)
        try:
            fresh = self._quantized.follow(names)
        except QuantizationError as err:
            raise ValueError(f"{self.state_key}: {err}") from err
        self._structure_seen = change_count(model)
        if fresh:
            rank_zero_info(
                f"{self.log_name}: the model's structure changed; quantizing its new layers "
                f"{', '.join(fresh)}."
            )

    def _update_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Recomputed from the clock before every batch: nothing to apply twice after a resume.
        if self._quantized is None:
            return
        self._follow_structure()
        epoch = fractional_epoch(trainer)
        fake_quant, observe, bn_frozen = self.phase_at(epoch)
        self._quantized.set_phase(fake_quant, observe)
        self._bn_frozen = bn_frozen
        if bn_frozen:
            # Lightning puts the model back in train mode after every validation; hold BN here.
            for module in pl_module.modules():
                if isinstance(module, _BatchNorm) and module.training:
                    module.eval()
        phase = (fake_quant, observe, bn_frozen)
        if phase != self._announced:
            if self._announced is not None or any(phase):
                rank_zero_info(
                    f"{self.log_name} at epoch {epoch:.3f}: fake quantization "
                    f"{'on' if fake_quant else 'off'}, observers {'on' if observe else 'off'}, "
                    f"BatchNorm statistics {'frozen' if bn_frozen else 'updating'}."
                )
            self._announced = phase

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._follow_structure()
        if self._quantized is None or not self._quantized.observer_enabled:
            return
        if trainer.world_size > 1:
            # Each rank observed its own shard: one collective makes the ranges identical.
            self._quantized.sync_observers(lambda t: trainer.strategy.reduce(t, reduce_op="mean"))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._quantized is None:
            return
        prefix = f"compression/{self.log_name}"
        pl_module.log_dict(
            {
                f"{prefix}/fake_quant_enabled": float(self.fake_quant_enabled),
                f"{prefix}/observer_enabled": float(self.observer_enabled),
                f"{prefix}/bn_stats_frozen": float(self._bn_frozen),
            },
            on_step=False,
            on_epoch=True,
            # Every rank holds the same phase; syncing only quiets Lightning's DDP warning.
            sync_dist=True,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._quantized is None:
            return {"version": self.state_version, "quantization": self._pending_state}
        self._follow_structure()
        return {
            "version": self.state_version,
            "quantization": self._quantized.state_dict(),
            "bn_stats_frozen": self._bn_frozen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loaded_version(state_dict)
        state = state_dict.get("quantization")
        if state is None:
            return
        if self._quantized is None:
            # Restored before setup prepared the layers: apply once they exist.
            self._pending_state = state
            return
        self._restore(state)

    def _restore(self, state: Mapping[str, Any]) -> None:
        assert self._quantized is not None
        self._follow_structure()
        try:
            self._quantized.load_state_dict(state)
        except QuantizationError as err:
            raise ValueError(f"{self.state_key}: cannot resume from the checkpoint: {err}") from err
