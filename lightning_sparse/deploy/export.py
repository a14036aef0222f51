"""Export a trained model: ONNX fp32 and int8, a compressed checkpoint, and what each measures."""

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

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from lightning_sparse.core.fake_quant import LayerQuantizer, quantized_layers
from lightning_sparse.deploy.compressed import COMPRESSED_FILE, dense_bytes, save_compressed
from lightning_sparse.deploy.dense import DENSE_SESSION, dense_session, size_fields, speed_fields
from lightning_sparse.deploy.onnx_int8 import export_onnx, onnx_layer_quant, quantize_onnx
from lightning_sparse.deploy.ort import OrtModel, interleaved_latency_ms

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
EXPORT_SUMMARY_FILE = "export.json"

__all__ = [
    "export_model",
]


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
    controls = {id(q.controls): q.controls for q in quantized_layers(module).values()}
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
    dense: nn.Module | None = None,
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
        dense: the dense model of the same run (its snapshot, or one built from the same config),
            exported in fp32 and timed beside the others (not written to ``out_dir``).

    Returns:
        ``onnx_fp32_path``, ``onnx_int8_path``, ``compressed_path``, ``onnx_fp32_acc``,
        ``onnx_int8_acc``, ``onnx_fp32_max_abs_diff`` (vs PyTorch), ``onnx_int8_agreement``
        (top-1 agreement with PyTorch's fake-quantized model), ``ort_fp32_ms``, ``ort_int8_ms``,
        ``latency_batch_size``, ``dense_bytes``, ``compressed_bytes``, ``compression_ratio``,
        ``macs`` and ``params`` (per sample, Conv/Linear; ``deploy.dense``), and with ``dense``
        ``macs_dense``, ``params_dense``, ``ort_dense_fp32_ms``, ``speedup_vs_dense`` (None
        without). Int8 fields are None when the model is not quantized; accuracies when batches
        have no labels.

    Raises:
        ValueError: ``batch_size`` or ``latency_runs`` < 1; a quantized layer was never
            calibrated.
    """
    for field, value in (("batch_size", batch_size), ("latency_runs", latency_runs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{field}`={value!r} is not allowed; it must be an int >= 1.")
    out_dir = Path(out_dir)
    layers = {name: q for name, q in quantized_layers(module).items() if q.controls.fake_quant}
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
            summary = _export(
                module, datamodule, tmp, layers, batch_size, latency_runs, threads, dense
            )
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
    layers: Mapping[str, LayerQuantizer],
    batch_size: int,
    latency_runs: int,
    threads: int | None,
    dense: nn.Module | None = None,
) -> dict[str, Any]:
    import onnx

    example = next(_batches(datamodule))[0][:2].float()
    if len(example) < 2:  # a batch of 1 would fix the exported batch dimension
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    with _float_mode(module), _quiet():
        fp32_proto, base = export_onnx(module, example)
    fp32_path = tmp / ONNX_FILE
    onnx.save(fp32_proto, str(fp32_path))
    int8_path: Path | None = None
    if layers:
        numbers = {f"{name}.weight": onnx_layer_quant(q) for name, q in layers.items()}
        int8_path = tmp / INT8_FILE
        onnx.save(quantize_onnx(base, numbers), str(int8_path))

    sessions = {"fp32": OrtModel(fp32_path, threads)}
    if int8_path is not None:
        sessions["int8"] = OrtModel(int8_path, threads)
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
    with tempfile.TemporaryDirectory() as dense_dir:
        timed: dict[str, Any] = dict(sessions)
        if dense is not None:
            with _quiet():
                timed[DENSE_SESSION] = dense_session(dense, example, Path(dense_dir), threads)
        latency = interleaved_latency_ms(
            timed, _latency_batch(datamodule, batch_size), runs=latency_runs
        )
    with _float_mode(module):
        sizes = size_fields(module, dense, example[:1])
    if max_diff > 1e-4:
        log.warning("model.onnx differs from PyTorch by up to %.3g (> 1e-4).", max_diff)
    compressed_path = tmp / COMPRESSED_FILE
    compressed = save_compressed(module, compressed_path)
    stored_dense = dense_bytes(module)

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
        "dense_bytes": stored_dense,
        "compressed_bytes": compressed,
        "compression_ratio": stored_dense / compressed,
        "quantized_layers": list(layers),
        **sizes,
        **speed_fields(latency),
    }
