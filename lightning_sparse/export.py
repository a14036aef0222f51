"""Export a trained model: ONNX fp32 and int8, a compressed checkpoint, and what each measures.

:func:`export_model` writes, into one directory, atomically (everything goes to a temporary
directory beside it first, which then takes its place, so a failed export leaves nothing
half-written):

- ``model.onnx``: the float model (fake quantization off), checked against PyTorch's logits;
- ``model_int8.onnx``: when QAT or PTQ quantized the model, a QuantizeLinear/DequantizeLinear graph
  with the learned scales, which ONNX Runtime runs with integer kernels;
- ``compressed.safetensors``: the model in compact form (see below), which :func:`load_compressed`
  turns back into the same model;
- ``export.json``: the summary :func:`export_model` returns.

Both ONNX models are evaluated on the test split with ONNX Runtime, and timed side by side at a
fixed batch size (median of interleaved runs).

``compressed.safetensors`` layout: a few pooled tensors, ``u8`` (packed bitmasks of pruned
tensors, and 4-bit values two per byte), ``i8`` (int8 weights and zero points), ``f32`` (float
values, weight scales, input ranges), plus any non-float tensor under its own name; the metadata
key ``index`` (JSON) says for each ``state_dict`` entry how it is stored and where. A tensor whose
zeros make it smaller is stored as a bitmask plus its non-zeros; a quantized weight as integers plus
a scale per output channel. Pooling keeps the header small: with per-tensor entries the header
would be a tenth of a 95%-sparse small CNN's file.

Run on a checkpoint: ``python -m lightning_sparse.export ckpt_path=runs/.../last.ckpt`` (Hydra
config ``conf/export.yaml``; ``data=`` and ``model=`` must match those of the run).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from lightning_sparse import quant_backend as qb
from lightning_sparse.recipe import config_dir

__all__ = [
    "COMPRESSED_FILE",
    "EXPORT_SUMMARY_FILE",
    "INT8_FILE",
    "ONNX_FILE",
    "CheckpointMismatchError",
    "check_state_dict",
    "dense_bytes",
    "export_model",
    "load_checkpoint",
    "load_compressed",
    "main",
    "run",
    "save_compressed",
]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
COMPRESSED_FILE = "compressed.safetensors"
EXPORT_SUMMARY_FILE = "export.json"
_COMPRESSED_FORMAT = "lightning_sparse.compressed"
_COMPRESSED_VERSION = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the configured model; the message names the first key."""


# --------------------------------------------------------------------------------------------
# Checkpoints


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
        if candidate.get("format") == qb.STATE_FORMAT:
            found.append(candidate)
    return found


def load_checkpoint(module: nn.Module, path: str | Path) -> list[str]:
    """Load a Lightning checkpoint's weights into ``module`` and restore its quantization.

    Args:
        module: the configured model (same class and sizes as the run's).
        path: the checkpoint (read with ``weights_only=True``).

    Returns:
        Names of the layers the checkpoint quantized (empty without QAT/PTQ state).

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: the weights do not fit ``module``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`ckpt_path`={str(path)!r} is not a file.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    check_state_dict(state, module, source=f"checkpoint {path.name}")
    module.load_state_dict(state, strict=True)
    names: list[str] = []
    for quant_state in _quantization_states(checkpoint):
        names.extend(qb.restore(module, quant_state).layers)
    return names


# --------------------------------------------------------------------------------------------
# Compressed checkpoint


def dense_bytes(module: nn.Module) -> int:
    """Bytes of ``module.state_dict()``'s tensors stored densely (what ``torch.save`` holds)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class _Pools:
    """Append-only pools of numbers, one per dtype; each entry records where it went."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {"u8": [], "i8": [], "f32": []}
        self.sizes = {"u8": 0, "i8": 0, "f32": 0}

    def add(self, pool: str, values: np.ndarray) -> list[int]:
        flat = np.ascontiguousarray(values).reshape(-1)
        start = self.sizes[pool]
        self.parts[pool].append(flat)
        self.sizes[pool] += flat.size
        return [start, start + flat.size]

    def tensors(self) -> dict[str, np.ndarray]:
        dtypes = {"u8": np.uint8, "i8": np.int8, "f32": np.float32}
        return {
            pool: np.concatenate(parts).astype(dtypes[pool]) if parts else np.zeros(0, dtypes[pool])
            for pool, parts in self.parts.items()
        }


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Signed 4-bit integers, two per byte (low nibble first)."""
    nibbles = (values.astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    low, high = packed & 0xF, packed >> 4
    nibbles = np.stack([low, high], axis=1).reshape(-1)[:count].astype(np.int16)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def _value_bytes(encoding: str, bits: int) -> float:
    return {"f": 4.0, "q": bits / 8}[encoding]


def save_compressed(module: nn.Module, path: str | Path) -> int:
    """Write ``module`` to ``path`` as a compact safetensors file; return its size in bytes.

    Quantized weights (layers with fake quantization on) are stored as their integers plus scales,
    so loading gives back exactly the weights the quantized model computes with; other tensors
    as they are. Either is stored as a bitmask plus non-zeros when that is smaller.
    """
    from safetensors.numpy import save_file

    layers = {
        f"{name}.weight": q
        for name, q in qb.quantized_layers(module).items()
        if q.controls.fake_quant
    }
    pools = _Pools()
    index: dict[str, dict[str, Any]] = {}
    raw: dict[str, np.ndarray] = {}
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        entry: dict[str, Any] = {"s": list(tensor.shape)}
        if tensor.dtype != torch.float32:  # float32 is the default: keep the header small
            entry["d"] = str(tensor.dtype).removeprefix("torch.")
        quantizer = layers.get(key)
        if quantizer is not None:
            values = quantizer.integer_weight().numpy().reshape(-1)
            zero_point = quantizer.weight_zero_point.cpu().numpy().astype(np.int8)
            # A zero weight is its channel's zero point in integers (0 when symmetric).
            nonzero = values != np.repeat(zero_point, values.size // zero_point.size)
            entry.update(e="q", b=quantizer.spec.num_bits)
            entry["sc"] = pools.add("f32", quantizer.weight_scale.cpu().numpy())
            if not quantizer.spec.symmetric:
                entry["zp"] = pools.add("i8", zero_point)
            bits = quantizer.spec.num_bits
        elif tensor.is_floating_point():
            values = tensor.to(torch.float32).numpy().reshape(-1)
            nonzero = values != 0
            entry["e"] = "f"
            bits = 32
        else:
            raw[key] = tensor.numpy()
            index[key] = {"e": "raw"}
            continue
        count = values.size
        kept = int(nonzero.sum())
        per_value = _value_bytes(entry["e"], bits)
        sparse = count / 8 + kept * per_value < count * per_value
        if sparse:
            entry["m"] = pools.add("u8", np.packbits(nonzero))
            values = values[nonzero]
        if entry["e"] == "f":
            entry["v"] = pools.add("f32", values)
        elif bits == 4:
            entry["v"] = pools.add("u8", _pack_nibbles(values))
            entry["n"] = int(values.size)
        else:
            entry["v"] = pools.add("i8", values)
        index[key] = entry
    # Layers grouped by spec (one group unless two QAT instances differ); each group's input
    # ranges are consecutive (min, max) pairs in the f32 pool, in the order of its layers.
    groups: dict[str, dict[str, Any]] = {}
    for name, quantizer in layers.items():
        spec = quantizer.spec.to_dict()
        group = groups.setdefault(json.dumps(spec, sort_keys=True), {"spec": spec, "layers": []})
        group["layers"].append(name.removesuffix(".weight"))
        bounds = torch.stack([quantizer.input_min.cpu(), quantizer.input_max.cpu()]).numpy()
        start = pools.add("f32", bounds)[0]
        group.setdefault("r", start)
    tensors = {**pools.tensors(), **raw}
    metadata = {
        "format": _COMPRESSED_FORMAT,
        "version": str(_COMPRESSED_VERSION),
        "index": json.dumps(index, separators=(",", ":")),
        "quantization": json.dumps(list(groups.values()), separators=(",", ":")),
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path).stat().st_size


def _read(pools: Mapping[str, np.ndarray], pool: str, where: list[int]) -> np.ndarray:
    return pools[pool][where[0] : where[1]]


def load_compressed(path: str | Path, module: nn.Module) -> nn.Module:
    """Load ``compressed.safetensors`` into ``module`` (same architecture), quantization included.

    The weights become exactly those the saved model computed with; layers that were quantized
    get their scales and input ranges back (fake quantization on, observers off), installed now if
    ``module`` is not quantized yet. So ``module`` then gives the saved model's outputs bit for bit.

    Raises:
        ValueError: not a lightning_sparse compressed file.
        CheckpointMismatchError: its tensors do not fit ``module``.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
        pools = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if metadata.get("format") != _COMPRESSED_FORMAT:
        raise ValueError(f"{path} is not a {_COMPRESSED_FORMAT} file.")
    index: dict[str, dict[str, Any]] = json.loads(metadata["index"])
    groups: list[dict[str, Any]] = json.loads(metadata.get("quantization", "[]"))
    state: dict[str, torch.Tensor] = {}
    for key, entry in index.items():
        if entry["e"] == "raw":
            state[key] = torch.from_numpy(pools[key].copy())
            continue
        shape, count = entry["s"], math.prod(entry["s"])
        mask = (
            np.unpackbits(_read(pools, "u8", entry["m"]), count=count).astype(bool)
            if "m" in entry
            else None
        )
        kept = int(mask.sum()) if mask is not None else count
        if entry["e"] == "f":
            values = _read(pools, "f32", entry["v"])
        elif entry["b"] == 4:
            values = _unpack_nibbles(_read(pools, "u8", entry["v"]), entry["n"])
        else:
            values = _read(pools, "i8", entry["v"])
        channels = len(_read(pools, "f32", entry["sc"])) if entry["e"] == "q" else 1
        if entry["e"] == "q" and "zp" in entry:
            zero_point = _read(pools, "i8", entry["zp"]).astype(np.int32)
        else:
            zero_point = np.zeros(channels, dtype=np.int32)
        if mask is not None:
            filled = np.repeat(zero_point, count // channels) if entry["e"] == "q" else None
            dense = filled.copy() if filled is not None else np.zeros(count, np.float32)
            dense[mask] = values[:kept]
            values = dense
        if entry["e"] == "q":
            scale = torch.from_numpy(_read(pools, "f32", entry["sc"]).copy())
            ints = torch.from_numpy(values.astype(np.int32)).reshape(shape)
            column = (-1,) + (1,) * (len(shape) - 1)
            zp = torch.from_numpy(zero_point.copy()).reshape(column)
            # Same arithmetic as the fake-quant kernels: float(q - zero_point) * scale.
            weight = (ints - zp).to(torch.float32) * scale.reshape(column)
            state[key] = weight.to(getattr(torch, entry.get("d", "float32")))
        else:
            state[key] = torch.from_numpy(values.astype(np.float32)).reshape(shape)
            state[key] = state[key].to(getattr(torch, entry.get("d", "float32")))
    check_state_dict(state, module, source=f"compressed file {Path(path).name}")
    module.load_state_dict(state, strict=True)
    for group in groups:
        _restore_compressed_quantization(module, index, group, pools)
    return module


def _restore_compressed_quantization(
    module: nn.Module,
    index: Mapping[str, Mapping[str, Any]],
    group: Mapping[str, Any],
    pools: Mapping[str, np.ndarray],
) -> None:
    layers: dict[str, dict[str, Any]] = {}
    for position, name in enumerate(group["layers"]):
        entry = index[f"{name}.weight"]
        scale = torch.from_numpy(_read(pools, "f32", entry["sc"]).copy())
        if "zp" in entry:
            zero_point = torch.from_numpy(_read(pools, "i8", entry["zp"]).astype(np.int32))
        else:
            zero_point = torch.zeros(scale.shape, dtype=torch.int32)
        start = group["r"] + 2 * position
        bounds = torch.from_numpy(pools["f32"][start : start + 2].copy())
        layers[name] = {
            "weight_scale": scale,
            "weight_zero_point": zero_point,
            "weight_observed": True,
            "input_min": bounds[0].clone(),
            "input_max": bounds[1].clone(),
            "input_observed": True,
        }
    state = {
        "format": qb.STATE_FORMAT,
        "version": 1,
        "spec": group["spec"],
        "fake_quant_enabled": True,
        "observer_enabled": False,
        "layers": layers,
    }
    existing = qb.quantized_layers(module)
    if not any(name in existing for name in layers):
        qb.restore(module, state)
        return
    for name, layer_state in layers.items():
        if name not in existing:
            raise ValueError(
                f"layer {name!r} is quantized in the compressed file but not in the model, whose "
                f"quantized layers are {sorted(existing)}."
            )
        existing[name].load_state_dict(layer_state, name)
        existing[name].controls.fake_quant = True
        existing[name].controls.observe = False


# --------------------------------------------------------------------------------------------
# ONNX export and evaluation


@contextlib.contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` that replaces it only if the block succeeds."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp makes a private directory; give it (and the files in it) the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's prints and its optimizer's INFO logs; show the prints on error."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-5000:])
        raise
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _float_mode(module: nn.Module) -> Iterator[None]:
    """Every quantized layer of ``module`` computes in float for the duration."""
    controls = {id(q.controls): q.controls for q in qb.quantized_layers(module).values()}
    saved = {key: (c.fake_quant, c.observe) for key, c in controls.items()}
    for c in controls.values():
        c.fake_quant = c.observe = False
    try:
        yield
    finally:
        for key, c in controls.items():
            c.fake_quant, c.observe = saved[key]


def _batches(datamodule: pl.LightningDataModule) -> Iterator[tuple[torch.Tensor, Any]]:
    datamodule.setup("test")
    for batch in datamodule.test_dataloader():
        if isinstance(batch, (list, tuple)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def _latency_batch(datamodule: pl.LightningDataModule, size: int) -> np.ndarray:
    inputs: list[torch.Tensor] = []
    count = 0
    for x, _ in _batches(datamodule):
        inputs.append(x)
        count += len(x)
        if count >= size:
            break
    batch = torch.cat(inputs)
    repeats = math.ceil(size / len(batch))
    return batch.repeat(repeats, *([1] * (batch.dim() - 1)))[:size].float().numpy()


def export_model(
    module: nn.Module,
    datamodule: pl.LightningDataModule,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    latency_runs: int = 50,
    threads: int | None = None,
) -> dict[str, Any]:
    """Write ``model.onnx``, ``model_int8.onnx`` (if quantized), ``compressed.safetensors``.

    Evaluates both ONNX models with ONNX Runtime on ``datamodule``'s test split and times them side
    by side. ``module`` is used on the CPU in eval mode and given back as it was (device, mode,
    quantization phase).

    Args:
        module: the trained model; its forward takes the first element of a test batch.
        datamodule: supplies the test split (``(inputs, labels)`` batches; labels optional).
        out_dir: the export directory (replaced as a whole), e.g. ``<run dir>/export``.
        batch_size: batch of the latency measurement.
        latency_runs: timed runs per model (after a warm-up).
        threads: ONNX Runtime intra-op threads (None: its default, all cores).

    Returns:
        ``onnx_fp32_path``, ``onnx_int8_path``, ``compressed_path``, ``onnx_fp32_acc``,
        ``onnx_int8_acc``, ``onnx_fp32_max_abs_diff`` (vs PyTorch), ``onnx_int8_agreement``
        (top-1 agreement with PyTorch's fake-quantized model), ``ort_fp32_ms``, ``ort_int8_ms``,
        ``latency_batch_size``, ``dense_bytes``, ``compressed_bytes``, ``compression_ratio``.
        Int8 fields are None when the model is not quantized; accuracies when batches have no
        labels.

    Raises:
        ValueError: ``batch_size`` or ``latency_runs`` < 1; a quantized layer was never
            calibrated.
    """
    for field, value in (("batch_size", batch_size), ("latency_runs", latency_runs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{field}`={value!r} is not allowed; it must be an int >= 1.")
    out_dir = Path(out_dir)
    layers = {name: q for name, q in qb.quantized_layers(module).items() if q.controls.fake_quant}
    uncalibrated = [name for name, q in layers.items() if not q.input_observed]
    if uncalibrated:
        raise ValueError(
            f"quantized layers {uncalibrated} have no observed input range; calibrate (ptq) or "
            "train with QAT observers on before exporting."
        )
    device = next(module.parameters()).device
    was_training = module.training
    module.cpu().eval()
    try:
        with _atomic_dir(out_dir) as tmp:
            summary = _export(module, datamodule, tmp, layers, batch_size, latency_runs, threads)
            for key in ("onnx_fp32_path", "onnx_int8_path", "compressed_path"):
                if summary[key] is not None:
                    summary[key] = str(out_dir / Path(summary[key]).name)
            summary["export_dir"] = str(out_dir)
            (tmp / EXPORT_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        module.to(device).train(was_training)
    return summary


@torch.no_grad()
def _export(
    module: nn.Module,
    datamodule: pl.LightningDataModule,
    tmp: Path,
    layers: Mapping[str, qb.LayerQuantizer],
    batch_size: int,
    latency_runs: int,
    threads: int | None,
) -> dict[str, Any]:
    import onnx

    example = next(_batches(datamodule))[0][:2].float()
    if len(example) < 2:  # a batch of 1 would fix the exported batch dimension
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    with _float_mode(module), _quiet():
        fp32_proto, base = qb.export_onnx(module, example)
    fp32_path = tmp / ONNX_FILE
    onnx.save(fp32_proto, str(fp32_path))
    int8_path: Path | None = None
    if layers:
        numbers = {f"{name}.weight": qb.onnx_layer_quant(q) for name, q in layers.items()}
        int8_path = tmp / INT8_FILE
        onnx.save(qb.quantize_onnx(base, numbers), str(int8_path))

    sessions = {"fp32": qb.OrtModel(fp32_path, threads)}
    if int8_path is not None:
        sessions["int8"] = qb.OrtModel(int8_path, threads)
    correct = {name: 0 for name in sessions}
    agree, total, labelled = 0, 0, True
    max_diff = 0.0
    for x, y in _batches(datamodule):
        x = x.float()
        inputs = x.numpy()
        with _float_mode(module):
            reference = module(x).numpy()
        outputs = {name: session(inputs) for name, session in sessions.items()}
        max_diff = max(max_diff, float(np.abs(outputs["fp32"] - reference).max()))
        if "int8" in outputs:
            quantized_reference = module(x).numpy()
            agree += int((outputs["int8"].argmax(1) == quantized_reference.argmax(1)).sum())
        if y is None:
            labelled = False
        else:
            labels = y.numpy()
            for name, logits in outputs.items():
                correct[name] += int((logits.argmax(1) == labels).sum())
        total += len(x)
    latency = qb.interleaved_latency_ms(
        sessions, _latency_batch(datamodule, batch_size), runs=latency_runs
    )
    if max_diff > 1e-4:
        log.warning("model.onnx differs from PyTorch by up to %.3g (> 1e-4).", max_diff)
    compressed_path = tmp / COMPRESSED_FILE
    compressed = save_compressed(module, compressed_path)
    dense = dense_bytes(module)

    def accuracy(name: str) -> float | None:
        return correct[name] / total if labelled and name in sessions and total else None

    return {
        "onnx_fp32_path": str(fp32_path),
        "onnx_int8_path": str(int8_path) if int8_path else None,
        "compressed_path": str(compressed_path),
        "onnx_fp32_acc": accuracy("fp32"),
        "onnx_int8_acc": accuracy("int8"),
        "onnx_fp32_max_abs_diff": max_diff,
        "onnx_int8_agreement": agree / total if int8_path and total else None,
        "ort_fp32_ms": latency["fp32"],
        "ort_int8_ms": latency.get("int8"),
        "latency_batch_size": batch_size,
        "dense_bytes": dense,
        "compressed_bytes": compressed,
        "compression_ratio": dense / compressed,
        "quantized_layers": list(layers),
    }


# --------------------------------------------------------------------------------------------
# Entry point


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export the checkpoint ``cfg.ckpt_path`` of the model ``cfg.model`` (``conf/export.yaml``).

    Nothing is written before the checkpoint is known to fit the model.

    Raises:
        FileNotFoundError: ``ckpt_path`` is not a file.
        CheckpointMismatchError: the checkpoint does not fit ``model=`` (names the first key).
    """
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module: pl.LightningModule = instantiate(cfg.model)
    quantized = load_checkpoint(module, str(cfg.ckpt_path))
    out_dir = Path(str(cfg.out_dir)) if cfg.get("out_dir") else _run_dir(cfg) / "export"
    log.info("Exporting %s (%d quantized layers) to %s", cfg.ckpt_path, len(quantized), out_dir)
    summary = export_model(
        module,
        datamodule,
        out_dir,
        batch_size=int(cfg.batch_size),
        latency_runs=int(cfg.latency_runs),
        threads=cfg.get("threads"),
    )
    for key, value in summary.items():
        log.info("%s: %s", key, value)
    return summary


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    """``python -m lightning_sparse.export ckpt_path=...``."""
    run(cfg)


if __name__ == "__main__":
    main()
