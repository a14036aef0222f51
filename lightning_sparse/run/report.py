"""What a run bought: ``summary.json``, ``environment.json`` and plots; a table on stdout.

Sparsity is measured on the weights themselves (zeros / elements), never read back from a schedule,
so the summary shows what the model really holds. A summary carries a ``status``: ``ok``,
``interrupted`` (training stopped early; what was trained is measured) or ``failed`` (the error
instead of metrics), so a sweep's comparison can tell the three apart.

Plots live in :mod:`lightning_sparse.run.plots` (re-exported here).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks.base import MASKS, CompressionCallback
from lightning_sparse.core.targets import prunable_parameters, unknown_layer_weights
from lightning_sparse.run.console import show, show_line
from lightning_sparse.run.files import (
    ENVIRONMENT_FILE,
    PLOTS_DIR,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_OK,
    SUMMARY_FILE,
)
from lightning_sparse.run.plots import (
    plot_pareto,
    plot_sparsity_per_layer,
    plot_sparsity_schedule,
    plots_available,
)

__all__ = [
    "ENVIRONMENT_FILE",
    "PLOTS_DIR",
    "STATUS_FAILED",
    "STATUS_INTERRUPTED",
    "STATUS_OK",
    "SUMMARY_FILE",
    "SparsityHistory",
    "build_summary",
    "environment_info",
    "failure_summary",
    "plot_pareto",
    "plot_sparsity_per_layer",
    "plot_sparsity_schedule",
    "plots_available",
    "print_summary",
    "pruned_parameter_names",
    "sparsity_stats",
    "summary_footer",
    "summary_table",
    "tensor_digest",
    "weights_digest",
    "write_json",
    "write_summary",
]

log = logging.getLogger(__name__)


# Distributions whose versions a run records: the core stack, then optional backends (None when
# not installed). Looked up by distribution name, so nothing here gets imported.
_CORE_PACKAGES = (
    "lightning_sparse",
    "torch",
    "lightning",
    "hydra-core",
    "omegaconf",
    "torchmetrics",
)
_BACKEND_PACKAGES = (
    "numpy",
    "torchvision",
    "wandb",
    "matplotlib",
    "hydra-joblib-launcher",
    "hydra-submitit-launcher",
    "submitit",
    "hydra-optuna-sweeper",
    "optuna",
    "onnx",
    "onnxruntime",
    "torchao",
    "safetensors",
    "torch-pruning",
)


def pruned_parameter_names(model: nn.Module, callbacks: Iterable[object]) -> list[str]:
    """Weights the callbacks prune (their ``target_names``), else every prunable weight.

    A dense run has no pruning callback; it is then measured over the weights a default pruning
    recipe would touch, so dense and pruned summaries compare like for like.
    """
    names: dict[str, None] = {}
    for callback in callbacks:
        if isinstance(callback, CompressionCallback) and MASKS in callback.changes:
            targets = callback.target_names
        elif isinstance(callback, CompressionCallback):
            continue
        else:  # a one-shot step: it prunes what it names
            targets = getattr(callback, "target_names", None) or []
        for name in targets:
            names.setdefault(name, None)
    return list(names) if names else list(prunable_parameters(model))


def sparsity_stats(model: nn.Module, names: Iterable[str]) -> tuple[float, dict[str, float]]:
    """Overall fraction of zeros over the named parameters together, and per parameter."""
    params = dict(model.named_parameters())
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name in names:
        weight = params[name].detach()
        layer_zeros = int((weight == 0).sum().item())
        per_layer[name] = layer_zeros / weight.numel() if weight.numel() else 0.0
        zeros += layer_zeros
        total += weight.numel()
    return (zeros / total if total else 0.0), per_layer


def _count(model: nn.Module) -> tuple[int, int]:
    total = nonzero = 0
    for param in model.parameters():
        total += param.numel()
        nonzero += int(torch.count_nonzero(param.detach()).item())
    return total, nonzero


def build_summary(
    model: nn.Module,
    callbacks: Iterable[object],
    *,
    test_acc: float | None,
    val_acc: float | None,
    seed: int,
    epochs: int,
    recipe_name: str | None,
    recipe: Mapping[str, Any],
    checkpoint: str | None,
    run_dir: str | Path,
    status: str = STATUS_OK,
    environment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's summary as JSON-ready data.

    Args:
        model: the trained model (a LightningModule: parameter names as the callbacks see them).
        callbacks: the trainer's callbacks; those with ``target_names`` define the pruned weights.
        test_acc: accuracy on the test split.
        val_acc: accuracy on the validation split at the end of training.
        seed: the run's seed.
        epochs: epochs trained.
        recipe_name: the recipe's name (``conf/recipe/<name>.yaml``), if known.
        recipe: the resolved recipe.
        checkpoint: path of the last checkpoint, if one was saved.
        run_dir: the run directory.
        status: ``ok``, or ``interrupted`` when training stopped before its end.
        environment: :func:`environment_info`, recorded for reproducibility.
    """
    names = pruned_parameter_names(model, callbacks)
    sparsity, per_layer = sparsity_stats(model, names)
    params_total, params_nonzero = _count(model)
    return {
        "status": status,
        "test_acc": test_acc,
        "val_acc": val_acc,
        "sparsity": sparsity,
        "sparsity_per_layer": per_layer,
        "recipe": {"name": recipe_name, "config": dict(recipe)},
        "seed": int(seed),
        "epochs": int(epochs),
        "params_total": params_total,
        "params_nonzero": params_nonzero,
        # Equal digests mean bit-identical final weights (e.g. two runs with the same seed).
        "weights_digest": weights_digest(model.state_dict()),
        # 2-D+ weights of layer types no technique knows: left dense (register_layer_kind).
        "unknown_layer_weights": unknown_layer_weights(model),
        "checkpoint": checkpoint,
        "run_dir": str(run_dir),
        "environment": dict(environment) if environment is not None else None,
    }


def failure_summary(
    error: BaseException,
    *,
    seed: int | None,
    recipe_name: str | None,
    run_dir: str | Path,
    environment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of a run that raised: ``status: failed``, the error and its traceback.

    Metrics are present and null, so a reader can treat every summary alike.

    Args:
        error: what the run raised.
        seed: the run's seed, if known.
        recipe_name: the recipe's name, if known.
        run_dir: the run directory.
        environment: :func:`environment_info`.
    """
    return {
        "status": STATUS_FAILED,
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(error)),
        "test_acc": None,
        "val_acc": None,
        "sparsity": None,
        "params_nonzero": None,
        "params_total": None,
        "recipe": {"name": recipe_name},
        "seed": seed,
        "run_dir": str(run_dir),
        "environment": dict(environment) if environment is not None else None,
    }


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; return the path.

    A reader (a sweep's comparison, a dashboard) never sees a half-written file: the JSON goes to a
    temporary file in the same directory, which then replaces the target in one step. The file
    gets the permissions the umask gives any new file (a temporary file is private, 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem}-", suffix=".json", dir=path.parent
    )
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(descriptor, 0o666 & ~umask)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_summary(summary: Mapping[str, Any], run_dir: str | Path) -> Path:
    """Write ``summary.json`` into ``run_dir`` atomically (:func:`write_json`); return its path."""
    return write_json(summary, Path(run_dir) / SUMMARY_FILE)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(directory: Path) -> dict[str, Any]:
    """Commit and dirtiness of the checkout holding ``directory``; ``unknown`` outside one."""
    unknown: dict[str, Any] = {"commit": "unknown", "dirty": None}
    if not any((parent / ".git").exists() for parent in (directory, *directory.parents)):
        return unknown  # an installed wheel: no checkout, and no git call that could hang
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return unknown
    return {"commit": commit or "unknown", "dirty": bool(status.strip())}


def environment_info() -> dict[str, Any]:
    """What a rerun needs to match this one: the package's git commit and the software versions.

    ``git.commit`` is ``unknown`` when the package is not in a git checkout (an installed wheel);
    ``git.dirty`` tells whether tracked files differ from that commit. Backends that are not
    installed are recorded as ``null``. ``threads`` is torch's intra-op thread count in force
    (the ``threads`` config value, set before any work).
    """
    package_dir = Path(__file__).resolve().parent
    return {
        "git": _git_commit(package_dir),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _CORE_PACKAGES},
        "backends": {name: _version(name) for name in _BACKEND_PACKAGES},
        "cuda": torch.version.cuda,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        # Results depend on the thread count (reduction order), so a rerun must match it.
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: equal digests mean equal tensors."""
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    # reshape: a 0-dim tensor (a scale, a step count) cannot be viewed as bytes directly
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """One SHA-256 over named tensors in name order (e.g. a model's parameters)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensor_digest(tensors[name]).encode())
    return digest.hexdigest()


class SparsityHistory(Callback):
    """Records the measured sparsity of the pruned weights at the start and after every epoch.

    When it acts: ``on_train_start`` (after the techniques' own start, if it comes after them in
    the callback list) and ``on_train_epoch_end``. The history feeds the schedule plot; it is
    measured on the weights, like the summary, so it shows what the schedule really achieved.
    """

    def __init__(self) -> None:
        self.history: list[tuple[float, float]] = []

    def __repr__(self) -> str:
        return f"SparsityHistory(points={len(self.history)})"

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: float) -> None:
        names = pruned_parameter_names(pl_module, trainer.callbacks)  # type: ignore[attr-defined]
        self.history.append((epoch, sparsity_stats(pl_module, names)[0]))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module, float(trainer.current_epoch))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module, float(trainer.current_epoch + 1))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def summary_table(summary: Mapping[str, Any]) -> Table:
    """The summary as a rich table: headline numbers, then sparsity per layer."""
    recipe = summary.get("recipe") or {}
    table = Table(title=f"lightning_sparse: {recipe.get('name') or 'run'}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    status = summary.get("status", STATUS_OK)
    if status != STATUS_OK:
        table.add_row("status", f"[bold red]{status}[/]")
    table.add_row("test accuracy", _percent(summary.get("test_acc")))
    _add_dense_rows(table, summary)
    table.add_row("val accuracy", _percent(summary.get("val_acc")))
    table.add_row("sparsity (pruned weights)", _percent(summary.get("sparsity")))
    table.add_row(
        "nonzero / total params",
        f"{summary.get('params_nonzero', 0):,} / {summary.get('params_total', 0):,}",
    )
    table.add_row("epochs", str(summary.get("epochs")))
    table.add_row("seed", str(summary.get("seed")))
    threads = (summary.get("environment") or {}).get("threads")
    if threads is not None:
        table.add_row("threads (torch intra-op)", str(threads))
    if summary.get("compressed_bytes") is not None:
        table.add_section()
        table.add_row("ONNX Runtime fp32 accuracy", _percent(summary.get("onnx_fp32_acc")))
        if summary.get("onnx_int8_acc") is not None:
            table.add_row("ONNX Runtime int8 accuracy", _percent(summary.get("onnx_int8_acc")))
        for key, label in (("ort_fp32_ms", "fp32"), ("ort_int8_ms", "int8")):
            if summary.get(key) is not None:
                batch = summary.get("latency_batch_size")
                table.add_row(
                    f"ONNX Runtime {label} latency (batch {batch})", f"{summary[key]:.2f} ms"
                )
        table.add_row(
            "dense fp32 / compressed bytes",
            f"{summary['dense_bytes']:,} / {summary['compressed_bytes']:,} "
            f"({summary.get('compression_ratio', 0):.1f}x)",
        )
        _add_speed_rows(table, summary)
        _add_early_exit_rows(table, summary)
    table.add_section()
    for name, value in (summary.get("sparsity_per_layer") or {}).items():
        table.add_row(f"  {name}", _percent(value))
    return table


def summary_footer(summary: Mapping[str, Any]) -> list[str]:
    """The lines printed under the table: the run dir and the git commit, whole at any width.

    They are what ``resume=``, ``ckpt_path=`` and a rerun need, so they are never cut to a
    table cell.
    """
    lines = []
    if summary.get("run_dir"):
        lines.append(f"run dir: {summary['run_dir']}")
    git = (summary.get("environment") or {}).get("git") or {}
    if git:
        lines.append(f"git commit: {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}")
    return lines


def _add_early_exit_rows(table: Table, summary: Mapping[str, Any]) -> None:
    """The early-exit deployment (export/early_exit): accuracy, latency and exits taken."""
    stages = summary.get("early_exit")
    if not isinstance(stages, Mapping):
        return
    if stages.get("error"):
        table.add_row("early-exit stages", f"not written: {stages['error']}")
        return
    table.add_row(
        "early exit: ONNX Runtime accuracy / plain",
        f"{_percent(stages.get('accuracy'))} / {_percent(stages.get('plain_accuracy'))}",
    )
    table.add_row(
        "early exit: mean latency (batch 1) / plain",
        f"{stages['mean_ms']:.3f} / {stages['plain_mean_ms']:.3f} ms "
        f"({stages['speedup']:.2f}x faster)",
    )
    fractions = ", ".join(
        f"{name} {share:.0%}"
        for name, share in zip([*stages["exits"], "full"], stages["exit_fractions"], strict=True)
    )
    table.add_row("early exit: inputs leaving at", fractions)


def _add_speed_rows(table: Table, summary: Mapping[str, Any]) -> None:
    """MACs and parameters against the dense model's, and the latency speed-up over it."""
    for key, label in (("macs", "MACs per sample"), ("params", "parameters")):
        value, dense = summary.get(key), summary.get(f"{key}_dense")
        if value is None:
            continue
        versus = f" / dense {dense:,} ({value / dense:.1%})" if dense else ""
        table.add_row(label, f"{value:,}{versus}")
    dense_ms = summary.get("ort_dense_fp32_ms")
    if dense_ms is not None:
        batch = summary.get("latency_batch_size")
        table.add_row(f"ONNX Runtime dense fp32 latency (batch {batch})", f"{dense_ms:.2f} ms")
        speedup = summary.get("speedup_vs_dense")
        if speedup is not None:
            table.add_row("speed-up vs dense fp32", f"{speedup:.2f}x")


def _add_dense_rows(table: Table, summary: Mapping[str, Any]) -> None:
    """Dense accuracy (``baseline``), and the final accuracies' difference from it."""
    how = summary.get("dense_baseline") or {}
    if not how:
        return
    dense = summary.get("dense_test_acc")
    if how.get("kind") == "train":
        label = "dense acc. (dense run, same setup)"
    elif how.get("epoch") is not None:
        label = f"dense acc. (snapshot, epoch {how['epoch']:.2f})"
    else:
        label = "dense acc. (none: compressed from 0)"
    table.add_row(label, _percent(dense))
    if dense is None:
        return
    names, deltas = [], []
    for key, name in (("test_acc", "test"), ("onnx_int8_acc", "int8")):
        value = summary.get(key)
        if value is not None:
            names.append(name)
            deltas.append(f"{100 * (value - dense):+.2f}")
    if deltas:
        table.add_row(f"vs dense ({' / '.join(names)})", f"{' / '.join(deltas)} pp")


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Print :func:`summary_table`, then :func:`summary_footer` (call it on rank zero only).

    The same text goes to the run's log file.
    """
    console = console or Console()
    show(summary_table(summary), console)
    for line in summary_footer(summary):
        show_line(line, console)
