"""Checkpoints: find, read (weights only) and match them against a model."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparse.core.fake_quant import STATE_FORMAT, restore
from lightning_sparse.core.structure import changes_in_checkpoint, replay

# Where `python -m lightning_sparse.train` (and `.oneshot`) leave the final checkpoint of a run.
CHECKPOINT_IN_RUN_DIR = Path("checkpoints") / "last.ckpt"
# What Hugging Face's `save_pretrained` writes: one safetensors file, or shards with an index.
PRETRAINED_FILES = ("model.safetensors", "model.safetensors.index.json")


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the configured model; the message names the first key."""


class NotACheckpointError(ValueError):
    """A file given as a checkpoint cannot be read as one (truncated, or not a torch file)."""


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


def quantized_layers_in(path: str | Path) -> list[str]:
    """Names of the layers a checkpoint holds quantization (QAT or PTQ scales) for; [] for none."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    names: list[str] = []
    for state in _quantization_states(checkpoint):
        names.extend(str(name) for name in state.get("layers", {}))
    return names


def load_checkpoint(module: nn.Module, path: str | Path) -> list[str]:
    """Load a Lightning checkpoint's weights into ``module`` and restore its quantization.

    Structure changes the checkpoint records (channels removed during training) are replayed on
    ``module`` first, so the model its config builds takes the changed weights.

    Args:
        module: the configured model (same class and sizes as the run's).
        path: the checkpoint (read with ``weights_only=True``) or a run dir holding
            ``checkpoints/last.ckpt``.

    Returns:
        Names of the layers the checkpoint quantized (empty without QAT/PTQ state).

    Raises:
        FileNotFoundError: nothing at ``path`` (see :func:`checkpoint_path`).
        NotACheckpointError: the file does not open as a checkpoint.
        CheckpointMismatchError: the weights do not fit ``module``.
        StructureError: a recorded structure change does not fit ``module``.
    """
    path = readable_checkpoint(path, field="ckpt_path")
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
        for name in PRETRAINED_FILES:
            if (given / name).is_file():
                return given / name
        raise FileNotFoundError(
            f"`{field}`={str(path)!r}: not a checkpoint: the directory has no "
            f"{CHECKPOINT_IN_RUN_DIR} or {PRETRAINED_FILES[0]}; give a run dir of `python -m "
            "lightning_sparse.train` (or `.oneshot`), a Hugging Face `save_pretrained` folder, "
            "or a checkpoint file."
        )
    if not given.is_file():
        raise FileNotFoundError(
            f"`{field}`={str(path)!r}: not found; give a run dir or a checkpoint file."
        )
    return given


def readable_checkpoint(path: str | Path, field: str = "ckpt_path") -> Path:
    """:func:`checkpoint_path`, and the file must open as a torch checkpoint (cheap: mmap).

    Used before a run writes anything, so that a truncated or foreign file is named at once rather
    than by torch's reader deep inside the run (``PytorchStreamReader failed ...``).

    Raises:
        FileNotFoundError: see :func:`checkpoint_path`.
        NotACheckpointError: the file is truncated, not a torch file, or holds more than plain
            data (it must load with ``torch.load(weights_only=True)``); names ``field``.
    """
    file = checkpoint_path(path, field)
    is_zip = zipfile.is_zipfile(file)
    try:
        # A zip (torch's format since 1.6) is mapped, not read: only its small pickle is parsed.
        torch.load(file, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:
        reason = (
            "truncated or not a torch file"
            if not is_zip
            else f"it does not load with torch.load(weights_only=True): "
            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}"
        )
        shown = str(path) if Path(path) == file else f"{path} ({file})"
        raise NotACheckpointError(f"`{field}`={shown!r}: not a checkpoint: {reason}.") from err
    return file


def read_state_dict(path: str | Path, field: str = "init_from") -> dict[str, torch.Tensor]:
    """The weights in a run dir, a Lightning checkpoint, a plain ``state_dict`` file or a folder
    Hugging Face's ``save_pretrained`` wrote (``model.safetensors``, or its shards).

    Read with ``torch.load(weights_only=True)`` (or safetensors) onto the CPU: a checkpoint cannot
    run code.

    Raises:
        FileNotFoundError: see :func:`checkpoint_path`.
        NotACheckpointError: see :func:`readable_checkpoint`.
        ValueError: the file holds no tensors.
    """
    return read_checkpoint(path, field)[0]


def read_checkpoint(
    path: str | Path, field: str = "init_from"
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The weights at ``path`` (see :func:`read_state_dict`) and the structure changes it records.

    The changes (empty for a plain ``state_dict``, a ``save_pretrained`` folder or an unchanged
    model) rebuild the changed architecture on a model built from its config
    (``core.structure.replay``) before the weights load.

    Raises:
        FileNotFoundError: see :func:`checkpoint_path`.
        NotACheckpointError: see :func:`readable_checkpoint`.
        ValueError: the file holds no tensors, or its structure log is unreadable.
    """
    file = checkpoint_path(path, field)
    if file.name in PRETRAINED_FILES:
        try:
            return _read_safetensors(file), []
        except Exception as err:
            raise NotACheckpointError(
                f"`{field}`={str(path)!r}: not a checkpoint: {file} does not load ({err})."
            ) from err
    file = readable_checkpoint(path, field)
    loaded = torch.load(file, map_location="cpu", weights_only=True)
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


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """One ``model.safetensors``, or every shard an index names."""
    import json

    from safetensors.torch import load_file

    if file.suffix == ".json":
        shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(file.parent / shard)))
        return state
    return load_file(str(file))
