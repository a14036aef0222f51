"""torchvision data sets and image folders, read from fixture files the tests write."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from lightning_sparse.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from lightning_sparse.data.base import stratified_split
from lightning_sparse.data.resumable import ResumableSampler
from tests.stage_helpers import one_thread, write_cifar10, write_image_folder, write_mnist

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

MNIST_LIKE = [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")]


def _labels(split: object) -> list[int]:
    return [int(label) for _, label in split]


@pytest.mark.parametrize(("module", "folder"), MNIST_LIKE)
def test_mnist_format_reads_splits_and_normalises(
    tmp_path: Path, module: type[MNISTDataModule], folder: str
) -> None:
    write_mnist(tmp_path, folder, train=60, test=20)
    datamodule = module(root=tmp_path, download=False, batch_size=16, val_fraction=0.2)
    datamodule.setup()
    assert datamodule.num_classes == 10
    assert datamodule.input_shape == (1, 28, 28)
    sizes = [len(s) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set)]
    assert sizes == [50, 10, 20]  # 6 per class, 20% of them: 1 per class
    # Stratified: the validation split holds every class.
    assert sorted(set(_labels(datamodule.val_set))) == list(range(10))
    inputs, labels = next(iter(datamodule.train_dataloader()))
    assert inputs.shape == (16, 1, 28, 28)
    assert inputs.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert isinstance(datamodule.train_dataloader().sampler, ResumableSampler)
    # The image pixels come back exactly: standardised with the data set's mean and std.
    raw = torchvision.datasets.MNIST if folder == "MNIST" else torchvision.datasets.FashionMNIST
    first = raw(str(tmp_path), train=False).data[0].float() / 255
    image, _ = datamodule.test_set[0]
    torch.testing.assert_close(image[0], (first - module.MEAN[0]) / module.STD[0])


def test_cifar10_pickled_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=20, test=10)
    datamodule = CIFAR10DataModule(root=tmp_path, download=False, batch_size=8, normalize=False)
    datamodule.setup()
    assert datamodule.input_shape == (3, 32, 32)
    sizes = [len(s) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set)]
    assert sizes == [90, 10, 10]
    inputs, _ = next(iter(datamodule.val_dataloader()))
    assert inputs.shape[1:] == (3, 32, 32)
    # normalize=False: pixels in [0, 1]
    assert float(inputs.min()) >= 0.0
    assert float(inputs.max()) <= 1.0


def test_class_subset_renumbers_labels(tmp_path: Path) -> None:
    write_mnist(tmp_path, train=100, test=30)
    datamodule = MNISTDataModule(
        root=tmp_path, download=False, classes=[7, 3], num_classes=2, val_fraction=0.2
    )
    datamodule.setup()
    assert datamodule.num_classes == 2
    assert sorted(set(_labels(datamodule.train_set))) == [0, 1]
    assert len(datamodule.test_set) == 6  # 3 each of digit 7 and 3
    # Label 0 is digit 7: the fixture paints class c's bright band at row 2c.
    image = next(x for x, y in datamodule.test_set if int(y) == 0)
    assert int(image[0].mean(dim=1).argmax()) == 14


def test_missing_files_without_download_fail_at_construction(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        MNISTDataModule(root=root, download=False)
    message = str(info.value)
    assert f"`root`={str(root)!r}" in message
    assert "train-images-idx3-ubyte" in message
    assert "data.download=true" in message
    assert not root.exists()  # nothing created


@pytest.mark.parametrize("module", [MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule])
def test_failed_download_names_the_path_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: type
) -> None:
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    # Every torchvision download goes through this function: the machine is "offline".
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    datamodule = module(root=tmp_path / "data", download=True)  # no error yet: it may download
    with pytest.raises(RuntimeError) as info:
        datamodule.prepare_data()
    message = str(info.value)
    assert calls, "a download was attempted"
    assert "downloading it failed" in message
    assert str((tmp_path / "data").resolve()) in message
    assert "Fix:" in message


def test_prepare_data_is_a_no_op_when_the_files_are_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mnist(tmp_path)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", forbidden)
    MNISTDataModule(root=tmp_path, download=True).prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (1, 32, 32)}, "`input_shape`=[1, 32, 32]"),
        ({"classes": [3, 3]}, "listed twice"),
        ({"classes": [1, 12]}, "[12] are not labels"),
        ({"classes": [1, 2, 3], "num_classes": 10}, "set num_classes=3"),
        ({"val_fraction": 1.0}, "`val_fraction`=1.0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    write_mnist(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        MNISTDataModule(root=tmp_path, download=False, **kwargs)


def test_image_folder_splits_resizes_and_names_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", ("cat", "dog", "emu"), per_class=10)
    datamodule = ImageFolderDataModule(
        root=tmp_path / "pets", num_classes=3, input_shape=(1, 8, 8), batch_size=4
    )
    assert datamodule.class_names == ["cat", "dog", "emu"]
    datamodule.setup()
    sizes = [len(s) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set)]
    assert sizes == [21, 3, 6]
    assert sorted(set(_labels(datamodule.test_set))) == [0, 1, 2]
    inputs, labels = next(iter(datamodule.train_dataloader()))
    assert inputs.shape == (4, 1, 8, 8)  # converted to grayscale, resized from mixed sizes
    assert labels.dtype == torch.int64
    # The split depends on split_seed only.
    again = ImageFolderDataModule(root=tmp_path / "pets", input_shape=(1, 8, 8))
    assert again._files["test"] == datamodule._files["test"]


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "set" / "train", ("a", "b"), per_class=5)
    write_image_folder(tmp_path / "set" / "test", ("a", "b"), per_class=2)
    datamodule = ImageFolderDataModule(root=tmp_path / "set", val_fraction=0.2)
    datamodule.setup()
    sizes = [len(s) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set)]
    assert sizes == [8, 2, 4]  # val split off train/, test/ as it is
    image, _ = datamodule.train_set[0]
    assert image.shape == (3, 32, 32)


def test_image_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`root`=.*nope' does not exist"):
        ImageFolderDataModule(root=tmp_path / "nope")


def test_image_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"`root`=.*empty' holds no images"):
        ImageFolderDataModule(root=tmp_path / "empty")


def test_image_folder_with_loose_images_says_to_use_class_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "flat", ("x",), per_class=2)
    for image in (tmp_path / "flat" / "x").iterdir():
        image.rename(tmp_path / "flat" / image.name)
    (tmp_path / "flat" / "x").rmdir()
    with pytest.raises(ValueError, match="2 images lie directly in it"):
        ImageFolderDataModule(root=tmp_path / "flat")


def test_image_folder_with_an_empty_class(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", ("cat", "dog"), per_class=3)
    (tmp_path / "pets" / "owl").mkdir()
    with pytest.raises(ValueError, match="the class folder 'owl' holds no images"):
        ImageFolderDataModule(root=tmp_path / "pets")


def test_image_folder_class_count_must_match(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", ("cat", "dog"), per_class=3)
    with pytest.raises(ValueError, match=r"has 2 class folders \(cat, dog\); set num_classes=2"):
        ImageFolderDataModule(root=tmp_path / "pets", num_classes=5)


def test_digits_class_subset() -> None:
    lower = DigitsDataModule(classes=[0, 1, 2, 3, 4], num_classes=5)
    upper = DigitsDataModule(classes=[5, 6, 7, 8, 9], num_classes=None)
    assert (lower.num_classes, upper.num_classes) == (5, 5)
    for datamodule in (lower, upper):
        datamodule.setup()
        assert datamodule.train_set is not None
        assert set(datamodule.train_set.tensors[1].tolist()) == set(range(5))
    # Disjoint images: the two tasks share no test image.
    assert lower.test_set is not None
    assert upper.test_set is not None
    low = {tuple(x.flatten().tolist()) for x in lower.test_set.tensors[0]}
    high = {tuple(x.flatten().tolist()) for x in upper.test_set.tensors[0]}
    assert not low & high
    with pytest.raises(ValueError, match="set num_classes=5"):
        DigitsDataModule(classes=[5, 6, 7, 8, 9], num_classes=10)


def test_stratified_split_is_per_class_and_deterministic() -> None:
    labels = np.repeat(np.arange(3), [10, 4, 1])
    train, val, test = stratified_split(labels, [0.2, 0.3], seed=0)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(15))
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]  # a 1-sample class trains
    assert np.bincount(labels[test], minlength=3).tolist() == [3, 1, 0]
    again = stratified_split(labels, [0.2, 0.3], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
