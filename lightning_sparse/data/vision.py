"""Data sets that real users bring: torchvision's MNIST, FashionMNIST, CIFAR-10, and image folders.

Each module checks its files when it is constructed, so a missing data set is an error before any
work (and before a run writes anything): with ``download=False`` the error names the missing file
and how to get it; with ``download=True`` the files are fetched in ``prepare_data`` (once per node,
as Lightning intends) and a failed download is an error naming the path and the fix, e.g. for a
machine without internet.

The splits are fixed by ``split_seed`` alone (validation is carved out of the training files,
stratified by class), ``seed`` only drives the training shuffle, and ``classes`` keeps a subset of
the labels renumbered from 0, as for :class:`~lightning_sparse.data.DigitsDataModule`.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_sparse.core.vision_backend import IMAGE_EXTENSIONS, load_image, torchvision_module
from lightning_sparse.data.base import (
    TensorDataModule,
    check_classes,
    select_classes,
    stratified_split,
)

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
]


class ImageTensorDataset(Dataset):
    """``uint8`` images held in memory, handed out as normalised ``float32`` tensors.

    Keeping ``uint8`` and converting per sample holds CIFAR-10's 50 000 images in 150 MB instead
    of 600 MB of floats.

    Args:
        images: ``[N, C, H, W]`` ``uint8``.
        labels: ``[N]`` integer labels.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].to(torch.float32) / 255.0
        return (image - self.mean) / self.std, self.labels[index]


class _DownloadableDataModule(TensorDataModule):
    """A fixed-format data set under ``root``: check files, download, read, split."""

    NAME: ClassVar[str]
    SHAPE: ClassVar[tuple[int, int, int]]
    CLASSES: ClassVar[int] = 10
    MEAN: ClassVar[tuple[float, ...]]
    STD: ClassVar[tuple[float, ...]]

    # One signature (with its defaults) for every subclass, so Hydra binds their configs against
    # it; `input_shape` None stands for the class's SHAPE.
    def __init__(
        self,
        root: str | Path = "data",
        download: bool = True,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        classes: Sequence[int] | None = None,
        normalize: bool = True,
    ) -> None:
        if input_shape is not None and tuple(int(d) for d in input_shape) != self.SHAPE:
            raise ValueError(
                f"`input_shape`={list(input_shape)} is not allowed; {self.NAME} images are "
                f"{list(self.SHAPE)}."
            )
        chosen = check_classes(classes, num_classes, available=self.CLASSES)
        if not 0 < val_fraction < 1:
            raise ValueError(
                f"`val_fraction`={val_fraction!r} is not allowed; it must be in (0, 1)."
            )
        count = len(chosen) if chosen is not None else self.CLASSES
        super().__init__(count, self.SHAPE, batch_size, seed, num_workers)
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.classes = chosen
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.normalize = bool(normalize)
        if not self.download:
            self._check_files()

    def _required_files(self) -> list[Path]:
        """Files the reader needs, under ``root``."""
        raise NotImplementedError

    def _fetch(self) -> None:
        """Download the files into ``root`` (torchvision's downloader, which checks checksums)."""
        raise NotImplementedError

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``uint8`` images ``[N, C, H, W]`` and labels of the training or the test files."""
        raise NotImplementedError

    def _missing(self) -> list[Path]:
        return [path for path in self._required_files() if not path.is_file()]

    def _check_files(self) -> None:
        missing = self._missing()
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"`root`={str(self.root)!r}: {self.NAME} is not there (missing "
                f"{missing[0].resolve()}{more}). Fix: set `download=True` (with Hydra: "
                "data.download=true) on a machine with internet access, or copy the "
                f"{self.NAME} files there, or point `root` (data.root) at a directory that holds "
                "them."
            )

    def prepare_data(self) -> None:
        """Download the files if they are missing and ``download`` is on (rank zero of a node)."""
        if not self.download or not self._missing():
            return
        try:
            self._fetch()
        except Exception as err:
            raise RuntimeError(
                f"`root`={str(self.root)!r}: {self.NAME} is not there and downloading it failed "
                f"({type(err).__name__}: {str(err).strip()[:300]}). Fix: download it on a "
                f"machine with internet access (or copy the files) into {self.root.resolve()}, "
                "or point `root` (data.root) at a directory that holds it; then rerun."
            ) from err
        self._check_files()

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        self._check_files()
        train_images, train_labels = self._read(train=True)
        test_images, test_labels = self._read(train=False)
        mean, std = (self.MEAN, self.STD) if self.normalize else ((0.0,), (1.0,))

        def subset(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
            keep, renumbered = select_classes(labels.numpy(), self.classes)
            return images[torch.from_numpy(keep)], renumbered

        train_images, train_np = subset(train_images, train_labels)
        test_images, test_np = subset(test_images, test_labels)
        train_index, val_index = stratified_split(train_np, [self.val_fraction], self.split_seed)
        if not len(val_index) or not len(test_np):
            raise ValueError(
                f"`root`={str(self.root)!r}: the {'validation' if not len(val_index) else 'test'} "
                f"split of {self.NAME} is empty ({len(train_np)} training and {len(test_np)} test "
                "images of the chosen classes); raise `val_fraction` or check the files."
            )

        def dataset(images: torch.Tensor, labels: np.ndarray) -> ImageTensorDataset:
            channels = images.shape[1]
            return ImageTensorDataset(
                images,
                torch.from_numpy(labels),
                mean * channels if len(mean) == 1 else mean,
                std * channels if len(std) == 1 else std,
            )

        return (
            dataset(train_images[torch.from_numpy(train_index)], train_np[train_index]),
            dataset(train_images[torch.from_numpy(val_index)], train_np[val_index]),
            dataset(test_images, test_np),
        )


class _MNISTFamily(_DownloadableDataModule):
    """Files in torchvision's layout: ``<root>/<NAME>/raw/*-ubyte`` (IDX format)."""

    SHAPE = (1, 28, 28)
    _FILES = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    def _torchvision_class(self) -> type:
        datasets = torchvision_module(f"The {self.NAME} data module").datasets
        return getattr(datasets, self.NAME)

    def _required_files(self) -> list[Path]:
        return [self.root / self.NAME / "raw" / name for name in self._FILES]

    def _fetch(self) -> None:
        self._torchvision_class()(str(self.root), train=True, download=True)
        self._torchvision_class()(str(self.root), train=False, download=True)

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._torchvision_class()(str(self.root), train=train, download=False)
        return data.data.unsqueeze(1).contiguous(), data.targets.to(torch.int64)


class MNISTDataModule(_MNISTFamily):
    """torchvision's MNIST (28x28 grayscale digits, 60 000 train + 10 000 test).

    Files: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, as torchvision
    writes them. Validation is ``val_fraction`` of the training files, stratified.

    Args:
        root: directory holding ``MNIST/raw/``.
        download: fetch the files in ``prepare_data`` when they are missing; with ``False``, missing
            files are an error at construction.
        batch_size: samples per batch (per process under DDP).
        val_fraction: share of the training files held out for validation, in (0, 1).
        split_seed: seed of the validation split; keep it fixed to compare runs.
        seed: seed of the training shuffle (set to the run's seed by the configs).
        num_workers: ``DataLoader`` worker processes.
        num_classes: class count; must equal ``len(classes)`` when ``classes`` is given (None:
            taken from ``classes``, else 10).
        input_shape: ``(1, 28, 28)`` or None (the same); the configs state it so that model
            configs can interpolate it.
        classes: keep only these labels, renumbered ``0..len(classes)-1`` in the order given.
        normalize: standardise with the training set's mean and std; else scale to [0, 1].

    Raises:
        FileNotFoundError: ``download=False`` and the files are not under ``root``.
        RuntimeError: from ``prepare_data``: the download failed (no internet?); names the path.

    Example::

        datamodule = MNISTDataModule(root="data", download=True)
    """

    NAME = "MNIST"
    MEAN = (0.1307,)
    STD = (0.3081,)


class FashionMNISTDataModule(_MNISTFamily):
    """torchvision's FashionMNIST (28x28 grayscale clothing, 10 classes), laid out as MNIST.

    Files: ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``. Arguments as
    :class:`MNISTDataModule`.

    Example::

        datamodule = FashionMNISTDataModule(root="data", classes=[0, 1, 2, 3, 4], num_classes=5)
    """

    NAME = "FashionMNIST"
    MEAN = (0.2860,)
    STD = (0.3530,)


class CIFAR10DataModule(_DownloadableDataModule):
    """CIFAR-10 (32x32 colour images, 10 classes, 50 000 train + 10 000 test).

    Files: the Python version's ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``
    (pickled batches), as torchvision downloads and unpacks them. They are read here rather than
    through torchvision's ``CIFAR10``, which insists on the official checksums. No augmentation.
    Arguments as :class:`MNISTDataModule` (``input_shape`` is ``(3, 32, 32)``).

    Example::

        datamodule = CIFAR10DataModule(root="data", download=True, batch_size=256)
    """

    NAME = "CIFAR-10"
    SHAPE = (3, 32, 32)
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)
    FOLDER = "cifar-10-batches-py"
    TRAIN_FILES = tuple(f"data_batch_{index}" for index in range(1, 6))
    TEST_FILES = ("test_batch",)

    def _required_files(self) -> list[Path]:
        return [self.root / self.FOLDER / name for name in (*self.TRAIN_FILES, *self.TEST_FILES)]

    def _fetch(self) -> None:
        datasets = torchvision_module("The CIFAR-10 data module").datasets
        datasets.CIFAR10(str(self.root), train=True, download=True)

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in self.TRAIN_FILES if train else self.TEST_FILES:
            with open(self.root / self.FOLDER / name, "rb") as handle:
                # The official files are Python 2 pickles of numpy arrays; latin1 reads their bytes.
                batch = pickle.load(handle, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, *self.SHAPE))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class ImageFileDataset(Dataset):
    """Image files read on demand (so a folder need not fit in memory), resized and normalised.

    Args:
        files: image paths.
        labels: one label per file.
        input_shape: ``(channels, height, width)`` each image is converted and resized to.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        input_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.files = list(files)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.input_shape = input_shape
        self.mean = torch.tensor(list(mean), dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        channels, height, width = self.input_shape
        image = load_image(self.files[index], channels, (height, width)).to(torch.float32) / 255.0
        return (image - self.mean) / self.std, self.labels[index]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _scan(folder: Path, field: str) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` of ``folder/<class>/``; errors name ``field``."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"`{field}`={str(folder)!r} does not exist or is not a directory. Fix: point "
            f"`{field}` (with Hydra: data.root=...) at a folder laid out as <root>/<class>/<image>."
        )
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in class_dirs}
    if not any(found.values()):
        loose = sum(1 for p in folder.iterdir() if _is_image(p))
        hint = (
            f" ({loose} images lie directly in it: put each in a folder named after its class)"
            if loose
            else ""
        )
        raise ValueError(
            f"`{field}`={str(folder)!r} holds no images{hint}: expected <root>/<class>/<image> "
            f"with one of the extensions {', '.join(IMAGE_EXTENSIONS)}."
        )
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise ValueError(
            f"`{field}`={str(folder)!r}: the class folder {empty[0]!r} holds no images "
            f"({len(empty)} empty in all); remove it or add its images."
        )
    return found


class ImageFolderDataModule(TensorDataModule):
    """Images in class folders: ``<root>/<class>/<image>``, as torchvision's ``ImageFolder``.

    Classes are the sub-folder names, sorted, labelled from 0. Either one folder is split by class
    into train/val/test (``val_fraction``, ``test_fraction``, fixed by ``split_seed``), or
    ``root`` holds ``train/`` (and optionally ``val/`` and ``test/``) with the class folders
    inside; a missing ``val/`` or ``test/`` is split off ``train/``. Images are read on demand,
    converted to ``input_shape[0]`` channels and resized to ``input_shape[1:]``. The folder is
    scanned at construction, so a wrong root or an empty folder is an error before any work.

    Args:
        root: the folder (with Hydra: ``data=image_folder data.root=...``).
        num_classes: class count, checked against the folders (None: take it from them).
        input_shape: ``(channels, height, width)`` of the images handed to the model.
        batch_size: samples per batch (per process under DDP).
        val_fraction: share of each class held out for validation when there is no ``val/``.
        test_fraction: share of each class held out for testing when there is no ``test/``.
        split_seed: seed of the split.
        seed: seed of the training shuffle (set to the run's seed by the configs).
        num_workers: ``DataLoader`` worker processes (decoding images is CPU work).
        mean: per-channel mean subtracted after scaling to [0, 1] (one value for every channel, or
            one per channel).
        std: per-channel standard deviation divided by.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no images, an empty class folder, split folders with other classes than
            ``train/``, ``num_classes`` not matching the folders, or a split left empty.

    Example::

        datamodule = ImageFolderDataModule(root="~/flowers", input_shape=(3, 64, 64))
    """

    def __init__(
        self,
        root: str | Path,
        num_classes: int | None = None,
        input_shape: Sequence[int] = (3, 32, 32),
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
            raise ValueError(
                f"`input_shape`={list(input_shape)} is not allowed; give [channels, height, width] "
                "with 1 or 3 channels."
            )
        for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"`{field}`={value!r} is not allowed; it must be in (0, 1).")
        for field, stats in (("mean", mean), ("std", std)):
            if len(stats) not in (1, shape[0]):
                raise ValueError(
                    f"`{field}`={list(stats)} is not allowed; give 1 or {shape[0]} values."
                )
        if any(s <= 0 for s in std):
            raise ValueError(f"`std`={list(std)} is not allowed; every value must be > 0.")
        self.root = Path(root).expanduser()
        splits = self._scan_splits()
        names = sorted(splits["train"])
        if num_classes is not None and int(num_classes) != len(names):
            raise ValueError(
                f"`num_classes`={num_classes} does not match `root`={str(self.root)!r}, which has "
                f"{len(names)} class folders ({', '.join(names[:10])}"
                f"{', ...' if len(names) > 10 else ''}); set num_classes={len(names)} (with "
                f"Hydra: data.num_classes={len(names)})."
            )
        if len(names) < 2:
            raise ValueError(
                f"`root`={str(self.root)!r} has a single class folder {names}; a classifier "
                "needs at least 2."
            )
        super().__init__(len(names), shape, batch_size, seed, num_workers)
        self.class_names = names
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.mean = [float(m) for m in mean] * (shape[0] if len(mean) == 1 else 1)
        self.std = [float(s) for s in std] * (shape[0] if len(std) == 1 else 1)
        self._files = self._assign(splits)

    def _scan_splits(self) -> dict[str, dict[str, list[Path]]]:
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            return {"train": _scan(self.root, "root")}
        splits = {"train": _scan(train_dir, "root")}
        for split in ("val", "test"):
            folder = self.root / split
            if folder.is_dir():
                found = _scan(folder, "root")
                unknown = sorted(set(found) - set(splits["train"]))
                if unknown:
                    raise ValueError(
                        f"`root`={str(self.root)!r}: {split}/ has class folders {unknown} that "
                        "train/ lacks; every split needs the same classes."
                    )
                splits[split] = found
        return splits

    def _assign(self, splits: dict[str, dict[str, list[Path]]]) -> dict[str, tuple[list, list]]:
        """Files and labels per split, splitting ``train`` where a folder is missing."""
        label_of = {name: label for label, name in enumerate(self.class_names)}

        def flatten(found: dict[str, list[Path]]) -> tuple[list[Path], np.ndarray]:
            files = [f for name in sorted(found) for f in found[name]]
            labels = [label_of[name] for name in sorted(found) for _ in found[name]]
            return files, np.asarray(labels, dtype=np.int64)

        files, labels = flatten(splits["train"])
        wanted = [s for s in ("val", "test") if s not in splits]
        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        parts = stratified_split(labels, [fractions[s] for s in wanted], self.split_seed)
        assigned = {"train": ([files[i] for i in parts[0]], labels[parts[0]].tolist())}
        for split, index in zip(wanted, parts[1:], strict=True):
            assigned[split] = ([files[i] for i in index], labels[index].tolist())
        for split in ("val", "test"):
            if split in splits:
                split_files, split_labels = flatten(splits[split])
                assigned[split] = (split_files, split_labels.tolist())
        for split, (split_files, _) in assigned.items():
            if split_files:
                continue
            if split == "train":
                raise ValueError(
                    f"`root`={str(self.root)!r}: no images are left for training after the "
                    "val/test split; lower `val_fraction`/`test_fraction` or add images."
                )
            raise ValueError(
                f"`{split}_fraction`={fractions[split]:g} leaves the {split} split of "
                f"{str(self.root)!r} empty ({len(files)} training images); raise it, add images, "
                f"or add a {split}/ folder."
            )
        return assigned

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        shape = (self.input_shape[0], self.input_shape[1], self.input_shape[2])

        def dataset(split: str) -> ImageFileDataset:
            files, labels = self._files[split]
            return ImageFileDataset(files, labels, shape, self.mean, self.std)

        return dataset("train"), dataset("val"), dataset("test")
