"""What in a batch is the model's input: one rule for tuple, list, dict and tensor batches.

Calibration (PTQ, Wanda), distillation's teacher and export all feed the model the same thing:

- a tensor: itself;
- ``(inputs, labels, ...)`` as a tuple or list: the first element;
- a mapping: the value of the first of :data:`INPUT_KEYS` it has (``{"image": x, "label": y}``);
  otherwise every entry but the labels (:data:`LABEL_KEYS`), as a dict, which is what a Hugging
  Face model takes (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "INPUT_KEYS",
    "LABEL_KEYS",
    "batch_size",
    "model_inputs",
    "to_device",
    "token_mask",
]

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")
LABEL_KEYS = ("label", "labels", "y", "target", "targets")


def model_inputs(batch: Any) -> Any:
    """The part of ``batch`` the model is called with (see the module docstring).

    Raises:
        ValueError: a mapping with nothing but labels in it.
    """
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        if not inputs:
            raise ValueError(
                f"a batch with keys {sorted(batch)} holds no model input; use (inputs, labels) "
                f"tuples, one of the keys {', '.join(INPUT_KEYS)}, or named inputs besides "
                f"the labels ({', '.join(LABEL_KEYS)})."
            )
        return inputs
    return batch


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the first dimension of its first input tensor (1 if none)."""
    inputs = model_inputs(batch)
    if isinstance(inputs, Mapping):
        inputs = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.dim() else 1


def token_mask(batch: Any, logits: torch.Tensor) -> torch.Tensor | None:
    """Which positions of per-token ``logits`` (``[batch, seq, classes]``) are real tokens.

    The batch's ``attention_mask`` (a Hugging Face batch) as a bool tensor when it has the shape of
    ``logits`` without its last dimension; ``None`` otherwise (one prediction per sample, or no
    mask: every position counts).
    """
    if not isinstance(batch, Mapping) or logits.dim() < 3:
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:-1]):
        return None
    return mask.to(device=logits.device).bool()


def to_device(inputs: Any, device: torch.device) -> Any:
    """``inputs`` (a tensor, or tuples, lists and mappings of them) moved to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs
