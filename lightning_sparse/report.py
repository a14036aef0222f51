"""What a run bought: ``summary.json`` in the run dir and the same as a table on stdout.

Sparsity is measured on the weights themselves (zeros / elements), never read back from a schedule,
so the summary shows what the model really holds.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_sparse.targets import prunable_parameters

__all__ = [
    "SUMMARY_FILE",
    "build_summary",
    "print_summary",
    "pruned_parameter_names",
    "sparsity_stats",
    "summary_table",
    "write_summary",
]

SUMMARY_FILE = "summary.json"


def pruned_parameter_names(model: nn.Module, callbacks: Iterable[object]) -> list[str]:
    """Weights the callbacks prune (their ``target_names``), else every prunable weight.

    A dense run has no pruning callback; it is then measured over the weights a default pruning
    recipe would touch, so dense and pruned summaries compare like for like.
    """
    names: dict[str, None] = {}
    for callback in callbacks:
        for name in getattr(callback, "target_names", None) or []:
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
    """
    names = pruned_parameter_names(model, callbacks)
    sparsity, per_layer = sparsity_stats(model, names)
    params_total, params_nonzero = _count(model)
    return {
        "test_acc": test_acc,
        "val_acc": val_acc,
        "sparsity": sparsity,
        "sparsity_per_layer": per_layer,
        "recipe": {"name": recipe_name, "config": dict(recipe)},
        "seed": int(seed),
        "epochs": int(epochs),
        "params_total": params_total,
        "params_nonzero": params_nonzero,
        "checkpoint": checkpoint,
        "run_dir": str(run_dir),
    }


def write_summary(summary: Mapping[str, Any], run_dir: str | Path) -> Path:
    """Write ``summary.json`` into ``run_dir`` atomically; return its path.

    A reader (a sweep's comparison, a dashboard) never sees a half-written file: the JSON goes to a
    temporary file in the same directory, which then replaces the target in one step.
    """
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SUMMARY_FILE
    descriptor, tmp_name = tempfile.mkstemp(prefix=".summary-", suffix=".json", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(summary, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def summary_table(summary: Mapping[str, Any]) -> Table:
    """The summary as a rich table: headline numbers, then sparsity per layer."""
    recipe = summary.get("recipe") or {}
    table = Table(title=f"lightning_sparse: {recipe.get('name') or 'run'}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("test accuracy", _percent(summary.get("test_acc")))
    table.add_row("val accuracy", _percent(summary.get("val_acc")))
    table.add_row("sparsity (pruned weights)", _percent(summary.get("sparsity")))
    table.add_row(
        "nonzero / total params",
        f"{summary.get('params_nonzero', 0):,} / {summary.get('params_total', 0):,}",
    )
    table.add_row("epochs", str(summary.get("epochs")))
    table.add_row("seed", str(summary.get("seed")))
    table.add_section()
    for name, value in (summary.get("sparsity_per_layer") or {}).items():
        table.add_row(f"  {name}", _percent(value))
    table.add_section()
    table.add_row("run dir", str(summary.get("run_dir")))
    return table


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Print :func:`summary_table` in one console print (call it on rank zero only)."""
    (console or Console()).print(summary_table(summary))
