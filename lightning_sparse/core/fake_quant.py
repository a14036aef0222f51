"""The one module that touches the quantization backend: torch's fake-quant ops, ONNX, ONNX Runtime.

Why core ops and not torchao's pt2e flow (``docs/decisions.md`` has the measurements): pt2e
replaces the model with an exported ``GraphModule`` whose Conv/Linear layers are gone (pruning finds
no target), whose ``state_dict`` gains observer keys (a checkpoint no longer loads into the plain
model with ``strict=True``) and which refuses ``.train()``/``.eval()`` (Lightning calls both).
Here instead:

- **Fake quantization** uses ``torch.fake_quantize_per_channel_affine`` (weights) and
  ``torch.fake_quantize_per_tensor_affine`` (layer inputs) inside a forward that is installed once
  on each quantized layer (Conv, Linear, Hugging Face's Conv1D, any quantizable kind registered in
  :mod:`lightning_sparse.core.layers`, whose output dimension carries the per-channel scales).
  Parameters keep their names and types; the observers' state lives
  in a :class:`LayerQuantizer` outside the model, so the model's ``state_dict`` is unchanged and the
  owner (a callback) saves the state in plain tensors.
- **ONNX**: ``torch.onnx.export(dynamo=True)`` writes the float graph; :func:`quantize_onnx` then
  inserts QuantizeLinear/DequantizeLinear with the learned scales (int8 weights per output channel,
  uint8 inputs per tensor, int32 biases) and folds a BatchNormalization that follows a quantized
  Conv into its weights, which ONNX Runtime fuses into QLinearConv/QGemm.
- **ONNX Runtime** sessions and latency are measured here, so its version checks live in one place.

Weights are quantized symmetrically by default (zero point 0): a pruned weight is exactly zero
before and after quantization. Affine weights keep zeros too, since the zero point is an integer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.core.layers import LayerKind, kind_of, type_name

__all__ = [
    "ACTIVATION_QRANGE",
    "EMA_CONSTANT",
    "STATE_FORMAT",
    "SUPPORTED_BITS",
    "LayerQuantizer",
    "QuantSpec",
    "QuantizationError",
    "QuantizedModel",
    "activation_qparams",
    "check_state",
    "install",
    "is_quantizable",
    "quantized_layers",
    "restore",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_BITS = (4, 8)
# Layer inputs are uint8 (per tensor, affine): ONNX Runtime's x86 int8 kernels are u8s8.
ACTIVATION_QRANGE = (0, 255)
# Moving-average constant of the input observers during QAT (torch's default).
EMA_CONSTANT = 0.01
STATE_FORMAT = "lightning_sparse.quantization"
_STATE_VERSION = 1
# Smallest scale: an all-zero channel (pruned away) still needs a positive scale.
_MIN_SCALE = float(torch.finfo(torch.float32).eps)


class QuantizationError(ValueError):
    """The quantization state cannot do what was asked (uncalibrated layer, foreign state...)."""


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized; layer inputs are always uint8, per tensor, affine.

    Args:
        num_bits: bits per weight, 8 or 4 (4-bit values are stored in int8 in ONNX).
        symmetric: zero point 0 and range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; else affine over
            ``[-2^(b-1), 2^(b-1) - 1]`` with a per-channel (or per-tensor) zero point.
        per_channel: one scale per output channel (the layer kind's output dimension: 0 for
            Conv/Linear, 1 for Conv1D); else one per weight tensor.
    """

    num_bits: int = 8
    symmetric: bool = True
    per_channel: bool = True

    @property
    def weight_qrange(self) -> tuple[int, int]:
        """(quant_min, quant_max) of the integer weights."""
        half = 2 ** (self.num_bits - 1)
        return (-(half - 1), half - 1) if self.symmetric else (-half, half - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints."""
        return {
            "num_bits": self.num_bits,
            "symmetric": self.symmetric,
            "per_channel": self.per_channel,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            num_bits=int(data["num_bits"]),
            symmetric=bool(data["symmetric"]),
            per_channel=bool(data["per_channel"]),
        )


@dataclass
class _Controls:
    """Phase switches shared by all layers of one :class:`QuantizedModel`."""

    fake_quant: bool = False
    observe: bool = False
    # Calibration observes in eval mode (BN running stats, no dropout) with running min/max.
    calibrating: bool = False


def _affine_qparams(
    low: torch.Tensor, high: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [low, high] widened to include 0 (exact zeros)."""
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    scale = torch.clamp((high - low) / float(qmax - qmin), min=_MIN_SCALE)
    zero_point = torch.clamp(torch.round(qmin - low / scale), qmin, qmax).to(torch.int32)
    return scale.to(torch.float32), zero_point


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of a uint8 activation observed in ``[low, high]`` (as layer inputs)."""
    scale, zero_point = _affine_qparams(
        torch.tensor(float(low)), torch.tensor(float(high)), *ACTIVATION_QRANGE
    )
    return float(scale.item()), int(zero_point.item())


def is_quantizable(module: nn.Module) -> bool:
    """Whether QAT/PTQ can quantize ``module``: a layer kind that says so, with its weight."""
    kind = kind_of(module)
    return kind is not None and kind.quantizable


class LayerQuantizer:
    """Quantization state of one layer: weight scales and an input range observer.

    Not an ``nn.Module``: nothing here enters the model's ``state_dict``. Tensors follow the layer
    to its device on first use.

    Args:
        module: the layer, of a quantizable kind (:func:`is_quantizable`).
        spec: how its weight is quantized.
        controls: the phase switches of the model it belongs to.
    """

    def __init__(self, module: nn.Module, spec: QuantSpec, controls: _Controls) -> None:
        kind = kind_of(module)
        if kind is None:
            raise QuantizationError(f"{type_name(type(module))} is not a known layer kind.")
        self.module = module
        self.kind: LayerKind = kind
        # Per-channel scales run along the output dimension of the weight.
        self.axis = kind.output_dim
        self.spec = spec
        self.controls = controls
        weight = self.weight
        channels = int(weight.shape[self.axis]) if spec.per_channel else 1
        self.weight_scale = torch.ones(channels, dtype=torch.float32, device=weight.device)
        self.weight_zero_point = torch.zeros(channels, dtype=torch.int32, device=weight.device)
        self.weight_observed = False
        self.input_min = torch.zeros((), dtype=torch.float32, device=weight.device)
        self.input_max = torch.zeros((), dtype=torch.float32, device=weight.device)
        self.input_observed = False

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight parameter."""
        weight = getattr(self.module, self.kind.weight)
        assert isinstance(weight, torch.Tensor)
        return weight

    def _follow(self, device: torch.device) -> None:
        if self.weight_scale.device != device:
            self.weight_scale = self.weight_scale.to(device)
            self.weight_zero_point = self.weight_zero_point.to(device)
            self.input_min = self.input_min.to(device)
            self.input_max = self.input_max.to(device)

    @torch.no_grad()
    def observe_weight(self, weight: torch.Tensor) -> None:
        """Set the weight scales from the weight as it is now (min/max per channel or tensor)."""
        self._follow(weight.device)
        flat = weight.detach().movedim(self.axis, 0).reshape(weight.shape[self.axis], -1).float()
        if not self.spec.per_channel:
            flat = flat.reshape(1, -1)
        qmin, qmax = self.spec.weight_qrange
        if self.spec.symmetric:
            scale = torch.clamp(flat.abs().amax(dim=1) / qmax, min=_MIN_SCALE)
            # Sized by the weight as it is now: channel removal may have shrunk the layer.
            zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        else:
            scale, zero_point = _affine_qparams(flat.amin(dim=1), flat.amax(dim=1), qmin, qmax)
        self.weight_scale = scale.to(torch.float32)
        self.weight_zero_point = zero_point
        self.weight_observed = True

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``weight`` (straight-through gradient inside the clamp range)."""
        self._follow(weight.device)
        qmin, qmax = self.spec.weight_qrange
        if self.spec.per_channel:
            return torch.fake_quantize_per_channel_affine(
                weight, self.weight_scale, self.weight_zero_point, self.axis, qmin, qmax
            )
        return torch.fake_quantize_per_tensor_affine(
            weight, self.weight_scale, self.weight_zero_point, qmin, qmax
        )

    @torch.no_grad()
    def observe_input(self, x: torch.Tensor, moving_average: bool) -> None:
        """Track the input range: a moving average of batch min/max (QAT), or running min/max."""
        self._follow(x.device)
        low, high = x.detach().min().float(), x.detach().max().float()
        if not self.input_observed:
            self.input_min, self.input_max = low.clone(), high.clone()
            self.input_observed = True
        elif moving_average:
            self.input_min = self.input_min + EMA_CONSTANT * (low - self.input_min)
            self.input_max = self.input_max + EMA_CONSTANT * (high - self.input_max)
        else:
            self.input_min = torch.minimum(self.input_min, low)
            self.input_max = torch.maximum(self.input_max, high)

    def input_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (int32) of the uint8 input, from the observed range."""
        return _affine_qparams(self.input_min, self.input_max, *ACTIVATION_QRANGE)

    def quantize_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Fake-quantized layer input.

        Raises:
            QuantizationError: the input range was never observed.
        """
        if not self.input_observed:
            raise QuantizationError(
                f"layer {name!r}: fake quantization is on but its input range was never observed; "
                "enable observers (QAT) or calibrate (PTQ) first."
            )
        self._follow(x.device)
        scale, zero_point = self.input_qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, *ACTIVATION_QRANGE)

    @torch.no_grad()
    def integer_weight(self) -> torch.Tensor:
        """The weight as the integers fake quantization uses (int8 storage, also for 4 bits)."""
        weight = self.weight.detach()
        fake = self.quantize_weight(weight)
        shape = [1] * weight.dim()
        shape[self.axis] = -1
        scale = self.weight_scale.reshape(shape)
        zero_point = self.weight_zero_point.reshape(shape)
        # Dividing the fake-quantized value by its own scale recovers the integer exactly.
        return (torch.round(fake / scale) + zero_point).to(torch.int8)

    def state_dict(self) -> dict[str, Any]:
        """The observers' state in plain types (``torch.load(weights_only=True)`` reads it)."""
        return {
            "weight_scale": self.weight_scale.detach().cpu().clone(),
            "weight_zero_point": self.weight_zero_point.detach().cpu().clone(),
            "weight_observed": self.weight_observed,
            "input_min": self.input_min.detach().cpu().clone(),
            "input_max": self.input_max.detach().cpu().clone(),
            "input_observed": self.input_observed,
        }

    def load_state_dict(self, state: Mapping[str, Any], name: str) -> None:
        """Restore :meth:`state_dict` output exactly (bit for bit)."""
        scale = torch.as_tensor(state["weight_scale"], dtype=torch.float32)
        # The layer as it is now (its channels may have been removed since it was installed).
        expected = [int(self.weight.shape[self.axis]) if self.spec.per_channel else 1]
        if list(scale.shape) != expected:
            raise QuantizationError(
                f"layer {name!r}: the saved weight scales have shape {list(scale.shape)}, this "
                f"layer needs {expected} (per_channel={self.spec.per_channel})."
            )
        device = self.weight.device
        self.weight_scale = scale.to(device)
        self.weight_zero_point = torch.as_tensor(state["weight_zero_point"]).to(device, torch.int32)
        self.weight_observed = bool(state["weight_observed"])
        self.input_min = torch.as_tensor(state["input_min"], dtype=torch.float32).to(device)
        self.input_max = torch.as_tensor(state["input_max"], dtype=torch.float32).to(device)
        self.input_observed = bool(state["input_observed"])


class _QuantForward:
    """The forward installed on a quantized layer: observe, fake-quantize, then the layer's op.

    An instance attribute ``forward`` (not a module swap, not a parametrization) keeps the layer's
    type and parameter names, costs nothing while quantization is off, and is picklable.
    """

    def __init__(self, quantizer: LayerQuantizer, name: str) -> None:
        self.quantizer = quantizer
        self.name = name
        # Set while the layer's own forward runs with the fake-quantized weight swapped in.
        self._inside = False

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        quantizer = self.quantizer
        module = quantizer.module
        controls = quantizer.controls
        if self._inside:
            return type(module).forward(module, x, *args, **kwargs)
        if controls.observe and (module.training or controls.calibrating):
            quantizer.observe_input(x, moving_average=not controls.calibrating)
            quantizer.observe_weight(quantizer.weight)
        if not controls.fake_quant:
            return type(module).forward(module, x, *args, **kwargs)
        x = quantizer.quantize_input(x, self.name)
        weight = quantizer.quantize_weight(quantizer.weight)
        if type(module) is nn.Linear:
            return F.linear(x, weight, module.bias)
        if isinstance(module, _CONV_TYPES):
            return module._conv_forward(x, weight, module.bias)
        # Any other kind (Hugging Face's Conv1D, a registered type): its own forward, with the
        # fake-quantized tensor in place of the weight parameter for this call.
        self._inside = True
        try:
            return torch.func.functional_call(
                module, {quantizer.kind.weight: weight}, (x, *args), kwargs
            )
        finally:
            self._inside = False


def _quant_forward(module: nn.Module) -> _QuantForward | None:
    installed = vars(module).get("forward")
    return installed if isinstance(installed, _QuantForward) else None


def quantized_layers(model: nn.Module) -> dict[str, LayerQuantizer]:
    """Every quantized layer inside ``model``, by its name in ``model.named_modules()``."""
    found: dict[str, LayerQuantizer] = {}
    for name, module in model.named_modules():
        installed = _quant_forward(module)
        if installed is not None:
            found[name] = installed.quantizer
    return found


class QuantizedModel:
    """Handle on the layers of one model that :func:`install` quantized, and their phase switches.

    Args:
        model: the root module the layer names are relative to.
        layers: ``{name: LayerQuantizer}``.
        spec: how the weights are quantized.
        controls: the shared phase switches.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerQuantizer],
        spec: QuantSpec,
        controls: _Controls,
    ) -> None:
        self.model = model
        self.layers = layers
        self.spec = spec
        self._controls = controls

    @property
    def fake_quant_enabled(self) -> bool:
        """Whether forward passes use fake-quantized weights and inputs."""
        return self._controls.fake_quant

    @property
    def observer_enabled(self) -> bool:
        """Whether training forwards (or calibration) update scales."""
        return self._controls.observe

    def set_phase(self, fake_quant: bool, observe: bool) -> None:
        """Switch fake quantization and observers on or off (no module is swapped)."""
        self._controls.fake_quant = bool(fake_quant)
        self._controls.observe = bool(observe)

    @contextmanager
    def calibrating(self) -> Iterator[None]:
        """Observe running min/max of inputs in eval mode, with fake quantization off."""
        saved = (self._controls.fake_quant, self._controls.observe, self._controls.calibrating)
        self._controls.fake_quant, self._controls.observe, self._controls.calibrating = (
            False,
            True,
            True,
        )
        try:
            yield
        finally:
            self._controls.fake_quant, self._controls.observe, self._controls.calibrating = saved

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The plain float model for the duration (e.g. to export ``model.onnx``)."""
        saved = (self._controls.fake_quant, self._controls.observe)
        self._controls.fake_quant = self._controls.observe = False
        try:
            yield
        finally:
            self._controls.fake_quant, self._controls.observe = saved

    def observer_tensors(self) -> list[torch.Tensor]:
        """Input ranges of every layer, in a fixed order (what DDP ranks average)."""
        return [t for q in self.layers.values() for t in (q.input_min, q.input_max)]

    def sync_observers(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every input range by ``reduce_mean`` of it over processes (one collective)."""
        if not self.layers:
            return
        flat = torch.stack(self.observer_tensors())
        flat = reduce_mean(flat)
        for index, quantizer in enumerate(self.layers.values()):
            quantizer.input_min = flat[2 * index].clone()
            quantizer.input_max = flat[2 * index + 1].clone()

    def state_dict(self) -> dict[str, Any]:
        """Spec, phase and every layer's observers, in plain types."""
        return {
            "format": STATE_FORMAT,
            "version": _STATE_VERSION,
            "spec": self.spec.to_dict(),
            "fake_quant_enabled": self._controls.fake_quant,
            "observer_enabled": self._controls.observe,
            "layers": {name: q.state_dict() for name, q in self.layers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the layers must be the same.

        Raises:
            QuantizationError: the state is not a quantization state, or its layers or spec differ.
        """
        check_state(state)
        saved = set(state["layers"])
        if saved != set(self.layers):
            raise QuantizationError(
                "the saved quantization state covers layers "
                f"{sorted(saved)}, but this model quantizes {sorted(self.layers)}."
            )
        spec = QuantSpec.from_dict(state["spec"])
        if spec != self.spec:
            raise QuantizationError(
                f"the saved quantization state was made with {spec}, this model uses {self.spec}."
            )
        for name, quantizer in self.layers.items():
            quantizer.load_state_dict(state["layers"][name], name)
        self.set_phase(bool(state["fake_quant_enabled"]), bool(state["observer_enabled"]))

    def follow(self, names: Sequence[str]) -> list[str]:
        """Quantize the layers ``names`` of the model as it is now, after a structure change.

        A layer still at its name (same module: channels removed in place) keeps its quantizer
        and observers; a layer that replaced another (a factor of a factorized one) gets a fresh
        one, off or on with the others (the phase switches are shared); a quantizer whose layer
        left the model is dropped.

        Returns:
            The names of the layers that got a fresh quantizer.

        Raises:
            QuantizationError: a name is not a quantizable layer, or is quantized by another
                handle.
        """
        modules = dict(self.model.named_modules())
        layers: dict[str, LayerQuantizer] = {}
        fresh: list[str] = []
        for name in names:
            module = modules.get(name)
            old = self.layers.get(name)
            if old is not None and old.module is module:
                layers[name] = old
                continue
            if module is None or not is_quantizable(module):
                raise QuantizationError(f"{name!r} is not a quantizable layer of the model.")
            if _quant_forward(module) is not None:
                raise QuantizationError(f"layer {name!r} is quantized already by another handle.")
            layers[name] = LayerQuantizer(module, self.spec, self._controls)
            fresh.append(name)
        kept = {id(q) for q in layers.values()}
        for quantizer in self.layers.values():
            if id(quantizer) not in kept:
                vars(quantizer.module).pop("forward", None)
        for name in fresh:
            vars(layers[name].module)["forward"] = _QuantForward(layers[name], name)
        self.layers = layers
        return fresh

    def remove(self) -> None:
        """Give every layer its own forward back."""
        for quantizer in self.layers.values():
            vars(quantizer.module).pop("forward", None)
        self.layers = {}


def check_state(state: Any) -> None:
    """Raise :class:`QuantizationError` unless ``state`` is a :meth:`QuantizedModel.state_dict`."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise QuantizationError(f"not a {STATE_FORMAT} state: {type(state).__name__}.")
    if int(state.get("version", -1)) != _STATE_VERSION:
        raise QuantizationError(
            f"quantization state version {state.get('version')} is not supported "
            f"(this lightning_sparse reads version {_STATE_VERSION})."
        )


def install(model: nn.Module, names: Sequence[str], spec: QuantSpec) -> QuantizedModel:
    """Quantize the layers ``names`` of ``model`` (off until :meth:`QuantizedModel.set_phase`).

    Raises:
        QuantizationError: a name is not a quantizable layer of ``model`` (Conv, Linear, Conv1D,
            a registered quantizable kind), or is quantized already.
    """
    modules = dict(model.named_modules())
    controls = _Controls()
    layers: dict[str, LayerQuantizer] = {}
    for name in names:
        module = modules.get(name)
        if module is None or not is_quantizable(module):
            what = "no layer" if module is None else type_name(type(module))
            raise QuantizationError(
                f"{name!r} ({what}) is not a quantizable layer of the model (Conv1d/2d/3d, Linear, "
                "Conv1D, or a type registered with `register_layer_kind(..., quantizable=True)`)."
            )
        if _quant_forward(module) is not None:
            raise QuantizationError(
                f"layer {name!r} is quantized already (by another QAT instance or PTQ); "
                "give each instance disjoint layers with `ignore`."
            )
        layers[name] = LayerQuantizer(module, spec, controls)
    for name, quantizer in layers.items():
        vars(quantizer.module)["forward"] = _QuantForward(quantizer, name)
    return QuantizedModel(model, layers, spec, controls)


def restore(model: nn.Module, state: Mapping[str, Any]) -> QuantizedModel:
    """Install quantization on ``model`` from a saved state (layers, spec, phase, observers)."""
    check_state(state)
    handle = install(model, list(state["layers"]), QuantSpec.from_dict(state["spec"]))
    handle.load_state_dict(state)
    return handle
