"""Compare the runs of a sweep: table, Markdown report, Pareto front."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig
from typing_extensions import override

from lightning_sparse.run import plots
from lightning_sparse.run.files import STATUS_FAILED, STATUS_OK, SUMMARY_FILE

__all__ = [
    "AXIS_LABELS",
    "DEFAULT_AXES",
    "LATENCY_KEYS",
    "MARKDOWN_FILE",
    "PLOT_FILE",
    "SIZE_KEYS",
    "RunRecord",
    "SweepFailedError",
    "SweepReport",
    "collect_runs",
    "is_sweep",
    "mark_pareto_front",
    "markdown_report",
    "pareto_axes",
    "pareto_points",
    "pareto_title",
    "write_report",
]

log = logging.getLogger(__name__)

MARKDOWN_FILE = "compare.md"
PLOT_FILE = "pareto.png"

# Where a summary keeps measured size and latency, first match wins: plain keys, or what
# lightning_sparse.export measured (at the top level or under "export"); int8 latency before fp32.
SIZE_KEYS = ("size_bytes", "compressed_bytes")
LATENCY_KEYS = ("latency_ms", "ort_int8_ms", "ort_fp32_ms")
# Which model a latency key measured, for the table (a plain `latency_ms` says nothing).
_LATENCY_KINDS = {"ort_int8_ms": "int8", "ort_fp32_ms": "fp32"}
# What a Pareto front is drawn over: (accuracy, up; cost, down). A sweep whose `objectives` name
# one summary key to maximise and one to minimise (a multi-objective search) is drawn over those.
DEFAULT_AXES = ("test_acc", "params_nonzero")
# Summary keys a front may be drawn over (what `objectives` may name), and their axis labels.
AXIS_LABELS = {
    "test_acc": "test accuracy",
    "val_acc": "validation accuracy",
    "sparsity": "sparsity",
    "params_nonzero": "nonzero parameters",
    "params_total": "parameters",
    "macs": "MACs per sample",
    "ort_fp32_ms": "ONNX Runtime fp32 latency (ms)",
    "ort_int8_ms": "ONNX Runtime int8 latency (ms)",
    "compressed_bytes": "compressed bytes",
}
# Keys whose values are shares in [0, 1], shown in percent.
_SHARES = {"test_acc", "val_acc", "sparsity"}
# Hydra writes it at the top of every sweep dir: what tells a sweep from a folder of runs.
MULTIRUN_FILE = "multirun.yaml"

# Folders a run writes inside itself; never runs of their own, so the search skips them.
_NOT_RUNS = {"wandb", "checkpoints", "csv", "plots", "ranks", "lightning_logs"}


class SweepFailedError(RuntimeError):
    """Some jobs of a sweep failed (the others completed); the message names them."""


@dataclass
class RunRecord:
    """One run of a sweep, as read back from its directory."""

    job: str
    run_dir: Path
    status: str
    overrides: list[str] = field(default_factory=list)
    recipe: str | None = None
    test_acc: float | None = None
    sparsity: float | None = None
    params_nonzero: int | None = None
    size_bytes: float | None = None
    latency_ms: float | None = None
    latency_kind: str | None = None
    error: str | None = None
    pareto: bool = False
    # Every AXIS_LABELS key the summary holds a number for.
    metrics: dict[str, float] = field(default_factory=dict)
    # The job's `objectives` and its sweeper's `direction` (empty when not a search).
    objectives: list[str] = field(default_factory=list)
    directions: list[str] = field(default_factory=list)

    def value(self, key: str) -> float | None:
        """The run's number for summary ``key`` (its own field first, e.g. ``test_acc``)."""
        own = getattr(self, key, None)
        if isinstance(own, (int, float)) and not isinstance(own, bool):
            return float(own)
        return self.metrics.get(key)

    @property
    def failed(self) -> bool:
        """Whether the run produced no result."""
        return self.status == STATUS_FAILED


def _natural_key(text: str) -> list[Any]:
    # Job 10 after job 9, not after job 1.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_run_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() or (path / ".hydra" / "overrides.yaml").is_file()


def _run_dirs(sweep_dir: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, _ in os.walk(sweep_dir):
        here = Path(root)
        if _is_run_dir(here):
            found.append(here)
            dirs[:] = []  # a run's own subfolders are not runs
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _NOT_RUNS]
    return sorted(found, key=lambda path: _natural_key(str(path.relative_to(sweep_dir))))


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _choice(run_dir: Path, group: str) -> str | None:
    """The option Hydra chose for ``group`` in this run (from ``.hydra/hydra.yaml``)."""
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    try:
        value = hydra_cfg["hydra"]["runtime"]["choices"][group]
    except (KeyError, TypeError):
        return None
    return None if value is None else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _read_run(sweep_dir: Path, run_dir: Path) -> RunRecord:
    job = str(run_dir.relative_to(sweep_dir)) if run_dir != sweep_dir else run_dir.name
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    record = RunRecord(
        job=job,
        run_dir=run_dir,
        status=STATUS_FAILED,
        overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
        recipe=_choice(run_dir, "recipe"),
    )
    record.objectives, record.directions = _objectives(run_dir)
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        record.error = "no summary.json: the job crashed, was killed, or is still running"
        return record
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"expected a JSON object, got {type(summary).__name__}")
    except (OSError, ValueError) as err:
        record.error = f"unreadable summary.json: {err}"
        return record
    record.status = str(summary.get("status", STATUS_OK))
    record.error = summary.get("error")
    record.recipe = (summary.get("recipe") or {}).get("name") or record.recipe
    record.test_acc = _number(summary.get("test_acc"))
    record.sparsity = _number(summary.get("sparsity"))
    nonzero = _number(summary.get("params_nonzero"))
    record.params_nonzero = None if nonzero is None else int(nonzero)
    export = summary.get("export")
    export = export if isinstance(export, dict) else {}
    record.size_bytes = _first_number(summary, export, SIZE_KEYS)[0]
    record.latency_ms, latency_key = _first_number(summary, export, LATENCY_KEYS)
    record.latency_kind = _LATENCY_KINDS.get(latency_key or "")
    for key in AXIS_LABELS:
        value = _first_number(summary, export, (key,))[0]
        if value is not None:
            record.metrics[key] = value
    return record


def _objectives(run_dir: Path) -> tuple[list[str], list[str]]:
    """The job's ``objectives`` and its sweeper's ``direction`` (from ``.hydra/``)."""
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    objectives = config.get("objectives") if isinstance(config, dict) else None
    try:
        direction = hydra_cfg["hydra"]["sweeper"]["direction"]
    except (KeyError, TypeError):
        direction = None
    if isinstance(objectives, str):
        objectives = [objectives]
    if isinstance(direction, str):
        direction = [direction]
    return (
        [str(o) for o in objectives] if isinstance(objectives, list) else [],
        [str(d).lower() for d in direction] if isinstance(direction, list) else [],
    )


def pareto_axes(records: Sequence[RunRecord]) -> tuple[str, str]:
    """(accuracy key, cost key) of the front: the search's two objectives, or the default.

    A search that maximises one summary key and minimises another (``objectives: [val_acc,
    macs]``, ``direction: [maximize, minimize]``) is judged on those; anything else on
    :data:`DEFAULT_AXES` (test accuracy against nonzero parameters).
    """
    for record in records:
        pairs = list(zip(record.objectives, record.directions, strict=False))
        if len(pairs) != 2 or len(record.objectives) != 2:
            continue
        up = [key for key, way in pairs if way.startswith("max")]
        down = [key for key, way in pairs if way.startswith("min")]
        if len(up) == len(down) == 1 and {*up, *down} <= set(AXIS_LABELS):
            return up[0], down[0]
    return DEFAULT_AXES


def _first_number(
    summary: dict[str, Any], export: dict[str, Any], keys: Sequence[str]
) -> tuple[float | None, str | None]:
    """The first of ``keys`` with a number, and which key it was."""
    for key in keys:
        for source in (summary, export):
            value = _number(source.get(key))
            if value is not None:
                return value, key
    return None, None


def _mode(run_dir: Path) -> str | None:
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    try:
        return str(hydra_cfg["hydra"]["mode"])
    except (KeyError, TypeError):
        return None


def is_sweep(folder: str | Path) -> bool:
    """Whether ``folder`` is one sweep's dir, or a single run.

    A sweep dir holds Hydra's ``multirun.yaml`` (the basic sweeper writes it when the sweep
    starts), or only jobs of a multirun as its direct children (as Optuna's sweeper leaves them).
    A date dir of separate runs is neither.
    """
    folder = Path(folder)
    if (folder / MULTIRUN_FILE).is_file() or _is_run_dir(folder):
        return True
    runs = _run_dirs(folder)
    return bool(runs) and all(run.parent == folder and _mode(run) == "MULTIRUN" for run in runs)


def collect_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run under ``sweep_dir`` (the dir itself, when it is a single run), in job order.

    The Pareto front is marked only within one sweep: runs that merely share a folder (a date dir
    of separate runs) need not share data, model or task, and a front across them would mislead.

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a directory.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory.")
    records = [_read_run(sweep_dir, run_dir) for run_dir in _run_dirs(sweep_dir)]
    if is_sweep(sweep_dir):
        mark_pareto_front(records)
    return records


def _scored(
    records: Sequence[RunRecord], axes: tuple[str, str]
) -> list[tuple[float, float, RunRecord]]:
    """(accuracy, cost, run) of the completed runs that have both numbers."""
    scored = []
    for record in records:
        accuracy, cost = record.value(axes[0]), record.value(axes[1])
        if record.status == STATUS_OK and accuracy is not None and cost is not None:
            scored.append((accuracy, cost, record))
    return scored


def mark_pareto_front(
    records: Sequence[RunRecord], axes: tuple[str, str] | None = None
) -> list[RunRecord]:
    """Set ``pareto`` on the completed runs no other run beats on both accuracy and cost.

    A run is dominated when another has accuracy at least as high and at most its cost, and is
    strictly better in one of the two. ``axes``: (accuracy key, cost key); None:
    :func:`pareto_axes` (the search's objectives, else test accuracy and nonzero parameters).
    Returns the front, cheapest first.
    """
    axes = axes or pareto_axes(records)
    scored = _scored(records, axes)
    for record in records:
        record.pareto = False
    front: list[RunRecord] = []
    for accuracy, size, record in scored:
        dominated = any(
            other_acc >= accuracy
            and other_size <= size
            and (other_acc > accuracy or other_size < size)
            for other_acc, other_size, _ in scored
        )
        if not dominated:
            record.pareto = True
            front.append(record)
    return sorted(front, key=lambda r: r.value(axes[1]) or 0.0)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _size(value: float | None) -> str:
    if value is None:
        return "—"
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _first_line(error: str | None) -> str:
    """The error's first non-empty line (a child process's error starts with a blank one)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _common_overrides(records: Sequence[RunRecord]) -> list[str]:
    if not records:
        return []
    common = set(records[0].overrides)
    for record in records[1:]:
        common &= set(record.overrides)
    return [o for o in records[0].overrides if o in common]


def markdown_report(
    records: Sequence[RunRecord], title: str = "Sweep", note: str | None = None
) -> str:
    """The comparison as markdown: a summary line, one table row per run, then the failures."""
    failed = [r for r in records if r.failed]
    runs = f"{len(records)} run{'' if len(records) == 1 else 's'}"
    lines = [
        f"# {title}",
        "",
        f"{runs}: {len(records) - len(failed)} completed, {len(failed)} failed.",
    ]
    if note:
        lines += ["", note]
    common = _common_overrides(records) if len(records) > 1 else []
    if common:
        lines += ["", "Common overrides: " + " ".join(f"`{o}`" for o in common)]
    columns = ["job", "status", "recipe", "overrides", "test acc", "sparsity", "nonzero params"]
    # The search's own objectives, where the fixed columns do not show them (val acc, MACs).
    shown = {"test_acc", "sparsity", "params_nonzero"}
    extra = [key for key in pareto_axes(records) if key not in shown]
    extra += [
        key for r in records for key in r.objectives if key in AXIS_LABELS and key not in shown
    ]
    extra = list(dict.fromkeys(extra))
    extra = [key for key in extra if any(r.value(key) is not None for r in records)]
    columns += [_column(key) for key in extra]
    with_size = any(r.size_bytes is not None for r in records)
    with_latency = any(r.latency_ms is not None for r in records)
    kinds = {r.latency_kind for r in records if r.latency_ms is not None}
    one_kind = next(iter(kinds)) if len(kinds) == 1 else None
    latency_header = f"latency {one_kind} (ms)" if one_kind else "latency (ms)"
    columns += ["size"] * with_size + [latency_header] * with_latency + ["Pareto"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        varying = [o for o in r.overrides if o not in common]
        cells = [
            r.job,
            r.status,
            r.recipe or "—",
            " ".join(varying) or "—",
            _percent(r.test_acc),
            _percent(r.sparsity),
            "—" if r.params_nonzero is None else f"{r.params_nonzero:,}",
            *(_format(key, r.value(key)) for key in extra),
        ]
        if with_size:
            cells.append(_size(r.size_bytes))
        if with_latency:
            latency = "—" if r.latency_ms is None else f"{r.latency_ms:.3f}"
            if r.latency_ms is not None and one_kind is None and r.latency_kind:
                latency += f" ({r.latency_kind})"  # mixed: say which model each one timed
            cells.append(latency)
        cells.append("✓" if r.pareto else "")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if failed:
        lines += ["", "## Failed jobs", ""]
        for r in failed:
            lines.append(f"- `{r.job}` ({r.run_dir}): {_cell(_first_line(r.error)[:300])}")
    return "\n".join(lines) + "\n"


def _column(key: str) -> str:
    label = AXIS_LABELS.get(key, key)
    return label.replace("validation accuracy", "val acc")


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if key in _SHARES:
        return _percent(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def write_report(
    sweep_dir: str | Path, output_dir: str | Path | None = None, plot: bool = True
) -> tuple[str, list[RunRecord], Path | None]:
    """Collect the runs, write ``compare.md`` and ``pareto.png``; return text, runs and plot path.

    Args:
        sweep_dir: the sweep dir (or any folder holding runs).
        output_dir: where the two files go; defaults to ``sweep_dir``.
        plot: draw the Pareto plot (needs matplotlib; skipped without it).

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a directory.
    """
    sweep_dir = Path(sweep_dir)
    records = collect_runs(sweep_dir)
    sweep = is_sweep(sweep_dir)
    note = None
    if not sweep and len(records) > 1:
        note = (
            f"Not one sweep: {sweep_dir} has no {MULTIRUN_FILE}, so these are separate runs "
            "(they need not share data, model or task). No Pareto front or plot is drawn; give "
            "a sweep dir (runs/<task>/multirun/<date>/<time>) to compare a sweep."
        )
    title = f"Sweep {sweep_dir}" if sweep else f"Runs under {sweep_dir}"
    text = markdown_report(records, title=title, note=note)
    output = Path(output_dir) if output_dir is not None else sweep_dir
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKDOWN_FILE).write_text(text)
    plot_path: Path | None = None
    if plot and sweep and plots.plots_available():
        accuracy, cost = pareto_axes(records)
        plot_path = plots.plot_pareto(
            pareto_points(records),
            output / PLOT_FILE,
            title=pareto_title(records, sweep_dir),
            xlabel=AXIS_LABELS[cost],
            ylabel=f"{AXIS_LABELS[accuracy]} (%)" if accuracy in _SHARES else AXIS_LABELS[accuracy],
            percent=accuracy in _SHARES,
        )
    elif plot and sweep:
        log.info("matplotlib is not installed (extra `plots`): no Pareto plot.")
    return text, records, plot_path


def _point_label(record: RunRecord, common: Sequence[str]) -> str:
    """What tells the run apart: its swept values (``final_sparsity=0.9``), else its job."""
    varying = [o for o in record.overrides if o not in common]
    if not varying:
        return record.job
    return ", ".join(
        f"{key.rsplit('.', 1)[-1]}={value}"
        for key, _, value in (o.lstrip("+~").partition("=") for o in varying)
    )


def pareto_points(
    records: Sequence[RunRecord], axes: tuple[str, str] | None = None
) -> list[tuple[str, float, float, bool]]:
    """``(label, cost, accuracy, on the front)`` of each completed run, for the plot.

    The label is what was swept (``width=16, final_sparsity=0.5``); ``axes`` as in
    :func:`mark_pareto_front`.
    """
    common = _common_overrides(records) if len(records) > 1 else []
    return [
        (_point_label(r, common), cost, accuracy, r.pareto)
        for accuracy, cost, r in _scored(records, axes or pareto_axes(records))
    ]


def pareto_title(records: Sequence[RunRecord], sweep_dir: Path) -> str:
    """The plot's title: what was swept, over which recipe, and which sweep (date/time)."""
    common = _common_overrides(records) if len(records) > 1 else []
    swept = sorted(
        {o.lstrip("+~").partition("=")[0] for r in records for o in r.overrides if o not in common}
    )
    recipes = sorted({r.recipe for r in records if r.recipe})
    what = f"{', '.join(recipes)}: " if recipes else ""
    over = f" over {', '.join(swept)}" if swept else ""
    accuracy, cost = pareto_axes(records)
    title = f"{what}{AXIS_LABELS[accuracy]} vs {AXIS_LABELS[cost]}{over}"
    failed = sum(r.failed for r in records)
    if failed:
        title += f" ({failed} failed, not shown)"
    when = "/".join(sweep_dir.parts[-2:])
    return f"{title}\nsweep {when}"


class SweepReport(HydraCallback):
    """Hydra callback: compare the sweep's runs when a multirun ends; fail if a job failed.

    When it acts: ``on_multirun_end``, after every job of the sweep has run (it is not called when
    the sweep itself could not start, e.g. an override naming no config key).

    Args:
        fail_on_failed_jobs: exit with status 1 (after printing a :class:`SweepFailedError`) when
            any job failed.
        plot: write ``pareto.png`` as well as ``compare.md``.
    """

    def __init__(self, fail_on_failed_jobs: bool = True, plot: bool = True) -> None:
        self.fail_on_failed_jobs = fail_on_failed_jobs
        self.plot = plot

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        text, records, _ = write_report(sweep_dir, plot=self.plot)
        if not records:
            return
        print(text, flush=True)
        failed = [r for r in records if r.failed]
        if failed and self.fail_on_failed_jobs:
            error = SweepFailedError(
                f"{len(failed)} of {len(records)} sweep jobs failed: "
                + "; ".join(f"job {r.job}: {_first_line(r.error).rstrip('.')}" for r in failed)
                + f". The other jobs completed; see {sweep_dir / MARKDOWN_FILE}."
            )
            print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            # Hydra turns a callback's exceptions into warnings (exit code 0); SystemExit is not
            # an Exception, so it passes through and the sweep's command fails as it should.
            raise SystemExit(1) from error
