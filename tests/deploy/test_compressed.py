from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from lightning_sparse.callbacks import (
    MagnitudePruning,
    QuantizationAwareTraining,
    WeightClustering,
)
from lightning_sparse.core.fake_quant import quantized_layers
from lightning_sparse.deploy import compressed
from lightning_sparse.deploy.compressed import (
    CODECS,
    dense_bytes,
    load_compressed,
    save_compressed,
    write_compressed,
)
from tests.helpers import TinyData, TinyModule, quiet_trainer

WEIGHTS = ("model.conv1.weight", "model.fc1.weight", "model.fc2.weight")


def _train(*callbacks: pl.Callback, max_epochs: int = 4) -> TinyModule:
    pl.seed_everything(0)
    module = TinyModule()
    quiet_trainer(max_epochs=max_epochs, callbacks=list(callbacks)).fit(module, TinyData())
    return module.eval()


def _pruned_clustered(per_channel: bool = False, qat: bool = False) -> TinyModule:
    callbacks: list[pl.Callback] = [
        MagnitudePruning(final_sparsity=0.8, start_epoch=0, end_epoch=1, update_frequency=0.5),
        WeightClustering(
            num_clusters=8, start_epoch=1.5, per_channel=per_channel, centroid_lr=1e-2
        ),
    ]
    if qat:
        callbacks.append(QuantizationAwareTraining(start_epoch=2.5))
    return _train(*callbacks)


def _fresh() -> TinyModule:
    pl.seed_everything(1)
    return TinyModule().eval()


def _assert_same(module: TinyModule, restored: TinyModule, weights_exact: bool = True) -> None:
    x = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module(x), restored(x))
    if weights_exact:
        for (name, a), b in zip(
            module.state_dict().items(), restored.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name


def test_a_trained_pruned_clustered_model_round_trips_bit_exactly(tmp_path: Path) -> None:
    module = _pruned_clustered()
    written = write_compressed(module, tmp_path / "c.safetensors")
    restored = load_compressed(tmp_path / "c.safetensors", _fresh())
    _assert_same(module, restored)
    for name in WEIGHTS:
        stats = written.tensors[name]
        assert stats["storage"] == "cb", name
        assert stats["nonzero"] == int((module.state_dict()[name] != 0).sum())
        # Gaps and indices cost about their order-0 entropy, plus Huffman tables and a codebook.
        assert stats["entropy_bits"] <= stats["bits"] <= 1.25 * stats["entropy_bits"] + 600, name
    summary = written.summary()
    assert summary["bytes"] == (tmp_path / "c.safetensors").stat().st_size
    assert summary["bits_per_weight"] == pytest.approx(summary["bytes"] * 8 / summary["params"])
    assert summary["entropy_bits_per_weight"] <= summary["payload_bits_per_weight"]
    assert summary["tensors"]["model.fc1.weight"]["bits_per_weight"] < 2.0
    json.dumps(summary)  # plain data for summary.json


def test_clustering_beats_the_version_2_storage(tmp_path: Path, monkeypatch: Any) -> None:
    module = _pruned_clustered()
    size = save_compressed(module, tmp_path / "v3.safetensors")
    monkeypatch.delitem(CODECS, "ec")
    monkeypatch.setattr(compressed, "COMPRESSED_VERSION", 2)
    legacy = save_compressed(module, tmp_path / "v2.safetensors")
    assert size * 1.5 < legacy
    assert dense_bytes(module) / size > 7


def test_per_channel_codebooks_are_stored_per_row(tmp_path: Path) -> None:
    module = _pruned_clustered(per_channel=True)
    written = write_compressed(module, tmp_path / "c.safetensors")
    assert written.tensors["model.fc1.weight"]["storage"] == "rc"
    _assert_same(module, load_compressed(tmp_path / "c.safetensors", _fresh()))


def test_clustered_then_quantized_weights_round_trip_with_their_scales(tmp_path: Path) -> None:
    module = _pruned_clustered(qat=True)
    assert quantized_layers(module)
    written = write_compressed(module, tmp_path / "c.safetensors")
    # The shared float values and the scales ("cb": fake quantization gives the codes back), or the
    # int8 codes themselves ("q"), whichever is smaller.
    storages = {name: written.tensors[name]["storage"] for name in WEIGHTS}
    assert set(storages.values()) <= {"cb", "q"}
    restored = load_compressed(tmp_path / "c.safetensors", _fresh())
    assert set(quantized_layers(restored)) == set(quantized_layers(module))
    _assert_same(module, restored, weights_exact=False)
    for name, storage in storages.items():
        same = torch.equal(module.state_dict()[name], restored.state_dict()[name])
        assert same == (storage == "cb"), name
    for name, layer in quantized_layers(module).items():
        other = quantized_layers(restored)[name]
        assert torch.equal(layer.integer_weight(), other.integer_weight()), name
        assert torch.equal(layer.weight_scale, other.weight_scale), name


def test_plain_sparse_int8_weights_are_stored_as_coded_integers(tmp_path: Path) -> None:
    module = _train(
        MagnitudePruning(final_sparsity=0.9, start_epoch=0, end_epoch=1, update_frequency=0.5),
        QuantizationAwareTraining(start_epoch=1.5),
        max_epochs=3,
    )
    written = write_compressed(module, tmp_path / "c.safetensors")
    assert written.tensors["model.fc1.weight"]["storage"] == "q"
    restored = load_compressed(tmp_path / "c.safetensors", _fresh())
    _assert_same(module, restored, weights_exact=False)
    for name, layer in quantized_layers(module).items():
        assert torch.equal(
            layer.integer_weight(), quantized_layers(restored)[name].integer_weight()
        )


def test_small_float_tensors_are_half_precision_only_when_exact(tmp_path: Path) -> None:
    module = _fresh()
    with torch.no_grad():
        module.model.fc2.bias.copy_(torch.tensor([0.5, -1.25, 3.0, 2.0]))  # exact in float16
    written = write_compressed(module, tmp_path / "c.safetensors")
    restored = load_compressed(tmp_path / "c.safetensors", _fresh())
    _assert_same(module, restored)
    assert written.tensors["model.fc2.bias"]["storage"] == "fl"
    assert written.tensors["model.fc2.bias"]["bits"] == 4 * 16  # no zeros: no positions
    with safe_open(str(tmp_path / "c.safetensors"), framework="np") as handle:
        index = json.loads(handle.metadata()["index"])
    assert index["model.fc2.bias"]["vf"] == "f16"
    assert index["model.fc1.bias"]["vf"] == "f32"  # trained floats: kept as they are


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    layer = torch.nn.Linear(6, 5).to(dtype)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.2] = 0
    save_compressed(layer, tmp_path / "c.safetensors")
    restored = load_compressed(tmp_path / "c.safetensors", torch.nn.Linear(6, 5).to(dtype))
    for key, value in layer.state_dict().items():
        assert restored.state_dict()[key].dtype == dtype
        if dtype is not torch.float64:  # stored as float32: exact for the narrower types
            assert torch.equal(restored.state_dict()[key], value), key


def test_all_zero_and_empty_tensors(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 0))
    with torch.no_grad():
        module[0].weight.zero_()
    save_compressed(module, tmp_path / "c.safetensors")
    restored = load_compressed(
        tmp_path / "c.safetensors",
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 0)),
    )
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def _rewrite(path: Path, change: Any) -> None:
    with safe_open(str(path), framework="np") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    change(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("version", [1, 2])
def test_files_of_versions_1_and_2_are_still_read(
    tmp_path: Path, monkeypatch: Any, version: int
) -> None:
    module = _train(
        MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, update_frequency=0.5),
        max_epochs=2,
    )
    module.register_buffer("steps", torch.tensor([7]))  # a raw tensor, stored under its name
    with monkeypatch.context() as patch:
        patch.delitem(CODECS, "ec")
        patch.setattr(compressed, "COMPRESSED_VERSION", 2)
        save_compressed(module, tmp_path / "old.safetensors")

    def as_version_1(metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> None:
        index = json.loads(metadata["index"])
        for entry in index.values():
            entry.pop("k", None)  # version 1 did not name a raw tensor's key
        metadata.update(version="1", index=json.dumps(index))

    if version == 1:
        _rewrite(tmp_path / "old.safetensors", as_version_1)
    fresh = _fresh()
    fresh.register_buffer("steps", torch.tensor([0]))
    restored = load_compressed(tmp_path / "old.safetensors", fresh)
    _assert_same(module, restored)


def test_a_newer_version_and_an_unknown_codec_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_compressed(_fresh(), path)
    _rewrite(path, lambda metadata, _: metadata.update(version="4"))
    with pytest.raises(ValueError, match=r"format version 4, newer than this lightning_sparse"):
        load_compressed(path, _fresh())

    def unknown_codec(metadata: dict[str, str], _: Any) -> None:
        index = json.loads(metadata["index"])
        index["model.fc1.weight"]["e"] = "zz"
        metadata.update(version="3", index=json.dumps(index))

    _rewrite(path, unknown_codec)
    with pytest.raises(ValueError, match=r"'model.fc1.weight' is stored with codec 'zz'"):
        load_compressed(path, _fresh())


def test_a_corrupt_stream_is_an_error_not_other_weights(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_compressed(_pruned_clustered(), path)

    def flip(_: Any, tensors: dict[str, np.ndarray]) -> None:
        tensors["u8"] = tensors["u8"].copy()
        tensors["u8"][len(tensors["u8"]) // 2] ^= 0xFF

    _rewrite(path, flip)
    with pytest.raises(ValueError, match=r"is corrupt: the CRC-32 of its numbers"):
        load_compressed(path, _fresh())
