"""Checkpoints: find, read (weights only) and match them against a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparse.core.fake_quant import STATE_FORMAT, restore
from lightning_sparse.core.structure import changes_in_checkpoint, replay

# Where `python -m lightning_sparse.train` (and `.oneshot`) leave the final checkpoint of a run.
CHECKPOINT_IN_RUN_DIR = Path("checkpoints") / "last.ckpt"


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the configured model; the message names the first key."""


def check_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> None:
    """Raise unless ``state`` has exactly ``model``'s keys with the same shapes.

    Raises:
        CheckpointMismatchError: names the first key (in the model's order, then the state's) that
            is missing, unexpected or of another shape.
    """
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointMismatchError(
                f"{source} does not match the configured model: first mismatched key {key!r} is "
                f"missing from the {source} (the model has shape {list(tensor.shape)}). Are "
                "`model=`/`data=` those of the run that wrote it?"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{source} does not match the configured model: first mismatched key {key!r} has "
                f"shape {list(state[key].shape)} in the {source} but {list(tensor.shape)} in the "
                "model. Are `model=`/`data=` those of the run that wrote it?"
            )
    for key in state:
        if key not in expected:
            raise CheckpointMismatchError(
                f"{source} does not match the configured model: first mismatched key {key!r} is "
                "in the checkpoint but not in the model. Are `model=`/`data=` those of the run "
                "that wrote it?"
            )


def _quantization_states(checkpoint: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Quantization states stored by callbacks (QAT) or saved directly (PTQ) in a checkpoint."""
    found = []
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, Mapping):
            continue
        inner = state.get("quantization")
        candidate = inner if isinstance(inner, Mapping) else state
        if candidate.get("format") == STATE_FORMAT:
            found.append(candidate)
    return found


def load_checkpoint(module: nn.Module, path: str | Path) -> list[str]:
    """Load a Lightning checkpoint's weights into ``module`` and restore its quantization.

    Structure changes the checkpoint records (channels removed during training) are replayed on
    ``module`` first, so the model its config builds takes the changed weights.

    Args:
        module: the configured model (same class and sizes as the run's).
        path: the checkpoint (read with ``weights_only=True``).

    Returns:
        Names of the layers the checkpoint quantized (empty without QAT/PTQ state).

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: the weights do not fit ``module``.
        StructureError: a recorded structure change does not fit ``module``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`ckpt_path`={str(path)!r} is not a file.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    replay(module, changes_in_checkpoint(checkpoint))
    state = checkpoint.get("state_dict", checkpoint)
    check_state_dict(state, module, source=f"checkpoint {path.name}")
    module.load_state_dict(state, strict=True)
    names: list[str] = []
    for quant_state in _quantization_states(checkpoint):
        names.extend(restore(module, quant_state).layers)
    return names


def checkpoint_path(path: str | Path, field: str = "init_from") -> Path:
    """The checkpoint file ``path`` names: itself, or a run dir's ``checkpoints/last.ckpt``.

    Raises:
        FileNotFoundError: nothing at ``path``, or a directory without ``checkpoints/last.ckpt``;
            the message names ``field``.
    """
    given = Path(path).expanduser()
    if given.is_dir():
        candidate = given / CHECKPOINT_IN_RUN_DIR
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(
            f"`{field}`={str(path)!r} is a directory without {CHECKPOINT_IN_RUN_DIR}: give a run "
            "dir of `python -m lightning_sparse.train` (or `.oneshot`) or a checkpoint file."
        )
    if not given.is_file():
        raise FileNotFoundError(
            f"`{field}`={str(path)!r} does not exist; give a run dir or a checkpoint file."
        )
    return given


def read_state_dict(path: str | Path, field: str = "init_from") -> dict[str, torch.Tensor]:
    """The weights in a run dir, a Lightning checkpoint or a plain ``state_dict`` file.

    Read with ``torch.load(weights_only=True)`` onto the CPU: a checkpoint cannot run code.

    Raises:
        FileNotFoundError: see :func:`checkpoint_path`.
        ValueError: the file is not a checkpoint (not loadable, or no tensors in it).
    """
    return read_checkpoint(path, field)[0]


def read_checkpoint(
    path: str | Path, field: str = "init_from"
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The weights at ``path`` (see :func:`read_state_dict`) and the structure changes it records.

    The changes (empty for a plain ``state_dict`` or an unchanged model) rebuild the changed
    architecture on a model built from its config (``core.structure.replay``) before the weights
    load.

    Raises:
        FileNotFoundError: see :func:`checkpoint_path`.
        ValueError: the file is not a checkpoint, or its structure log is unreadable.
    """
    file = checkpoint_path(path, field)
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"`{field}`={str(path)!r}: {file} is not a loadable checkpoint ({err})."
        ) from err
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not any(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(
            f"`{field}`={str(path)!r}: {file} holds no weights (expected a Lightning checkpoint "
            "with a `state_dict`, or a state_dict of tensors)."
        )
    weights = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return weights, changes_in_checkpoint(loaded) if isinstance(loaded, Mapping) else []
