"""Export a trained model: ONNX fp32 and int8, a compressed checkpoint, and what each measures."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_sparse.core.fake_quant import LayerQuantizer, quantized_layers
from lightning_sparse.deploy.compressed import COMPRESSED_FILE, dense_bytes, write_compressed
from lightning_sparse.deploy.dense import DENSE_SESSION, dense_session, size_fields, speed_fields
from lightning_sparse.deploy.early_exit import deploy_early_exit
from lightning_sparse.deploy.onnx_int8 import (
    ExportError,
    activation_tensors,
    call_model,
    export_onnx,
    flatten_inputs,
    onnx_layer_quant,
    quantize_activations,
    quantize_onnx,
    quiet_export,
)
from lightning_sparse.deploy.ort import OrtModel, interleaved_latency_ms, tensor_ranges

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
EXPORT_SUMMARY_FILE = "export.json"

__all__ = [
    "DEPLOYMENTS",
    "ExportError",
    "export_model",
    "register_deployment",
]

# How a technique's extra deployment form is written and measured:
# ``fn(module, batches, out_dir, spec, threads) -> summary``, where ``batches`` are the test
# split's ``(inputs, labels)`` and ``spec`` what the technique's ``deployment()`` gave.
DeploymentFn = Callable[
    [nn.Module, Iterable[tuple[Any, Any]], Path, Mapping[str, Any], int | None], dict[str, Any]
]
DEPLOYMENTS: dict[str, DeploymentFn] = {}


def register_deployment(kind: str, fn: DeploymentFn) -> DeploymentFn:
    """Register how deployments of ``kind`` (a technique's ``deployment()``) are written."""
    DEPLOYMENTS[kind] = fn
    return fn


register_deployment("early_exit", deploy_early_exit)


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
    for path in tmp.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


ExportData = Any  # a LightningDataModule, a DataLoader, or one model input


def _split(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a batch; a batch that is not a list or tuple is all inputs."""
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _batches(data: ExportData) -> Iterator[tuple[Any, Any]]:
    """``(inputs, labels or None)`` of every evaluation batch: the DataModule's test split, the
    DataLoader's batches, or the one example input (unlabelled)."""
    if isinstance(data, pl.LightningDataModule):
        data.setup("test")
        loader: Any = data.test_dataloader()
    elif isinstance(data, DataLoader):
        loader = data
    else:
        yield data, None
        return
    for batch in loader:
        yield _split(batch)


def _calibration_inputs(data: ExportData) -> Any:
    """Inputs to calibrate the int8 graph's remaining activation ranges on.

    A data module's validation batch (else its training batch), so that the test split that
    measures the export does not also set its numbers; a DataLoader's or an example's first batch
    as given (the caller chose them).
    """
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit")
        for split in ("val_dataloader", "train_dataloader"):
            try:
                loader = getattr(data, split)()
            except (NotImplementedError, MisconfigurationException):
                continue  # the data module does not define this split
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            batch = next(iter(loader), None) if loader is not None else None
            if batch is not None:
                return _split(batch)[0]
    return next(_batches(data))[0]


def _map(inputs: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) model input."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {key: _map(value, fn) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_map(value, fn) for value in inputs)
    return inputs


def _size(inputs: Any) -> int:
    _, leaves = flatten_inputs(inputs)
    return len(leaves[0][1])


def _numpy_inputs(inputs: Any) -> dict[str, np.ndarray]:
    _, leaves = flatten_inputs(inputs)
    return {name: tensor.numpy() for name, tensor in leaves}


def _latency_inputs(data: ExportData, size: int) -> dict[str, np.ndarray]:
    """``size`` samples (test samples repeated as needed), as the ONNX graph's named inputs."""
    parts: list[dict[str, np.ndarray]] = []
    count = 0
    for inputs, _ in _batches(data):
        arrays = _numpy_inputs(inputs)
        if parts and any(arrays[k].shape[1:] != parts[0][k].shape[1:] for k in arrays):
            break  # batches padded to other lengths: time the ones that stack
        parts.append(arrays)
        count += _size(inputs)
        if count >= size:
            break
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    repeats = math.ceil(size / len(next(iter(joined.values()))))
    return {name: np.concatenate([array] * repeats)[:size] for name, array in joined.items()}


def _counted(labels: torch.Tensor) -> torch.Tensor:
    """Positions that count: all, but for labels marked ignored (-100, token padding)."""
    return labels != -100


def export_model(
    module: nn.Module,
    data: ExportData,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    latency_runs: int = 50,
    threads: int | None = None,
    dense: nn.Module | None = None,
    deployments: Sequence[tuple[str, Mapping[str, Any]]] = (),
    eval_batches: int | None = None,
) -> dict[str, Any]:
    """Write ``model.onnx``, ``model_int8.onnx`` (if quantized), ``compressed.safetensors``.

    Evaluates both ONNX models with ONNX Runtime on ``data`` and times them side by side.
    ``module`` is used on the CPU in eval mode and given back as it was (device, mode,
    quantization phase). The model's input is kept as the data give it: int64 token ids stay
    int64, and a dict input (``{input_ids, attention_mask}``) becomes named graph inputs; the batch
    axis (and the sequence axis of integer inputs) is dynamic.

    Args:
        module: the trained model; its forward takes the first element of a test batch.
        data: a ``LightningDataModule`` (its test split), a ``DataLoader`` (``(inputs, labels)``
            batches, labels optional), or one model input (a tensor or a dict of tensors: no
            accuracy, latency on it repeated to ``batch_size``). Per-token labels of ``-100``
            (padding) do not count.
        out_dir: the export directory (replaced as a whole), e.g. ``<run dir>/export``.
        batch_size: batch of the latency measurement.
        latency_runs: timed runs per model (after a warm-up).
        threads: ONNX Runtime intra-op threads (None: its default, all cores).
        dense: the dense model of the same run (its snapshot, or one built from the same config),
            exported in fp32 and timed beside the others (not written to ``out_dir``).
        deployments: ``(kind, spec)`` of further forms the techniques ask for (their
            ``deployment()``, e.g. early exit's stages), each written to ``out_dir/<kind>/`` by
            its registered function and measured on ``data``; the summary gets what it
            measured under ``<kind>``, or ``{"error": ...}`` (and a warning) when it could not
            be written, without failing the rest of the export.
        eval_batches: evaluate on the first this many batches of ``data`` (None: all), e.g.
            the ``limit_test_batches`` the run's test pass used.

    Returns:
        ``onnx_fp32_path``, ``onnx_int8_path``, ``compressed_path``, ``onnx_fp32_acc``,
        ``onnx_int8_acc``, ``onnx_fp32_max_abs_diff`` (vs PyTorch), ``onnx_int8_agreement``
        (top-1 agreement with PyTorch's fake-quantized model), ``ort_fp32_ms``, ``ort_int8_ms``,
        ``latency_batch_size``, ``dense_bytes``, ``compressed_bytes``, ``compression_ratio``,
        ``compression`` (bits per weight of the compressed file next to the entropy bound of
        what it coded, in all and per tensor: :meth:`CompressedFile.summary`);
        ``macs`` and ``params`` (per sample, Conv/Linear; ``deploy.dense``), and with ``dense``
        ``macs_dense``, ``params_dense``, ``ort_dense_fp32_ms``, ``speedup_vs_dense`` (None
        without). Int8 fields are None when the model is not quantized; accuracies when batches
        have no labels.

    Raises:
        ValueError: ``batch_size`` or ``latency_runs`` < 1; a quantized layer was never
            calibrated.
        ExportError: the model cannot be exported (the message names it and the reason).

    Example::

        from lightning_sparse.deploy.export import export_model

        export_model(module, DigitsDataModule(), "export")            # a data module
        export_model(module, test_loader, "export")                   # a DataLoader
        export_model(module, torch.randn(8, 1, 8, 8), "export")       # an example input
    """
    unknown = sorted({kind for kind, _ in deployments} - set(DEPLOYMENTS))
    if unknown:
        raise ValueError(
            f"`deployments`: {unknown} not known to this lightning_sparse (known: "
            f"{', '.join(sorted(DEPLOYMENTS))}); register_deployment() adds one."
        )
    sizes = [("batch_size", batch_size), ("latency_runs", latency_runs)]
    if eval_batches is not None:
        sizes.append(("eval_batches", eval_batches))
    for field, value in sizes:
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
    if next(_batches(data), None) is None:
        raise ValueError(
            f"`data` gave no batch to export with ({type(data).__name__}); give a data module "
            "with a test split, a DataLoader, or an example input tensor."
        )
    device = next(module.parameters()).device
    was_training = module.training
    module.cpu().eval()
    try:
        with _atomic_dir(out_dir) as tmp:
            summary = _export(
                module, data, tmp, layers, batch_size, latency_runs, threads, dense, eval_batches
            )
            for kind, spec in deployments:
                summary[kind] = _deploy(kind, spec, module, data, tmp, out_dir, threads)
            for key in ("onnx_fp32_path", "onnx_int8_path", "compressed_path"):
                if summary[key] is not None:
                    summary[key] = str(out_dir / Path(summary[key]).name)
            summary["export_dir"] = str(out_dir)
            (tmp / EXPORT_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        module.to(device).train(was_training)
    return summary


def _deploy(
    kind: str,
    spec: Mapping[str, Any],
    module: nn.Module,
    data: ExportData,
    tmp: Path,
    out_dir: Path,
    threads: int | None,
) -> dict[str, Any]:
    """One technique's deployment form, written to ``tmp/<kind>``; its summary or its error."""
    try:
        with _float_mode(module):
            result = DEPLOYMENTS[kind](module, _batches(data), tmp / kind, spec, threads)
    except (ValueError, TypeError, RuntimeError) as err:
        # The plain export above stands on its own; a form that cannot be written is reported.
        log.warning("export: the %s deployment was not written: %s", kind, err)
        shutil.rmtree(tmp / kind, ignore_errors=True)
        return {"error": str(err)}
    return {"dir": str(out_dir / kind), **result}


@torch.no_grad()
def _export(
    module: nn.Module,
    data: ExportData,
    tmp: Path,
    layers: Mapping[str, LayerQuantizer],
    batch_size: int,
    latency_runs: int,
    threads: int | None,
    dense: nn.Module | None = None,
    eval_batches: int | None = None,
) -> dict[str, Any]:
    import onnx

    first = next(_batches(data), None)
    if first is None or not flatten_inputs(first[0])[1]:
        raise ValueError(
            f"`data` gave no batch to export with ({type(data).__name__}); give a test split "
            "with samples, a DataLoader or an example input tensor."
        )
    example = _map(first[0], lambda t: t[:2])
    if _size(example) < 2:  # a batch of 1 would fix the exported batch dimension
        example = _map(example, lambda t: t.repeat(2, *([1] * (t.dim() - 1))))
    with _float_mode(module), quiet_export():
        fp32_proto, base = export_onnx(module, example)
    fp32_path = tmp / ONNX_FILE
    onnx.save(fp32_proto, str(fp32_path))
    int8_path: Path | None = None
    if layers:
        numbers = {f"{name}.{q.kind.weight}": onnx_layer_quant(q) for name, q in layers.items()}
        int8_path = tmp / INT8_FILE
        int8 = quantize_onnx(base, numbers)
        calibrate = activation_tensors(int8)
        if calibrate:
            # Residual Adds, Concats and Conv outputs that QAT does not observe get the range
            # of one batch that is not test data, in the int8 graph (weights and layer inputs
            # as trained).
            ranges = tensor_ranges(
                int8, calibrate, [_numpy_inputs(_calibration_inputs(data))], threads
            )
            int8 = quantize_activations(int8, ranges)
        onnx.save(int8, str(int8_path))

    sessions = {"fp32": OrtModel(fp32_path, threads)}
    if int8_path is not None:
        sessions["int8"] = OrtModel(int8_path, threads)
    correct = {name: 0 for name in sessions}
    agree, total, labelled = 0, 0, True
    max_diff = 0.0
    for x, y in itertools.islice(_batches(data), eval_batches):
        inputs = _numpy_inputs(x)
        with _float_mode(module):
            reference = call_model(module, x).numpy()
        outputs = {name: session(inputs) for name, session in sessions.items()}
        max_diff = max(max_diff, float(np.abs(outputs["fp32"] - reference).max()))
        counted = _counted(y).numpy() if y is not None else np.ones(reference.shape[:-1], bool)
        if "int8" in outputs:
            quantized_reference = call_model(module, x).numpy()
            same = outputs["int8"].argmax(-1) == quantized_reference.argmax(-1)
            agree += int((same & counted).sum())
        if y is None:
            labelled = False
        else:
            labels = y.numpy()
            for name, logits in outputs.items():
                correct[name] += int(((logits.argmax(-1) == labels) & counted).sum())
        total += int(counted.sum())
    with tempfile.TemporaryDirectory() as dense_dir:
        timed: dict[str, Any] = dict(sessions)
        if dense is not None:
            with quiet_export():
                timed[DENSE_SESSION] = dense_session(dense, example, Path(dense_dir), threads)
        latency = interleaved_latency_ms(
            timed, _latency_inputs(data, batch_size), runs=latency_runs
        )
    if isinstance(example, torch.Tensor):
        with _float_mode(module):
            sizes = size_fields(module, dense, example[:1])
    else:  # MACs are counted by calling the model on one tensor; named inputs are not counted
        sizes = dict.fromkeys(("macs", "macs_dense", "params", "params_dense"))
    if max_diff > 1e-4:
        log.warning("model.onnx differs from PyTorch by up to %.3g (> 1e-4).", max_diff)
    compressed_path = tmp / COMPRESSED_FILE
    written = write_compressed(module, compressed_path)
    compressed = written.bytes
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
        "compression": written.summary(),
        "quantized_layers": list(layers),
        **sizes,
        **speed_fields(latency),
    }
