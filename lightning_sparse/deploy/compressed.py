"""The compressed checkpoint format: ``compressed.safetensors``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from lightning_sparse.core.checkpoint import check_state_dict
from lightning_sparse.core.fake_quant import STATE_FORMAT, LayerQuantizer, quantized_layers, restore
from lightning_sparse.core.layers import kind_of

COMPRESSED_FILE = "compressed.safetensors"
COMPRESSED_FORMAT = "lightning_sparse.compressed"
# Version 2: the codec registry (entries name their codec; raw tensors name their key).
COMPRESSED_VERSION = 2

__all__ = [
    "CODECS",
    "COMPRESSED_FILE",
    "COMPRESSED_FORMAT",
    "COMPRESSED_VERSION",
    "Codec",
    "EncodeContext",
    "FloatCodec",
    "QuantizedCodec",
    "RawCodec",
    "dense_bytes",
    "load_compressed",
    "register_codec",
    "save_compressed",
]


def dense_bytes(module: nn.Module) -> int:
    """Bytes of ``module.state_dict()``'s tensors stored densely (what ``torch.save`` holds)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class _Pools:
    """Append-only pools of numbers, one per dtype; each entry records where it went."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {"u8": [], "i8": [], "f32": []}
        self.sizes = {"u8": 0, "i8": 0, "f32": 0}
        # Tensors a codec stores whole, under their own name.
        self.raw: dict[str, np.ndarray] = {}

    def add(self, pool: str, values: np.ndarray) -> list[int]:
        flat = np.ascontiguousarray(values).reshape(-1)
        start = self.sizes[pool]
        self.parts[pool].append(flat)
        self.sizes[pool] += flat.size
        return [start, start + flat.size]

    def tensors(self) -> dict[str, np.ndarray]:
        dtypes = {"u8": np.uint8, "i8": np.int8, "f32": np.float32}
        return {
            pool: np.concatenate(parts).astype(dtypes[pool]) if parts else np.zeros(0, dtypes[pool])
            for pool, parts in self.parts.items()
        }


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Signed 4-bit integers, two per byte (low nibble first)."""
    nibbles = (values.astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    low, high = packed & 0xF, packed >> 4
    nibbles = np.stack([low, high], axis=1).reshape(-1)[:count].astype(np.int16)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


@dataclass
class EncodeContext:
    """What codecs know besides the tensor: the quantized layers, by their weight key."""

    quantized: Mapping[str, LayerQuantizer]


class Codec:
    """How one kind of ``state_dict`` tensor is stored in, and read back from, the pools.

    A codec is registered under a short :attr:`name` (written as the entry's ``e``) with
    :func:`register_codec`; :func:`save_compressed` gives each tensor to the first registered
    codec that :meth:`accepts` it. A new codec (a codebook, low-rank factors, entropy-coded
    positions) is a new subclass here; neither the writer nor the reader changes.
    """

    name: ClassVar[str]

    def accepts(self, key: str, tensor: torch.Tensor, context: EncodeContext) -> bool:
        """Whether this codec stores ``tensor``."""
        raise NotImplementedError

    def encode(
        self, key: str, tensor: torch.Tensor, context: EncodeContext, pools: _Pools
    ) -> dict[str, Any]:
        """Add ``tensor``'s numbers to ``pools``; return its index entry (JSON data)."""
        raise NotImplementedError

    def decode(self, entry: Mapping[str, Any], pools: Mapping[str, np.ndarray]) -> torch.Tensor:
        """The tensor back from its entry, exactly as saved."""
        raise NotImplementedError


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Add ``codec`` to the registry (tried before those registered earlier), by its name.

    Raises:
        ValueError: another codec already has that name.
    """
    if codec.name in CODECS and type(CODECS[codec.name]) is not type(codec):
        raise ValueError(f"a codec named {codec.name!r} is registered already.")
    CODECS[codec.name] = codec
    return codec


def _store_maybe_sparse(
    entry: dict[str, Any],
    values: np.ndarray,
    nonzero: np.ndarray,
    value_bytes: float,
    pools: _Pools,
) -> np.ndarray:
    """As a bitmask (``m``) plus the non-zeros when that is smaller; return the values to store."""
    count, kept = values.size, int(nonzero.sum())
    if count / 8 + kept * value_bytes < count * value_bytes:
        entry["m"] = pools.add("u8", np.packbits(nonzero))
        return values[nonzero]
    return values


def _mask(entry: Mapping[str, Any], pools: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if "m" not in entry:
        return None
    count = math.prod(entry["s"])
    return np.unpackbits(_read(pools, "u8", entry["m"]), count=count).astype(bool)


def _dtype(entry: Mapping[str, Any]) -> torch.dtype:
    dtype: torch.dtype = getattr(torch, entry.get("d", "float32"))
    return dtype


class RawCodec(Codec):
    """Non-float tensors (step counters, integer buffers) under their own name, as they are."""

    name = "raw"

    @override
    def accepts(self, key: str, tensor: torch.Tensor, context: EncodeContext) -> bool:
        return not tensor.is_floating_point()

    @override
    def encode(
        self, key: str, tensor: torch.Tensor, context: EncodeContext, pools: _Pools
    ) -> dict[str, Any]:
        pools.raw[key] = tensor.numpy()
        return {"k": key}

    @override
    def decode(self, entry: Mapping[str, Any], pools: Mapping[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(pools[entry["k"]].copy())


class FloatCodec(Codec):
    """Float tensors as float32 values, as a bitmask plus non-zeros when that is smaller."""

    name = "f"

    @override
    def accepts(self, key: str, tensor: torch.Tensor, context: EncodeContext) -> bool:
        return tensor.is_floating_point()

    @override
    def encode(
        self, key: str, tensor: torch.Tensor, context: EncodeContext, pools: _Pools
    ) -> dict[str, Any]:
        values = tensor.to(torch.float32).numpy().reshape(-1)
        entry: dict[str, Any] = {}
        values = _store_maybe_sparse(entry, values, values != 0, 4.0, pools)
        entry["v"] = pools.add("f32", values)
        return entry

    @override
    def decode(self, entry: Mapping[str, Any], pools: Mapping[str, np.ndarray]) -> torch.Tensor:
        shape, count = entry["s"], math.prod(entry["s"])
        values = _read(pools, "f32", entry["v"])
        mask = _mask(entry, pools)
        if mask is not None:
            dense = np.zeros(count, np.float32)
            dense[mask] = values[: int(mask.sum())]
            values = dense
        return torch.from_numpy(values.astype(np.float32)).reshape(shape).to(_dtype(entry))


class QuantizedCodec(Codec):
    """A quantized layer's weight as its integers (int8, or 4-bit two per byte) plus scales.

    Loading gives back exactly the weights the quantized model computes with; a zero weight is its
    channel's zero point in integers (0 when symmetric), so sparsity survives as a bitmask.
    """

    name = "q"

    @override
    def accepts(self, key: str, tensor: torch.Tensor, context: EncodeContext) -> bool:
        return key in context.quantized

    @override
    def encode(
        self, key: str, tensor: torch.Tensor, context: EncodeContext, pools: _Pools
    ) -> dict[str, Any]:
        quantizer = context.quantized[key]
        # Stored with the channel axis first (Conv1D keeps its outputs on axis 1).
        values = quantizer.integer_weight().movedim(quantizer.axis, 0).numpy().reshape(-1)
        zero_point = quantizer.weight_zero_point.cpu().numpy().astype(np.int8)
        nonzero = values != np.repeat(zero_point, values.size // zero_point.size)
        bits = quantizer.spec.num_bits
        entry: dict[str, Any] = {"b": bits}
        if quantizer.axis:
            entry["ax"] = quantizer.axis
        entry["sc"] = pools.add("f32", quantizer.weight_scale.cpu().numpy())
        if not quantizer.spec.symmetric:
            entry["zp"] = pools.add("i8", zero_point)
        values = _store_maybe_sparse(entry, values, nonzero, bits / 8, pools)
        if bits == 4:
            entry["v"] = pools.add("u8", _pack_nibbles(values))
            entry["n"] = int(values.size)
        else:
            entry["v"] = pools.add("i8", values)
        return entry

    @override
    def decode(self, entry: Mapping[str, Any], pools: Mapping[str, np.ndarray]) -> torch.Tensor:
        shape, count = entry["s"], math.prod(entry["s"])
        if entry["b"] == 4:
            values = _unpack_nibbles(_read(pools, "u8", entry["v"]), entry["n"])
        else:
            values = _read(pools, "i8", entry["v"])
        scale_values = _read(pools, "f32", entry["sc"])
        channels = len(scale_values)
        if "zp" in entry:
            zero_point = _read(pools, "i8", entry["zp"]).astype(np.int32)
        else:
            zero_point = np.zeros(channels, dtype=np.int32)
        mask = _mask(entry, pools)
        if mask is not None:
            dense = np.repeat(zero_point, count // channels)
            dense[mask] = values[: int(mask.sum())]
            values = dense
        scale = torch.from_numpy(scale_values.copy())
        axis = int(entry.get("ax", 0))
        channels_first = [shape[axis], *(d for i, d in enumerate(shape) if i != axis)]
        ints = torch.from_numpy(values.astype(np.int32)).reshape(channels_first)
        column = (-1,) + (1,) * (len(shape) - 1)
        zp = torch.from_numpy(zero_point.copy()).reshape(column)
        # Same arithmetic as the fake-quant kernels: float(q - zero_point) * scale.
        weight = (ints - zp).to(torch.float32) * scale.reshape(column)
        return weight.movedim(0, axis).contiguous().to(_dtype(entry))


# Registration order is the order of preference, latest first: a quantized weight is "q" before
# it is a float.
for _codec in (RawCodec(), FloatCodec(), QuantizedCodec()):
    register_codec(_codec)


def _codec_for(key: str, tensor: torch.Tensor, context: EncodeContext) -> Codec:
    for codec in reversed(CODECS.values()):
        if codec.accepts(key, tensor, context):
            return codec
    raise ValueError(f"no registered codec stores {key!r} ({tensor.dtype}).")


def save_compressed(module: nn.Module, path: str | Path) -> int:
    """Write ``module`` to ``path`` as a compact safetensors file; return its size in bytes.

    Each ``state_dict`` tensor goes to the first registered codec that accepts it (:data:`CODECS`):
    quantized weights (layers with fake quantization on) as their integers plus scales, so loading
    gives back exactly the weights the quantized model computes with; other float tensors as
    float32; either as a bitmask plus non-zeros when that is smaller. The header records the
    format version; :func:`load_compressed` refuses newer ones.
    """
    from safetensors.numpy import save_file

    context = EncodeContext(
        quantized={
            f"{name}.{q.kind.weight}": q
            for name, q in quantized_layers(module).items()
            if q.controls.fake_quant
        }
    )
    pools = _Pools()
    index: dict[str, dict[str, Any]] = {}
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        codec = _codec_for(key, tensor, context)
        entry: dict[str, Any] = {"s": list(tensor.shape)}
        if tensor.dtype != torch.float32:  # float32 is the default: keep the header small
            entry["d"] = str(tensor.dtype).removeprefix("torch.")
        entry.update(codec.encode(key, tensor, context, pools))
        entry["e"] = codec.name
        index[key] = entry
    # Layers grouped by spec (one group unless two QAT instances differ); each group's input
    # ranges are consecutive (min, max) pairs in the f32 pool, in the order of its layers.
    groups: dict[str, dict[str, Any]] = {}
    for name, quantizer in context.quantized.items():
        spec = quantizer.spec.to_dict()
        group = groups.setdefault(json.dumps(spec, sort_keys=True), {"spec": spec, "layers": []})
        group["layers"].append(name.removesuffix(f".{quantizer.kind.weight}"))
        bounds = torch.stack([quantizer.input_min.cpu(), quantizer.input_max.cpu()]).numpy()
        start = pools.add("f32", bounds)[0]
        group.setdefault("r", start)
    metadata = {
        "format": COMPRESSED_FORMAT,
        "version": str(COMPRESSED_VERSION),
        "index": json.dumps(index, separators=(",", ":")),
        "quantization": json.dumps(list(groups.values()), separators=(",", ":")),
    }
    save_file({**pools.tensors(), **pools.raw}, str(path), metadata=metadata)
    return Path(path).stat().st_size


def _read(pools: Mapping[str, np.ndarray], pool: str, where: list[int]) -> np.ndarray:
    return pools[pool][where[0] : where[1]]


def load_compressed(path: str | Path, module: nn.Module) -> nn.Module:
    """Load ``compressed.safetensors`` into ``module`` (same architecture), quantization included.

    The weights become exactly those the saved model computed with; layers that were quantized
    get their scales and input ranges back (fake quantization on, observers off), installed now if
    ``module`` is not quantized yet. So ``module`` then gives the saved model's outputs bit for bit.

    Raises:
        ValueError: not a lightning_sparse compressed file, a newer format version than this
            package reads, or an entry of a codec it does not know.
        CheckpointMismatchError: its tensors do not fit ``module``.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
        pools = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if metadata.get("format") != COMPRESSED_FORMAT:
        raise ValueError(f"{path} is not a {COMPRESSED_FORMAT} file.")
    version = metadata.get("version", "1")
    if not version.isdigit() or int(version) > COMPRESSED_VERSION:
        raise ValueError(
            f"{path} is format version {version}, newer than this lightning_sparse reads (up to "
            f"{COMPRESSED_VERSION}); upgrade lightning_sparse to load it."
        )
    index: dict[str, dict[str, Any]] = json.loads(metadata["index"])
    groups: list[dict[str, Any]] = json.loads(metadata.get("quantization", "[]"))
    state: dict[str, torch.Tensor] = {}
    for key, entry in index.items():
        codec = CODECS.get(entry["e"])
        if codec is None:
            raise ValueError(
                f"{path}: {key!r} is stored with codec {entry['e']!r}, which this "
                f"lightning_sparse does not know (known: {sorted(CODECS)})."
            )
        # Files of version 1 wrote raw tensors under their own key without naming it.
        state[key] = codec.decode({"k": key, **entry}, pools)
    check_state_dict(state, module, source=f"compressed file {Path(path).name}")
    module.load_state_dict(state, strict=True)
    for group in groups:
        _restore_compressed_quantization(module, index, group, pools)
    return module


def _restore_compressed_quantization(
    module: nn.Module,
    index: Mapping[str, Mapping[str, Any]],
    group: Mapping[str, Any],
    pools: Mapping[str, np.ndarray],
) -> None:
    layers: dict[str, dict[str, Any]] = {}
    for position, name in enumerate(group["layers"]):
        kind = kind_of(module.get_submodule(name))
        entry = index[f"{name}.{kind.weight if kind is not None else 'weight'}"]
        scale = torch.from_numpy(_read(pools, "f32", entry["sc"]).copy())
        if "zp" in entry:
            zero_point = torch.from_numpy(_read(pools, "i8", entry["zp"]).astype(np.int32))
        else:
            zero_point = torch.zeros(scale.shape, dtype=torch.int32)
        start = group["r"] + 2 * position
        bounds = torch.from_numpy(pools["f32"][start : start + 2].copy())
        layers[name] = {
            "weight_scale": scale,
            "weight_zero_point": zero_point,
            "weight_observed": True,
            "input_min": bounds[0].clone(),
            "input_max": bounds[1].clone(),
            "input_observed": True,
        }
    state = {
        "format": STATE_FORMAT,
        "version": 1,
        "spec": group["spec"],
        "fake_quant_enabled": True,
        "observer_enabled": False,
        "layers": layers,
    }
    existing = quantized_layers(module)
    if not any(name in existing for name in layers):
        restore(module, state)
        return
    for name, layer_state in layers.items():
        if name not in existing:
            raise ValueError(
                f"layer {name!r} is quantized in the compressed file but not in the model, whose "
                f"quantized layers are {sorted(existing)}."
            )
        existing[name].load_state_dict(layer_state, name)
        existing[name].controls.fake_quant = True
        existing[name].controls.observe = False
