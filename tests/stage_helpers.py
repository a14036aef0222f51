"""Shared pieces of the tests for one-shot compression, transfer, real data sets and models.

Fixture data are written by the tests themselves (no downloads): MNIST-format IDX files, CIFAR-10
pickled batches, folders of PNG images.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import quiet_trainer

__all__ = ["one_thread", "quiet_trainer", "write_cifar10", "write_image_folder", "write_mnist"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: tiny models are faster so, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format MNIST uses: magic, big-endian dims, bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def class_images(labels: np.ndarray, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """``uint8`` images whose brightest block says the class: easy to learn, a real signal."""
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 60, size=(len(labels), *shape), dtype=np.int64)
    height = shape[-2]
    band = max(height // 10, 1)
    for index, label in enumerate(labels):
        row = int(label) * band % height
        images[index, ..., row : row + band, :] = 250
    return images.astype(np.uint8)


def write_mnist(root: Path, name: str = "MNIST", train: int = 60, test: int = 20) -> Path:
    """A tiny MNIST-format data set under ``root/<name>/raw`` (10 classes, 28x28)."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        _idx(raw / f"{prefix}-images-idx3-ubyte", class_images(labels, (28, 28), seed=count))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


def write_cifar10(root: Path, per_batch: int = 10, test: int = 20) -> Path:
    """A tiny CIFAR-10 Python-version data set under ``root/cifar-10-batches-py``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [f"data_batch_{index}" for index in range(1, 6)]
    for seed, (name, count) in enumerate(
        [(b, per_batch) for b in batches] + [("test_batch", test)]
    ):
        labels = np.arange(count) % 10
        data = class_images(labels, (3, 32, 32), seed=seed).reshape(count, -1)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels.tolist()}, handle)
    return root


def write_image_folder(
    root: Path, classes: Sequence[str] = ("cat", "dog"), per_class: int = 6, size: int = 10
) -> Path:
    """``root/<class>/<n>.png`` RGB images of varying sizes (the module resizes them)."""
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            # Sizes vary from image to image: the data module must resize them to batch them.
            shape = (size + index % 3, size, 3)
            image = class_images(np.asarray([label]), shape, seed=label * 100 + index)[0]
            Image.fromarray(image).save(folder / f"{index}.png")
    return root
