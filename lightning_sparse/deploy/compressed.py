"""The compressed checkpoint format: ``compressed.safetensors``.

One safetensors file: a few pools of numbers (``u8``, ``i8``, ``f32``) plus an index (JSON in the
header) with one entry per ``state_dict`` tensor, naming the codec that stored it. Version 3 writes
every float tensor with the entropy codec (``ec``): the smallest exact storage among float values,
a codebook plus entropy-coded indices (clustered weights), per-row codebooks, and a quantized
layer's integers; positions of non-zeros as entropy-coded gaps (``core/entropy.py``). Files of
versions 1 and 2 (codecs ``raw``, ``f``, ``q``) are still read.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from lightning_sparse.core.checkpoint import check_state_dict
from lightning_sparse.core.entropy import (
    decode_positions,
    decode_symbols,
    encode_positions,
    encode_symbols,
)
from lightning_sparse.core.fake_quant import STATE_FORMAT, LayerQuantizer, quantized_layers, restore
from lightning_sparse.core.layers import kind_of

COMPRESSED_FILE = "compressed.safetensors"
COMPRESSED_FORMAT = "lightning_sparse.compressed"
# Version 2: the codec registry (entries name their codec; raw tensors name their key).
# Version 3: the entropy codec ("ec") writes every float tensor.
COMPRESSED_VERSION = 3

__all__ = [
    "CODECS",
    "COMPRESSED_FILE",
    "COMPRESSED_FORMAT",
    "COMPRESSED_VERSION",
    "Codec",
    "CompressedFile",
    "EncodeContext",
    "EntropyCodec",
    "FloatCodec",
    "QuantizedCodec",
    "RawCodec",
    "dense_bytes",
    "load_compressed",
    "register_codec",
    "save_compressed",
    "write_compressed",
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
    """What codecs know besides the tensor: the quantized layers, by their weight key.

    ``stats`` collects what a codec reports about each tensor it stored (bits, entropy bound).
    """

    quantized: Mapping[str, LayerQuantizer]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


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


def _dequantize(
    values: np.ndarray, zero_point: np.ndarray, scale_values: np.ndarray, shape: list[int]
) -> torch.Tensor:
    """Integers back to the float weight, per output channel."""
    scale = torch.from_numpy(scale_values.copy())
    ints = torch.from_numpy(values.astype(np.int32)).reshape(shape)
    column = (-1,) + (1,) * (len(shape) - 1)
    zp = torch.from_numpy(zero_point.astype(np.int32)).reshape(column)
    # Same arithmetic as the fake-quant kernels: float(q - zero_point) * scale.
    return (ints - zp).to(torch.float32) * scale.reshape(column)


# ----------------------------------------------------------------------------------------------
# The entropy codec

# A codebook larger than this is not worth its Huffman table (a byte per symbol of the alphabet).
_MAX_CODEBOOK = 4096
_MAX_ROW_CODEBOOK = 256


@dataclass
class _Plan:
    """One exact way to store a tensor: its entry and the arrays it adds to the pools."""

    entry: dict[str, Any]
    parts: list[tuple[str, str, np.ndarray]]  # (entry key, pool, array)
    entropy_bits: float  # coded streams at their order-0 bound, everything else at its size

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for _, _, array in self.parts)

    def commit(self, pools: _Pools) -> dict[str, Any]:
        entry = dict(self.entry)
        for key, pool, array in self.parts:
            entry[key] = pools.add(pool, array)
        return entry


def _float_bytes(values: np.ndarray) -> tuple[str, np.ndarray]:
    """Float32 values as bytes: half precision when every value survives it exactly."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = values.astype("<f2")
    if np.array_equal(half.astype(np.float32), values, equal_nan=True):
        return "f16", half.view(np.uint8)
    return "f32", values.astype("<f4").view(np.uint8)


def _read_floats(data: np.ndarray, fmt: str) -> np.ndarray:
    if fmt not in ("f16", "f32"):
        raise ValueError(f"unknown float format {fmt!r} in a compressed entry.")
    return np.ascontiguousarray(data).view("<f2" if fmt == "f16" else "<f4").astype(np.float32)


def _coded(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, dict[str, Any], float]:
    """Entropy-coded symbols: blob, the header to store, and the order-0 bound in bits."""
    blob, header = encode_symbols(symbols, max(1, alphabet))
    bound = float(header.pop("entropy_bits"))
    return blob, header, bound


class EntropyCodec(Codec):
    """Float tensors and quantized weights in the smallest of several exact storages.

    Positions of the non-zeros (when there are zeros) are entropy-coded gaps; the non-zeros are
    stored as whichever is smallest of:

    - ``fl``: their float values (float16 when that is exact, e.g. small biases; else float32);
    - ``cb``: a codebook of the distinct values and each value's entropy-coded index into it: a
      clustered weight (``WeightClustering``) costs about its index entropy per non-zero;
    - ``rc``: one codebook per output channel (per-channel clustering);
    - ``q`` (quantized layers only): the integers fake quantization uses, entropy-coded through a
      table of the distinct ones, plus the scales.

    Every storage is exact: ``fl``, ``cb`` and ``rc`` give back the float weight bit for bit (a
    quantized layer then fake-quantizes it with the stored scales, as the saved model did), ``q``
    the fake-quantized weight. What it stored and at what cost against the order-0 entropy bound
    goes into ``context.stats``.
    """

    name = "ec"

    @override
    def accepts(self, key: str, tensor: torch.Tensor, context: EncodeContext) -> bool:
        quantizer = context.quantized.get(key)
        if quantizer is not None and quantizer.axis:
            # Output channels on another axis (Conv1D): the "q" codec stores those channel-first.
            return False
        return tensor.is_floating_point() or quantizer is not None

    @override
    def encode(
        self, key: str, tensor: torch.Tensor, context: EncodeContext, pools: _Pools
    ) -> dict[str, Any]:
        values = tensor.to(torch.float32).numpy().reshape(-1)
        shape = list(tensor.shape)
        common: list[tuple[str, str, np.ndarray]] = []
        common_entry: dict[str, Any] = {}
        quantizer = context.quantized.get(key)
        plans: list[_Plan] = []
        if quantizer is not None:
            zero_point = quantizer.weight_zero_point.cpu().numpy().astype(np.int8)
            common.append(("sc", "f32", quantizer.weight_scale.cpu().numpy().astype(np.float32)))
            if not quantizer.spec.symmetric:
                common.append(("zp", "i8", zero_point))
            common_entry["b"] = quantizer.spec.num_bits
            ints = quantizer.integer_weight().numpy().reshape(-1)
            plans.append(_int_plan(ints, zero_point))
        mask = values != 0
        plans.append(_float_plan(values, mask))
        kept = values[mask]
        distinct = np.unique(kept)
        if 0 < distinct.size <= min(_MAX_CODEBOOK, kept.size // 2):
            plans.append(_codebook_plan(kept, distinct, mask))
        if len(shape) >= 2 and shape[0] > 1 and values.size:
            row_plan = _row_codebook_plan(values.reshape(shape[0], -1), mask)
            if row_plan is not None:
                plans.append(row_plan)
        plan = min(plans, key=lambda p: p.nbytes)  # ties: the first, the simplest
        plan = _Plan({**common_entry, **plan.entry}, [*common, *plan.parts], plan.entropy_bits)
        plan.entropy_bits += sum(array.nbytes * 8 for _, _, array in common)
        context.stats[key] = {
            "codec": self.name,
            "storage": plan.entry["r"],
            "params": int(values.size),
            "nonzero": int(mask.sum()),
            "bits": plan.nbytes * 8,
            "entropy_bits": plan.entropy_bits,
        }
        return plan.commit(pools)

    @override
    def decode(self, entry: Mapping[str, Any], pools: Mapping[str, np.ndarray]) -> torch.Tensor:
        shape = list(entry["s"])
        count = math.prod(shape)
        if "p" in entry:
            mask = decode_positions(_read(pools, "u8", entry["p"]), entry["ph"], count)
        else:
            mask = np.ones(count, dtype=np.bool_)
        kept = int(mask.sum())
        storage = entry["r"]
        if storage == "q":
            return self._decode_ints(entry, pools, mask, shape).to(_dtype(entry))
        if storage == "fl":
            values = _read_floats(_read(pools, "u8", entry["v"]), entry["vf"])
        elif storage == "cb":
            book = _read_floats(_read(pools, "u8", entry["c"]), entry["cf"])
            index = decode_symbols(_read(pools, "u8", entry["i"]), entry["ih"])
            _check_index(index, book.size)
            values = book[index]
        elif storage == "rc":
            values = self._decode_rows(entry, pools, mask, shape)
        else:
            raise ValueError(f"unknown storage {storage!r} in an entry of codec {self.name!r}.")
        if values.size != kept:
            raise ValueError(f"corrupt entry: {values.size} values for {kept} non-zeros.")
        dense = np.zeros(count, dtype=np.float32)
        dense[mask] = values
        return torch.from_numpy(dense).reshape(shape).to(_dtype(entry))

    def _decode_rows(
        self,
        entry: Mapping[str, Any],
        pools: Mapping[str, np.ndarray],
        mask: np.ndarray,
        shape: list[int],
    ) -> np.ndarray:
        sizes = np.ascontiguousarray(_read(pools, "u8", entry["n"])).view("<u2").astype(np.int64)
        book = _read_floats(_read(pools, "u8", entry["c"]), entry["cf"])
        index = decode_symbols(_read(pools, "u8", entry["i"]), entry["ih"])
        if sizes.size != shape[0] or int(sizes.sum()) != book.size:
            raise ValueError("corrupt entry: row codebook sizes do not match the codebooks.")
        rows = np.flatnonzero(mask) // (mask.size // shape[0])
        if index.size != rows.size or bool((index >= sizes[rows]).any()):
            raise ValueError("corrupt entry: a row codebook index out of range.")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        values: np.ndarray = book[starts[rows] + index]
        return values

    def _decode_ints(
        self,
        entry: Mapping[str, Any],
        pools: Mapping[str, np.ndarray],
        mask: np.ndarray,
        shape: list[int],
    ) -> torch.Tensor:
        table = _read(pools, "i8", entry["t"]).astype(np.int32)
        index = decode_symbols(_read(pools, "u8", entry["i"]), entry["ih"])
        _check_index(index, table.size)
        scale_values = _read(pools, "f32", entry["sc"])
        channels = scale_values.size
        if "zp" in entry:
            zero_point = _read(pools, "i8", entry["zp"]).astype(np.int32)
        else:
            zero_point = np.zeros(channels, dtype=np.int32)
        ints = np.repeat(zero_point, mask.size // channels)
        if index.size != int(mask.sum()):
            raise ValueError(f"corrupt entry: {index.size} integers for {int(mask.sum())} kept.")
        ints[mask] = table[index]
        return _dequantize(ints, zero_point, scale_values, shape)


def _check_index(index: np.ndarray, size: int) -> None:
    if index.size and int(index.max()) >= size:
        raise ValueError(f"corrupt entry: a codebook index past its {size} entries.")


def _positions_part(
    mask: np.ndarray,
) -> tuple[dict[str, Any], list[tuple[str, str, np.ndarray]], float]:
    """Coded gaps between the non-zeros; nothing when every entry is kept."""
    if bool(mask.all()):
        return {}, [], 0.0
    blob, header = encode_positions(mask)
    bound = float(header.pop("entropy_bits"))
    return {"ph": header}, [("p", "u8", blob)], bound


def _float_plan(values: np.ndarray, mask: np.ndarray) -> _Plan:
    entry, parts, bound = _positions_part(mask)
    fmt, data = _float_bytes(values[mask])
    return _Plan(
        {"r": "fl", "vf": fmt, **entry}, [*parts, ("v", "u8", data)], bound + data.nbytes * 8
    )


def _codebook_plan(kept: np.ndarray, distinct: np.ndarray, mask: np.ndarray) -> _Plan:
    entry, parts, bound = _positions_part(mask)
    fmt, book = _float_bytes(distinct)
    blob, header, index_bound = _coded(np.searchsorted(distinct, kept), distinct.size)
    return _Plan(
        {"r": "cb", "cf": fmt, "ih": header, **entry},
        [*parts, ("c", "u8", book), ("i", "u8", blob)],
        bound + index_bound + book.nbytes * 8,
    )


def _row_codebook_plan(rows: np.ndarray, mask: np.ndarray) -> _Plan | None:
    """One codebook per output channel, when every channel has few distinct non-zeros."""
    kept_rows = rows.copy()
    kept_rows[~mask.reshape(rows.shape)] = np.inf  # pruned values sort last, out of the books
    ordered = np.sort(kept_rows, axis=1)
    new = np.ones_like(ordered, dtype=np.bool_)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    new &= np.isfinite(ordered)
    sizes = new.sum(axis=1)
    if int(sizes.max(initial=0)) > _MAX_ROW_CODEBOOK or int(sizes.sum()) * 2 > int(mask.sum()):
        return None
    books = [ordered[row][new[row]] for row in range(rows.shape[0])]
    index = np.concatenate(
        [
            np.searchsorted(books[row], rows[row][mask.reshape(rows.shape)[row]])
            for row in range(rows.shape[0])
        ]
    )
    entry, parts, bound = _positions_part(mask)
    fmt, book = _float_bytes(np.concatenate(books))
    blob, header, index_bound = _coded(index, int(sizes.max(initial=1)))
    counts = sizes.astype("<u2").view(np.uint8)
    return _Plan(
        {"r": "rc", "cf": fmt, "ih": header, **entry},
        [*parts, ("n", "u8", counts), ("c", "u8", book), ("i", "u8", blob)],
        bound + index_bound + (book.nbytes + counts.nbytes) * 8,
    )


def _int_plan(ints: np.ndarray, zero_point: np.ndarray) -> _Plan:
    mask = ints != np.repeat(zero_point, ints.size // zero_point.size)
    entry, parts, bound = _positions_part(mask)
    table, index = np.unique(ints[mask], return_inverse=True)
    blob, header, index_bound = _coded(index.reshape(-1), table.size)
    return _Plan(
        {"r": "q", "ih": header, **entry},
        [*parts, ("t", "i8", table.astype(np.int8)), ("i", "u8", blob)],
        bound + index_bound + table.size * 8,
    )


# Registration order is the order of preference, latest first: every float tensor is written by
# the entropy codec; "f" and "q" are kept to read files of versions 1 and 2.
for _codec in (RawCodec(), FloatCodec(), QuantizedCodec(), EntropyCodec()):
    register_codec(_codec)


def _codec_for(key: str, tensor: torch.Tensor, context: EncodeContext) -> Codec:
    for codec in reversed(CODECS.values()):
        if codec.accepts(key, tensor, context):
            return codec
    raise ValueError(f"no registered codec stores {key!r} ({tensor.dtype}).")


@dataclass
class CompressedFile:
    """What :func:`write_compressed` wrote: its size, and what each tensor cost.

    Attributes:
        bytes: the file's size.
        params: numbers in the ``state_dict`` (all tensors).
        tensors: per ``state_dict`` key, what its codec reported: ``storage``, ``params``,
            ``nonzero``, ``bits`` (stored, without the index) and ``entropy_bits`` (the order-0
            bound of what it coded, plus what it stored uncoded).
    """

    bytes: int
    params: int
    tensors: dict[str, dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """Plain data for a run's summary: bits per weight next to the entropy bound."""
        payload = sum(t["bits"] for t in self.tensors.values())
        bound = sum(t["entropy_bits"] for t in self.tensors.values())
        per_weight = {
            key: {
                **stats,
                "bits_per_weight": stats["bits"] / max(1, stats["params"]),
                "entropy_bits_per_weight": stats["entropy_bits"] / max(1, stats["params"]),
            }
            for key, stats in self.tensors.items()
        }
        return {
            "bytes": self.bytes,
            "params": self.params,
            "bits_per_weight": self.bytes * 8 / max(1, self.params),
            "payload_bits_per_weight": payload / max(1, self.params),
            "entropy_bits_per_weight": bound / max(1, self.params),
            "bits_over_entropy_bound": self.bytes * 8 / bound if bound else None,
            "tensors": per_weight,
        }


def save_compressed(module: nn.Module, path: str | Path) -> int:
    """Write ``module`` to ``path`` as a compact safetensors file; return its size in bytes.

    See :func:`write_compressed`.
    """
    return write_compressed(module, path).bytes


def write_compressed(module: nn.Module, path: str | Path) -> CompressedFile:
    """Write ``module`` to ``path`` as a compact safetensors file; say what each tensor cost.

    Each ``state_dict`` tensor goes to the first registered codec that accepts it (:data:`CODECS`):
    float tensors and quantized weights (layers with fake quantization on) to the entropy codec
    (:class:`EntropyCodec`: the smallest exact storage; a quantized weight gives back what the
    quantized model computes with), others as they are. The header records the format version;
    :func:`load_compressed` refuses newer ones.
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
    tensors = {**pools.tensors(), **pools.raw}
    # Uncoded parts (float values, codebooks, scales) have no checksum of their own.
    metadata["crc32"] = str(_checksum(tensors))
    save_file(tensors, str(path), metadata=metadata)
    params = sum(t.numel() for t in module.state_dict().values())
    return CompressedFile(Path(path).stat().st_size, params, dict(context.stats))


def _checksum(tensors: Mapping[str, np.ndarray]) -> int:
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(np.ascontiguousarray(tensors[key]).tobytes(), crc)
    return crc


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
    if "crc32" in metadata and str(_checksum(pools)) != metadata["crc32"]:
        raise ValueError(f"{path} is corrupt: the CRC-32 of its numbers does not match.")
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
