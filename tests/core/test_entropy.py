from __future__ import annotations

import bz2
import copy
import lzma
import zlib

import numpy as np
import pytest

from lightning_sparse.core.entropy import (
    STREAM_CODECS,
    decode_sparse,
    decode_symbols,
    encode_sparse,
    encode_symbols,
    entropy_bits,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
)


def _sparse(
    sparsity: float, shape: tuple[int, ...] = (120, 150), distinct: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) >= sparsity
    # Codebook indices drawn unevenly, as k-means clusters of a bell-shaped weight are.
    probabilities = np.exp(-0.5 * ((np.arange(distinct) - distinct / 2) / (distinct / 5)) ** 2)
    values = rng.choice(distinct, int(mask.sum()), p=probabilities / probabilities.sum())
    return values.astype(np.uint8), mask


def _stream_bytes(streams: dict[str, np.ndarray]) -> int:
    return sum(blob.size for blob in streams.values())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int64])
def test_round_trip_is_exact(sparsity: float, dtype: type) -> None:
    values, mask = _sparse(sparsity)
    values = (values.astype(np.int64) - (8 if dtype is np.int8 else 0)).astype(dtype)
    streams, metadata = encode_sparse(values, mask)
    assert all(blob.dtype == np.uint8 for blob in streams.values())
    decoded_values, decoded_mask = decode_sparse(streams, metadata)
    assert np.array_equal(decoded_mask, mask)
    assert decoded_values.dtype == values.dtype
    assert np.array_equal(decoded_values, values)


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 4, 5)])
def test_round_trip_all_zero_and_odd_shapes(shape: tuple[int, ...]) -> None:
    mask = np.zeros(shape, dtype=bool)
    streams, metadata = encode_sparse(np.zeros(0, dtype=np.int8), mask)
    assert _stream_bytes(streams) <= 2
    values, decoded_mask = decode_sparse(streams, metadata)
    assert values.size == 0
    assert decoded_mask.shape == shape
    assert not decoded_mask.any()


def test_long_gaps_are_escaped_with_fillers() -> None:
    mask = np.zeros(100_000, dtype=bool)
    mask[[0, 1, 300, 70_000, 99_999]] = True
    values = np.array([3, -1, 0, 127, -128], dtype=np.int8)
    streams, metadata = encode_sparse(values, mask)
    assert metadata["max_gap"] <= 255
    decoded_values, decoded_mask = decode_sparse(streams, metadata)
    assert np.array_equal(decoded_mask, mask)
    assert np.array_equal(decoded_values, values)


def test_metadata_is_plain_json_types() -> None:
    import json

    _, metadata = encode_sparse(*_sparse(0.9))
    assert json.loads(json.dumps(metadata)) == metadata
    assert metadata["gaps"]["codec"] in STREAM_CODECS
    assert metadata["values"]["entropy_bits"] > 0


@pytest.mark.parametrize("seed", range(4))
def test_huffman_is_within_one_bit_of_the_entropy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    alphabet = int(rng.integers(2, 300))
    symbols = rng.choice(alphabet, 20_000, p=rng.dirichlet(np.full(alphabet, 0.3)))
    lengths = huffman_code_lengths(np.bincount(symbols, minlength=alphabet))
    average = float(lengths[symbols].astype(np.float64).mean())
    bound = entropy_bits(symbols) / symbols.size
    assert bound <= average < bound + 1
    packed = huffman_encode(symbols, lengths)
    assert packed.size == -(-int(lengths[symbols].astype(np.int64).sum()) // 8)
    assert np.array_equal(huffman_decode(packed, lengths, symbols.size), symbols)


def test_entropy_bits_of_known_distributions() -> None:
    assert entropy_bits(np.zeros(10, dtype=np.int64)) == 0.0
    assert entropy_bits(np.array([0, 1] * 8)) == pytest.approx(16.0)
    assert entropy_bits(np.arange(8)) == pytest.approx(24.0)
    assert entropy_bits(np.zeros(0)) == 0.0


def test_code_lengths_are_limited() -> None:
    # Fibonacci counts give the deepest Huffman tree: 40 symbols would need 39-bit codes.
    fibonacci = [1, 1]
    while len(fibonacci) < 40:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    lengths = huffman_code_lengths(np.array(fibonacci), max_length=16)
    assert int(lengths.max()) <= 16
    assert np.sum(2.0 ** -lengths.astype(np.float64)) <= 1.0


def test_a_one_symbol_stream_costs_only_its_table() -> None:
    blob, header = encode_symbols(np.full(5000, 2), alphabet=3)
    assert header["codec"] == "huffman"
    assert blob.size == 3
    assert np.array_equal(decode_symbols(blob, header), np.full(5000, 2))


@pytest.mark.parametrize("sparsity", [0.5, 0.95, 0.999])
def test_never_larger_than_the_standard_library(sparsity: float) -> None:
    values, mask = _sparse(sparsity)
    streams, metadata = encode_sparse(values, mask)
    raw_mask = np.packbits(mask).tobytes()
    raw_values = values.tobytes()
    for compress in (
        lambda data: zlib.compress(data, 9),
        lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
        lambda data: bz2.compress(data, 9),
    ):
        assert _stream_bytes(streams) <= len(compress(raw_mask)) + len(compress(raw_values))
    assert metadata["gaps"]["codec"] in STREAM_CODECS


def test_95_percent_sparse_16_values_beats_bitmask_plus_4_bits() -> None:
    values, mask = _sparse(0.95, shape=(300, 200))
    streams, _ = encode_sparse(values, mask)
    assert _stream_bytes(streams) * 8 < mask.size + 4 * values.size


def _corrupt_by_flipping(streams: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    corrupted = {key: blob.copy() for key, blob in streams.items()}
    corrupted[name][len(corrupted[name]) // 2] ^= 0x5A
    return corrupted


@pytest.mark.parametrize("name", ["gaps", "values"])
def test_corrupted_stream_raises(name: str) -> None:
    streams, metadata = encode_sparse(*_sparse(0.8))
    with pytest.raises(ValueError, match=f"Corrupt {metadata[name]['codec']} stream: CRC-32"):
        decode_sparse(_corrupt_by_flipping(streams, name), metadata)


@pytest.mark.parametrize("name", ["gaps", "values"])
def test_truncated_stream_raises(name: str) -> None:
    streams, metadata = encode_sparse(*_sparse(0.8))
    truncated = dict(streams, **{name: streams[name][: streams[name].size // 2]})
    with pytest.raises(ValueError, match="Corrupt"):
        decode_sparse(truncated, metadata)


@pytest.mark.parametrize("codec", ["huffman", "zlib", "lzma", "bz2"])
def test_each_codec_detects_truncation_without_the_checksum(codec: str) -> None:
    """The checksum is the first line of defence; each decoder also refuses a short stream."""
    symbols = np.random.default_rng(0).integers(0, 200, 3000)
    raw = symbols.astype(np.uint8).tobytes()
    blobs = {
        "zlib": zlib.compress(raw),
        "lzma": lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]),
        "bz2": bz2.compress(raw),
    }
    if codec == "huffman":
        lengths = huffman_code_lengths(np.bincount(symbols, minlength=200))
        blob = np.concatenate([lengths, huffman_encode(symbols, lengths)])
    else:
        blob = np.frombuffer(blobs[codec], dtype=np.uint8)
    short = blob[: blob.size // 2]
    header = {"codec": codec, "alphabet": 200, "count": 3000, "crc32": zlib.crc32(short)}
    with pytest.raises(ValueError, match=f"(?i)(corrupt|truncated).* {codec} stream"):
        decode_symbols(short, header)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda metadata: metadata.pop("nnz"), "without 'nnz'"),
        (lambda metadata: metadata.update(version=99), "version 99"),
        (lambda metadata: metadata.update(nnz=metadata["nnz"] + 1), "Corrupt gaps stream"),
        (lambda metadata: metadata.update(shape=[2, 2]), "within 4"),
        (lambda metadata: metadata["values"].update(codec="zstd"), "Unknown stream codec"),
    ],
)
def test_inconsistent_metadata_raises(edit: object, message: str) -> None:
    streams, metadata = encode_sparse(*_sparse(0.8))
    edited = copy.deepcopy(metadata)
    edit(edited)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        decode_sparse(streams, edited)


@pytest.mark.parametrize(
    ("values", "mask", "message"),
    [
        (np.zeros(3, dtype=np.int8), np.ones(4, dtype=bool), r"one entry per kept position \(4\)"),
        (np.zeros(4, dtype=np.float32), np.ones(4, dtype=bool), "integer array"),
        (np.zeros(4, dtype=np.int8), np.ones(4, dtype=np.uint8), "`mask` must be a bool"),
        (np.array([0, 1 << 20]), np.ones(2, dtype=bool), "at most 65536"),
    ],
)
def test_invalid_inputs_are_named(values: np.ndarray, mask: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_sparse(values, mask)


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.98, 1.0])
def test_positions_round_trip_and_cost_about_their_entropy(sparsity: float) -> None:
    from lightning_sparse.core.entropy import decode_positions, encode_positions

    _, mask = _sparse(sparsity, shape=(300, 200))
    blob, header = encode_positions(mask)
    assert np.array_equal(decode_positions(blob, header, mask.size), mask.ravel())
    if 0 < sparsity < 1:
        # Order-0 bound of the bitmask, n * H(p): gaps code close to it.
        p = float(mask.mean())
        bound = mask.size * -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) / 8
        assert blob.size < 1.1 * bound + 300
    if mask.any():
        last = int(np.flatnonzero(mask.ravel())[-1])
        with pytest.raises(ValueError, match="past"):
            decode_positions(blob, header, last)
