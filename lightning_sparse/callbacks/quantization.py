"""Quantization-aware training (QAT) as a callback, and post-training quantization (PTQ).

Both quantize the weights of Conv/Linear layers to int8 (or 4-bit) and their inputs to uint8, as
ONNX Runtime's integer kernels compute. The layers are prepared once, in ``setup``: each gets a
forward that fake-quantizes its weight and input when switched on (the ops are in
``lightning_sparse.quant_backend``). Parameters keep their names and types, so pruning masks keep
holding on them by name and a checkpoint loads into the plain model with ``strict=True``; scales
and observer ranges live in the callback's state, not in the model.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_sparse.callbacks.base import CompressionCallback, fractional_epoch, to_plain
from lightning_sparse.callbacks.pruning import MagnitudePruning
from lightning_sparse.quant_backend import (
    QUANTIZABLE_TYPES,
    SUPPORTED_BITS,
    QuantizationError,
    QuantizedModel,
    QuantSpec,
    install,
    quantized_layers,
)

__all__ = [
    "QuantizationAwareTraining",
    "check_quantization_timing",
    "ptq",
    "ptq_calibrate",
    "ptq_check",
    "select_layers",
]

_STATE_VERSION = 1


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
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)}
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no layer that quantization supports (Conv1d, Conv2d, "
            "Conv3d, Linear): there is nothing to quantize."
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


def check_quantization_timing(callbacks: Mapping[str, Any]) -> None:
    """Refuse QAT whose observers freeze while a pruning schedule still changes the weights.

    Frozen scales are fitted to the weights and activations at the freeze; pruning that goes on
    after it moves both, so the int8 model would run on stale scales. Recipe validation calls this
    with ``{"recipe.<entry>": callback}``; the callback itself calls it in ``setup`` with the
    trainer's callbacks, so plain-Python users get the same error.

    Args:
        callbacks: built callbacks by the label messages should use (``recipe.quantization``).

    Raises:
        ValueError: a ``QuantizationAwareTraining`` starts before a ``MagnitudePruning`` ends and
            freezes its observers (``disable_quantization_observer_epoch``) before it ends too.
    """
    for q_label, qat in callbacks.items():
        if not isinstance(qat, QuantizationAwareTraining):
            continue
        freeze = qat.disable_quantization_observer_epoch
        if freeze is None:
            continue
        for p_label, pruning in callbacks.items():
            if not isinstance(pruning, MagnitudePruning):
                continue
            end = pruning.end_epoch
            if qat.start_epoch < end and freeze < end:
                raise ValueError(
                    f"{q_label}.disable_quantization_observer_epoch={freeze:g} freezes the "
                    f"quantization observers before {p_label}.end_epoch={end:g}, while pruning "
                    f"still changes the weights (QAT starts at {q_label}.start_epoch="
                    f"{qat.start_epoch:g}); the frozen scales would not fit the pruned model. Set "
                    f"{q_label}.disable_quantization_observer_epoch >= {end:g}, or start QAT when "
                    f"pruning ends ({q_label}.start_epoch >= {end:g})."
                )


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
        if not _is_number(start_epoch) or start_epoch < 0:
            raise ValueError(
                f"`start_epoch`={start_epoch!r} is not allowed; it must be a number >= 0."
            )
        for field, value in (
            ("freeze_bn_stats_epoch", freeze_bn_stats_epoch),
            ("disable_quantization_observer_epoch", disable_quantization_observer_epoch),
        ):
            if value is not None and (not _is_number(value) or value < start_epoch):
                raise ValueError(
                    f"`{field}`={value!r} is not allowed; it must be null or a number >= "
                    f"`start_epoch`={start_epoch:g}."
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
        self.start_epoch = float(start_epoch)
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
        self._pending_state: dict[str, Any] | None = None
        self._bn_frozen = False
        self._announced: tuple[bool, bool, bool] | None = None

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
        max_epochs = None if vars(trainer).get("fast_dev_run") else trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
            raise ValueError(
                f"`start_epoch`={self.start_epoch:g} is not before the trainer's max_epochs="
                f"{max_epochs}: quantization-aware training would never start."
            )
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        check_quantization_timing(
            {getattr(cb, "log_name", type(cb).__name__): cb for cb in callbacks}
        )
        names = select_layers(pl_module, self.ignore, self.exclude_first_last)
        try:
            self._quantized = install(pl_module, names, self.spec)
        except QuantizationError as err:
            raise ValueError(f"{self.state_key}: {err}") from err
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_phase(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update_phase(trainer, pl_module)

    def _update_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Recomputed from the clock before every batch: nothing to apply twice after a resume.
        if self._quantized is None:
            return
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
            return {"version": _STATE_VERSION, "quantization": self._pending_state}
        return {
            "version": _STATE_VERSION,
            "quantization": self._quantized.state_dict(),
            "bn_stats_frozen": self._bn_frozen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
        try:
            self._quantized.load_state_dict(state)
        except QuantizationError as err:
            raise ValueError(f"{self.state_key}: cannot resume from the checkpoint: {err}") from err


def _inputs(batch: Any) -> torch.Tensor:
    """The model input of a batch: the batch itself or its first element (``(inputs, labels)``)."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"ptq expects batches that are a tensor or (inputs, ...) with tensor inputs; got "
            f"{type(batch).__name__}."
        )
    return batch


def ptq(
    module: nn.Module,
    datamodule: pl.LightningDataModule,
    num_batches: int = 16,
    *,
    num_bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = True,
    ignore: Sequence[str] = (),
    exclude_first_last: bool = False,
) -> QuantizedModel:
    """Post-training quantization: calibrate scales on training batches, no training.

    The first ``num_batches`` batches of ``datamodule.train_dataloader()`` go to
    :func:`ptq_calibrate`; see there.

    Args:
        module: the trained model (e.g. a ``ClassificationModule``); its forward takes the first
            element of each batch.
        datamodule: supplies the calibration data (training split).
        num_batches: batches to calibrate on (fewer if the loader is shorter).
        num_bits: bits per weight, 8 or 4.
        symmetric: symmetric weights (zero point 0).
        per_channel: one weight scale per output channel.
        ignore: layers left in float, as in :class:`QuantizationAwareTraining`.
        exclude_first_last: leave the first and last Conv/Linear layers in float.

    Returns:
        The handle on the quantized layers (``.state_dict()`` saves the scales).

    Raises:
        ValueError: an argument is invalid (the message names it); the module is quantized
            already; a quantized layer saw no input during calibration.

    Example::

        handle = ptq(module, DigitsDataModule(), num_batches=8)
        summary = export_model(module, DigitsDataModule(), "runs/ptq/export")
    """
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"`num_batches`={num_batches!r} is not allowed; it must be an int >= 1.")
    # Checked before any data is read.
    ptq_check(
        module,
        num_bits=num_bits,
        symmetric=symmetric,
        per_channel=per_channel,
        ignore=ignore,
        exclude_first_last=exclude_first_last,
    )
    datamodule.setup("fit")
    return ptq_calibrate(
        module,
        itertools.islice(datamodule.train_dataloader(), num_batches),
        num_bits=num_bits,
        symmetric=symmetric,
        per_channel=per_channel,
        ignore=ignore,
        exclude_first_last=exclude_first_last,
    )


def ptq_check(
    module: nn.Module,
    *,
    num_bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = True,
    ignore: Sequence[str] = (),
    exclude_first_last: bool = False,
) -> list[str]:
    """Validate PTQ options against ``module`` without changing it; return the layers to quantize.

    Raises:
        ValueError: an argument is invalid, or a layer is quantized already (names it).
    """
    _check_spec(num_bits, symmetric, per_channel)
    if not isinstance(exclude_first_last, bool):
        raise ValueError(
            f"`exclude_first_last`={exclude_first_last!r} is not allowed; it must be true or false."
        )
    names = select_layers(module, _check_ignore(ignore), exclude_first_last)
    done = sorted(set(names) & set(quantized_layers(module)))
    if done:
        raise ValueError(
            f"ptq: layer {done[0]!r} is quantized already (by QAT or an earlier PTQ); leave it "
            "out with `ignore`."
        )
    return names


@torch.no_grad()
def ptq_calibrate(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    num_bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = True,
    ignore: Sequence[str] = (),
    exclude_first_last: bool = False,
) -> QuantizedModel:
    """Quantize ``module`` by calibrating on ``batches``: the PTQ core, for any data source.

    The module runs in eval mode (BatchNorm running statistics, no dropout), in float, on every
    batch while observers record the running min/max of each quantized layer's input and the weight
    ranges. Afterwards it computes with fake-quantized weights and inputs (observers frozen):
    exactly what ``lightning_sparse.export.export_model`` writes to ``model_int8.onnx``. Pruned
    zeros stay zero. On error the module is left as it was.

    Args:
        module: the trained model; its forward takes a batch, or the first element of a
            ``(inputs, labels)`` batch.
        batches: calibration batches (all are used).
        num_bits: bits per weight, 8 or 4.
        symmetric: symmetric weights (zero point 0).
        per_channel: one weight scale per output channel.
        ignore: layers left in float, as in :class:`QuantizationAwareTraining`.
        exclude_first_last: leave the first and last Conv/Linear layers in float.

    Raises:
        ValueError: as :func:`ptq_check`; no batch; a quantized layer saw no input.
    """
    names = ptq_check(
        module,
        num_bits=num_bits,
        symmetric=symmetric,
        per_channel=per_channel,
        ignore=ignore,
        exclude_first_last=exclude_first_last,
    )
    handle = install(module, names, QuantSpec(num_bits, symmetric, per_channel))
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    seen = 0
    try:
        with handle.calibrating():
            for batch in batches:
                module(_inputs(batch).to(device))
                seen += 1
    except BaseException:
        handle.remove()
        raise
    finally:
        module.train(was_training)
    silent = [name for name, q in handle.layers.items() if not q.input_observed]
    if silent:
        handle.remove()
        reason = "no calibration batch was given" if not seen else "unused in forward?"
        raise ValueError(
            f"ptq: layers {silent} saw no input in {seen} calibration batches ({reason}); "
            "give batches, or leave unused layers out with `ignore`."
        )
    handle.set_phase(fake_quant=True, observe=False)
    rank_zero_info(f"ptq: calibrated {len(handle.layers)} layers on {seen} batches.")
    return handle
