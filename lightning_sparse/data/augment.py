"""Training-time augmentation whose randomness survives a resume: a pure function of the clock."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["RandomShift"]


class RandomShift(Dataset):
    """A view of an image data set that translates every image by up to ``max_shift`` pixels.

    Each axis moves by an integer in ``[-max_shift, max_shift]``; pixels moved in are zeros (the
    background of the digits). The shift of sample ``index`` in epoch ``e`` is drawn from a
    generator seeded with ``(seed, e, index)`` alone, never from the global RNG, so a mid-epoch
    resume, a different batch size or another DDP rank sees the very same image. The epoch is the
    training sampler's (Lightning calls its ``set_epoch`` before every epoch).

    Args:
        dataset: ``(image [C, H, W], label)`` pairs.
        max_shift: largest translation in pixels per axis, >= 1.
        seed: the run's seed.
        sampler: the training sampler whose ``epoch`` clocks the draws.
    """

    def __init__(
        self, dataset: Dataset, max_shift: int, seed: int, sampler: DistributedSampler
    ) -> None:
        if int(max_shift) < 1:
            raise ValueError(f"`max_shift`={max_shift!r} is not allowed; it must be >= 1.")
        self.dataset = dataset
        self.max_shift = int(max_shift)
        self.seed = int(seed)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.dataset[index]
        key = np.random.SeedSequence([self.seed, int(self.sampler.epoch), int(index)])
        generator = torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))
        dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=generator)
        return shift_image(image, int(dy), int(dx)), label


def shift_image(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image [..., H, W]`` moved ``dy`` rows down and ``dx`` columns right, zeros shifted in."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return image
    height, width = image.shape[-2:]
    padded = F.pad(image, (pad, pad, pad, pad))
    return padded[..., pad - dy : pad - dy + height, pad - dx : pad - dx + width]
