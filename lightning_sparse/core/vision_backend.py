"""The one place that imports torchvision and Pillow, the optional ``vision`` backend.

The core package (callbacks, masks, the digits default) runs without them; the real data sets
(MNIST, FashionMNIST, CIFAR-10, image folders) and the torchvision model adapters import them
through :func:`torchvision_module` and :func:`load_image`, so a missing install is one clear error
that says how to fix it, raised where it is first needed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "load_image", "torchvision_module"]

# What Pillow opens among the extensions torchvision's ImageFolder recognises.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_INSTALL_HINT = "install the vision extra: pip install 'lightning_sparse[vision]'"


def _import(name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"{what} needs `{name}`, which is not installed; {_INSTALL_HINT}."
        ) from err


def torchvision_module(what: str) -> ModuleType:
    """``torchvision``, or an ImportError naming ``what`` needed it and how to install it."""
    return _import("torchvision", what)


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Read one image file as a ``uint8`` tensor ``[channels, height, width]``.

    Args:
        path: an image file Pillow can open.
        channels: 1 (grayscale) or 3 (RGB); the image is converted to it.
        size: ``(height, width)`` the image is resized to (bilinear), so a folder of mixed sizes
            batches.
    """
    image_module = _import("PIL.Image", "Reading an image folder")
    with image_module.open(path) as image:
        converted = image.convert("L" if channels == 1 else "RGB")
        if converted.size != (size[1], size[0]):
            converted = converted.resize((size[1], size[0]), image_module.Resampling.BILINEAR)
        array = np.asarray(converted, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
