"""Entropy coding of sparse integer tensors for the compressed file format.

A sparse tensor becomes two symbol streams, as in Han et al., *Deep Compression* (2016):

- ``gaps``: for each kept position (row-major), the number of pruned positions since the previous
  kept one. Symbol ``s >= 1`` is a gap of ``s - 1``; symbol ``0`` is a *filler* meaning "``M``
  pruned positions and no kept one yet" (Deep Compression's filler zero, without spending a
  value on it), so gaps of any length need only ``M + 1`` symbols. ``M = 2**b - 1`` is chosen
  per tensor, ``b`` in 1..8, by the smallest Huffman size;
- ``values``: the kept integers (codebook indices, int8 codes, ...) minus their minimum.

Each stream is coded with canonical Huffman (the standard library has none) and also with zlib,
lzma and bz2 on the same symbols; the smallest wins and its name is recorded, so the codec never
loses to any of them. A Huffman stream is its code-length table (one byte per symbol of the
alphabet; the codes follow from the lengths) followed by the packed bits. Every stream carries a
CRC-32 in the metadata, so corruption is an error rather than silently different weights.

Metadata is plain JSON types (ints, strings, lists, floats): the exporter stores it in the
file's header. Each stream's entry also holds ``entropy_bits``, the order-0 Shannon bound of the
symbols it coded, so bits per weight can be reported next to the bound.
"""

from __future__ import annotations

import bz2
import heapq
import lzma
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "STREAM_CODECS",
    "decode_positions",
    "decode_sparse",
    "decode_symbols",
    "encode_positions",
    "encode_sparse",
    "encode_symbols",
    "entropy_bits",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
]

FORMAT_VERSION = 1
STREAM_CODECS = ("huffman", "zlib", "lzma", "bz2")
MAX_CODE_LENGTH = 32
MAX_ALPHABET = 1 << 16
# Raw LZMA2 has no container header (the xz container costs ~60 bytes, more than a small
# layer's whole stream); the filter chain is fixed here, so the decoder knows it.
# A 1 MiB dictionary instead of preset 9's 64 MiB: allocating that costs ~0.1 s per stream, and
# these streams are short or have no long-range repeats for it to find.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]


def entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 Shannon bound in bits: ``-sum(count * log2(count / n))`` over the symbols.

    No code that codes each symbol on its own from the stream's histogram can be shorter.
    """
    flat = np.asarray(symbols).ravel()
    if flat.size == 0:
        return 0.0
    counts = np.unique(flat, return_counts=True)[1].astype(np.float64)
    return float(-(counts * np.log2(counts / flat.size)).sum())


def huffman_code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length of each symbol (0 for symbols that never occur).

    Args:
        counts: Occurrences of symbols ``0..len(counts)-1``.
        max_length: Longest code allowed; counts are flattened (halved, keeping every used
            symbol at least 1) until the code fits, which only very skewed streams of tens of
            millions of symbols need.

    Returns:
        ``uint8`` lengths. A single used symbol gets length 1 (a code needs at least one bit).
    """
    counts = np.asarray(counts, dtype=np.int64)
    while True:
        lengths = _huffman_lengths(counts)
        if lengths.size == 0 or int(lengths.max()) <= max_length:
            return lengths
        counts = np.where(counts > 0, np.maximum(counts >> 1, 1), 0)


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Pack ``symbols`` with the canonical Huffman code of ``lengths`` (MSB first, zero padded).

    A code with a single symbol packs nothing: the decoder repeats it ``count`` times.

    Raises:
        ValueError: When a symbol has no code (length 0 or outside the alphabet).
    """
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint8)
    lengths = np.asarray(lengths, dtype=np.int64)
    if symbols.min() < 0 or symbols.max() >= lengths.size or (lengths[symbols] == 0).any():
        raise ValueError("A symbol to encode has no Huffman code.")
    if np.count_nonzero(lengths) == 1:
        return np.zeros(0, dtype=np.uint8)
    codes = _canonical_codes(lengths)
    symbol_lengths = lengths[symbols]
    symbol_codes = codes[symbols]
    starts = np.cumsum(symbol_lengths) - symbol_lengths
    bits = np.zeros(int(symbol_lengths.sum()), dtype=np.uint8)
    # One pass per bit position of the longest code, each over all symbols at once.
    for bit in range(int(symbol_lengths.max())):
        has_bit = symbol_lengths > bit
        shift = symbol_lengths[has_bit] - 1 - bit
        bits[starts[has_bit] + bit] = (symbol_codes[has_bit] >> shift) & 1
    return np.packbits(bits)


def huffman_decode(data: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols packed by :func:`huffman_encode` with the same ``lengths``.

    Every bit offset is decoded at once (vectorised); a short Python walk then follows the
    chain of code lengths from offset 0.

    Raises:
        ValueError: When the lengths are not a prefix code, the bits run out, a bit pattern
            matches no code, or more than the padding is left over.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    used = lengths[lengths > 0]
    if used.size == 0 or used.max() > MAX_CODE_LENGTH or np.sum(2.0**-used) > 1.0:
        raise ValueError("Corrupt Huffman stream: the code lengths are not a prefix code.")
    data = np.asarray(data, dtype=np.uint8)
    if used.size == 1:
        if data.size:
            raise ValueError("Corrupt Huffman stream: bits after a one-symbol code.")
        return np.full(count, int(np.flatnonzero(lengths)[0]), dtype=np.int64)
    bits = np.unpackbits(data)
    longest = int(used.max())
    padded = np.concatenate([bits, np.zeros(longest, dtype=np.uint8)]).astype(np.int64)
    window = np.zeros(bits.size, dtype=np.int64)
    for bit in range(longest):
        window = (window << 1) | padded[bit : bit + bits.size]

    # Canonical code: the codes of one length are consecutive integers, in symbol order.
    per_length = np.bincount(used, minlength=longest + 1)
    ordered = np.lexsort((np.arange(lengths.size), lengths))[lengths.size - used.size :]
    first_code = _first_codes(per_length)
    first_index = np.concatenate([[0], np.cumsum(per_length)])[:-1]
    decoded = np.full(bits.size, -1, dtype=np.int64)
    step = np.zeros(bits.size, dtype=np.int64)
    for length in range(1, longest + 1):
        index = (window >> (longest - length)) - first_code[length]
        match = (decoded < 0) & (index >= 0) & (index < per_length[length])
        decoded[match] = ordered[first_index[length] + index[match]]
        step[match] = length

    symbols = np.empty(count, dtype=np.int64)
    decoded_list, step_list = decoded.tolist(), step.tolist()
    position = 0
    for i in range(count):
        if position >= bits.size or decoded_list[position] < 0:
            raise ValueError(
                f"Corrupt or truncated Huffman stream: symbol {i} of {count} at bit {position} "
                f"of {bits.size}."
            )
        symbols[i] = decoded_list[position]
        position += step_list[position]
    if position > bits.size or bits.size - position >= 8:
        raise ValueError(
            f"Corrupt Huffman stream: {count} symbols end at bit {position} of {bits.size}."
        )
    return symbols


def encode_symbols(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Code a stream of symbols in ``[0, alphabet)`` with the smallest of ``STREAM_CODECS``.

    Returns:
        ``(blob, header)``: the ``uint8`` blob and a header with ``codec``, ``alphabet``,
        ``count``, ``crc32`` and ``entropy_bits``.
    """
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    lengths = huffman_code_lengths(np.bincount(symbols, minlength=alphabet))
    candidates = {"huffman": np.concatenate([lengths, huffman_encode(symbols, lengths)])}
    raw = _symbol_bytes(symbols, alphabet)
    candidates["zlib"] = _as_array(zlib.compress(raw, 9))
    candidates["lzma"] = _as_array(
        lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    )
    candidates["bz2"] = _as_array(bz2.compress(raw, 9))
    # Ties go to the first codec listed: Huffman decodes without a decompressor's buffers.
    codec = min(STREAM_CODECS, key=lambda name: candidates[name].size)
    blob = candidates[codec]
    header = {
        "codec": codec,
        "alphabet": alphabet,
        "count": int(symbols.size),
        "crc32": zlib.crc32(blob.tobytes()),
        "entropy_bits": entropy_bits(symbols),
    }
    return blob, header


def decode_symbols(blob: np.ndarray, header: Mapping[str, Any]) -> np.ndarray:
    """Invert :func:`encode_symbols`.

    Raises:
        ValueError: On a checksum mismatch, an unknown codec, or a stream that does not decode
            to ``count`` symbols in ``[0, alphabet)``.
    """
    codec = _field(header, "codec", str)
    alphabet = _field(header, "alphabet", int)
    count = _field(header, "count", int)
    blob = np.asarray(blob, dtype=np.uint8).ravel()
    if zlib.crc32(blob.tobytes()) != _field(header, "crc32", int):
        raise ValueError(f"Corrupt {codec} stream: CRC-32 mismatch ({blob.size} bytes).")
    if codec == "huffman":
        if blob.size < alphabet:
            raise ValueError(
                f"Truncated Huffman stream: {blob.size} bytes, shorter than its "
                f"{alphabet}-entry code-length table."
            )
        return huffman_decode(blob[alphabet:], blob[:alphabet], count)
    decompressors: dict[str, Callable[[bytes], bytes]] = {
        "zlib": lambda data: zlib.decompress(data),
        "lzma": lambda data: lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
        "bz2": bz2.decompress,
    }
    decompress = decompressors.get(codec)
    if decompress is None:
        raise ValueError(f"Unknown stream codec {codec!r}; known: {', '.join(STREAM_CODECS)}.")
    try:
        raw = decompress(blob.tobytes())
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as error:
        raise ValueError(f"Corrupt {codec} stream: {error}") from error
    dtype = _symbol_dtype(alphabet)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"Corrupt {codec} stream: {len(raw)} bytes for {count} symbols.")
    symbols = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    if symbols.size and symbols.max() >= alphabet:
        raise ValueError(f"Corrupt {codec} stream: a symbol outside [0, {alphabet}).")
    return symbols


def encode_sparse(
    values: np.ndarray, mask: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Entropy-code a sparse integer tensor given as its kept values and its mask.

    Args:
        values: 1-D integer array of the kept entries in row-major order of ``mask``
            (``tensor[mask]``), e.g. codebook indices or int8 codes.
        mask: Bool array of the tensor's shape, ``True`` where a value is kept.

    Returns:
        ``(streams, metadata)``: ``streams`` maps ``"gaps"`` and ``"values"`` to ``uint8``
        arrays; ``metadata`` holds the shape, the count, the values' dtype and offset, the gap
        filler ``max_gap`` and one header per stream (see :func:`encode_symbols`).

    Raises:
        ValueError: When ``mask`` is not bool, ``values`` is not a 1-D integer array with one
            entry per kept position, or the values span more than 65536 integers.
    """
    mask = np.asarray(mask)
    values = np.asarray(values)
    if mask.dtype != np.bool_:
        raise ValueError(f"`mask` must be a bool array; got {mask.dtype}.")
    kept = int(mask.sum())
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer) or values.size != kept:
        raise ValueError(
            f"`values` must be a 1-D integer array with one entry per kept position ({kept}); "
            f"got {values.dtype} {values.shape}."
        )
    offset = int(values.min()) if kept else 0
    value_symbols = values.astype(np.int64) - offset
    value_alphabet = int(value_symbols.max()) + 1 if kept else 0
    if value_alphabet > MAX_ALPHABET:
        raise ValueError(
            f"`values` span {value_alphabet} integers; at most {MAX_ALPHABET} can be coded."
        )
    positions = np.flatnonzero(mask.ravel())
    gaps = np.diff(positions, prepend=-1) - 1
    max_gap = _best_max_gap(gaps)
    gap_blob, gap_header = encode_symbols(_gap_symbols(gaps, max_gap), max_gap + 1)
    value_blob, value_header = encode_symbols(value_symbols, value_alphabet)
    metadata = {
        "version": FORMAT_VERSION,
        "shape": [int(size) for size in mask.shape],
        "nnz": kept,
        "value_dtype": values.dtype.str,
        "value_offset": offset,
        "max_gap": max_gap,
        "gaps": gap_header,
        "values": value_header,
    }
    return {"gaps": gap_blob, "values": value_blob}, metadata


def decode_sparse(
    streams: Mapping[str, np.ndarray], metadata: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Invert :func:`encode_sparse` exactly.

    Returns:
        ``(values, mask)``: the kept values in their original dtype and the bool mask.

    Raises:
        ValueError: When a stream or a metadata field is missing, corrupt or truncated, or the
            streams disagree with the metadata.
    """
    version = _field(metadata, "version", int)
    if version != FORMAT_VERSION:
        raise ValueError(f"Sparse stream version {version}; this reader knows {FORMAT_VERSION}.")
    shape = tuple(_field(metadata, "shape", list))
    kept = _field(metadata, "nnz", int)
    max_gap = _field(metadata, "max_gap", int)
    offset = _field(metadata, "value_offset", int)
    try:
        dtype = np.dtype(_field(metadata, "value_dtype", str))
    except TypeError as error:
        raise ValueError(f"Sparse stream metadata: bad value_dtype ({error}).") from error
    if not np.issubdtype(dtype, np.integer) or max_gap < 1:
        raise ValueError(f"Sparse stream metadata: value_dtype={dtype}, max_gap={max_gap}.")
    size = math.prod(shape)
    for name in ("gaps", "values"):
        if name not in streams:
            raise ValueError(f"Sparse tensor without its {name!r} stream.")

    gap_symbols = decode_symbols(streams["gaps"], _field(metadata, "gaps", dict))
    positions = _positions(gap_symbols, max_gap)
    if positions.size != kept or (kept and positions[-1] >= size):
        raise ValueError(
            f"Corrupt gaps stream: {positions.size} kept positions up to "
            f"{positions[-1] if positions.size else -1}, expected {kept} within {size}."
        )
    values = decode_symbols(streams["values"], _field(metadata, "values", dict))
    if values.size != kept:
        raise ValueError(f"Corrupt values stream: {values.size} values for nnz={kept}.")
    values = values + offset
    if kept and (values.min() < np.iinfo(dtype).min or values.max() > np.iinfo(dtype).max):
        raise ValueError(f"Corrupt values stream: values outside {dtype}.")
    mask = np.zeros(size, dtype=np.bool_)
    mask[positions] = True
    return values.astype(dtype), mask.reshape(shape)


def encode_positions(mask: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Entropy-code where a flat bool ``mask`` is ``True``, as coded gaps (see the module doc).

    The positions half of :func:`encode_sparse`, for values stored another way (floats).

    Returns:
        ``(blob, header)``: the ``uint8`` blob and the stream's header (:func:`encode_symbols`)
        with ``max_gap`` added.
    """
    positions = np.flatnonzero(np.asarray(mask, dtype=np.bool_).ravel())
    gaps = np.diff(positions, prepend=-1) - 1
    max_gap = _best_max_gap(gaps)
    blob, header = encode_symbols(_gap_symbols(gaps, max_gap), max_gap + 1)
    return blob, {**header, "max_gap": max_gap}


def decode_positions(blob: np.ndarray, header: Mapping[str, Any], size: int) -> np.ndarray:
    """The flat bool mask of ``size`` entries that :func:`encode_positions` coded.

    Raises:
        ValueError: a corrupt or truncated stream, or positions past ``size``.
    """
    max_gap = _field(header, "max_gap", int)
    if max_gap < 1:
        raise ValueError(f"Positions stream metadata: max_gap={max_gap}.")
    positions = _positions(decode_symbols(blob, header), max_gap)
    if positions.size and positions[-1] >= size:
        raise ValueError(f"Corrupt gaps stream: a position {positions[-1]} past {size} entries.")
    mask = np.zeros(size, dtype=np.bool_)
    mask[positions] = True
    return mask


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Plain Huffman code lengths by merging the two rarest nodes (ties by node id)."""
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts > 0)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    heap = [(int(counts[symbol]), int(symbol)) for symbol in used]
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    next_node = counts.size
    while len(heap) > 1:
        weight_a, node_a = heapq.heappop(heap)
        weight_b, node_b = heapq.heappop(heap)
        parent[node_a] = parent[node_b] = next_node
        heapq.heappush(heap, (weight_a + weight_b, next_node))
        next_node += 1
    # Internal nodes are numbered in creation order, so a node's parent has a larger id:
    # walking ids downwards, every parent's depth is known before its children's.
    depth = {next_node - 1: 0}
    for node in range(next_node - 2, -1, -1):
        if node in parent:
            depth[node] = depth[parent[node]] + 1
    lengths[used] = [depth[int(symbol)] for symbol in used]
    return lengths


def _first_codes(per_length: np.ndarray) -> np.ndarray:
    """First canonical code of each length (DEFLATE's rule)."""
    first = np.zeros(per_length.size, dtype=np.int64)
    code = 0
    # per_length[0] counts unused symbols: no code has length 0, so it must not shift codes.
    for length in range(2, per_length.size):
        code = (code + int(per_length[length - 1])) << 1
        first[length] = code
    return first


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Code of each symbol: codes of one length are consecutive, in symbol order."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    used = lengths > 0
    per_length = np.bincount(lengths[used], minlength=int(lengths.max()) + 1)
    first = _first_codes(per_length)
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    ordered_lengths = lengths[order]
    # Rank of each symbol among those of its length.
    rank = np.arange(order.size) - np.searchsorted(ordered_lengths, ordered_lengths)
    codes[order] = first[ordered_lengths] + rank
    return codes


def _gap_symbols(gaps: np.ndarray, max_gap: int) -> np.ndarray:
    """Gaps as symbols: ``gap // max_gap`` fillers (0) then ``gap % max_gap + 1``."""
    fillers = gaps // max_gap
    symbols = np.zeros(int(fillers.sum()) + gaps.size, dtype=np.int64)
    symbols[np.cumsum(fillers + 1) - 1] = gaps % max_gap + 1
    return symbols


def _positions(symbols: np.ndarray, max_gap: int) -> np.ndarray:
    """Kept positions from gap symbols (inverse of :func:`_gap_symbols`)."""
    ends = np.flatnonzero(symbols != 0)
    if symbols.size and (ends.size == 0 or ends[-1] != symbols.size - 1):
        raise ValueError("Corrupt gaps stream: it ends with filler symbols.")
    fillers = np.diff(ends, prepend=-1) - 1
    gaps = symbols[ends] - 1 + fillers * max_gap
    return np.cumsum(gaps + 1) - 1


def _best_max_gap(gaps: np.ndarray) -> int:
    """The filler length ``2**b - 1`` (b in 1..8) whose Huffman-coded gaps are smallest."""
    best, best_size = 1, math.inf
    for bits in range(1, 9):
        max_gap = (1 << bits) - 1
        counts = np.bincount(gaps % max_gap + 1, minlength=max_gap + 1)
        counts[0] = int((gaps // max_gap).sum())
        lengths = huffman_code_lengths(counts).astype(np.int64)
        size = max_gap + 1 + math.ceil(int((counts * lengths).sum()) / 8)
        if size < best_size:
            best, best_size = max_gap, size
    return best


def _symbol_dtype(alphabet: int) -> np.dtype:
    return np.dtype(np.uint8) if alphabet <= 256 else np.dtype("<u2")


def _symbol_bytes(symbols: np.ndarray, alphabet: int) -> bytes:
    return symbols.astype(_symbol_dtype(alphabet)).tobytes()


def _as_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def _field(mapping: Mapping[str, Any], key: str, kind: type) -> Any:
    """``mapping[key]`` checked to be a ``kind``; a clear ValueError when it is not."""
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise ValueError(f"Sparse stream metadata without {key!r}.")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"Sparse stream metadata {key!r}={value!r} is not a {kind.__name__}.")
    return value
