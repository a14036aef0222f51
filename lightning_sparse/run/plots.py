"""Plots of a run and of a sweep, as PNG files.

Plots use matplotlib's object API on the Agg canvas (no display, no global pyplot state), imported
only when a plot is drawn; without matplotlib installed (it comes with the ``plots`` extra) they
are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "plot_pareto",
    "plot_sparsity_per_layer",
    "plot_sparsity_schedule",
    "plots_available",
]


def plots_available() -> bool:
    """Whether matplotlib is installed (the ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    # The object API draws on the Agg canvas without touching pyplot's global state or a display,
    # so plotting is safe in worker processes and threads of a sweep.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_sparsity_per_layer(per_layer: Mapping[str, float], path: str | Path) -> Path:
    """Horizontal bars: the fraction of zeros in each pruned weight; saved as PNG at ``path``."""
    names = list(per_layer)
    figure = _figure(7.0, 1.0 + 0.35 * max(len(names), 1))
    axes = figure.add_subplot()
    axes.barh(names, [100 * per_layer[name] for name in names], color="tab:blue")
    axes.invert_yaxis()  # first layer on top, as in the model
    axes.set_xlim(0, 100)
    axes.set_xlabel("zeros (%)")
    axes.set_title("Sparsity per layer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_sparsity_schedule(
    history: Sequence[tuple[float, float]],
    schedules: Mapping[str, Any],
    max_epochs: float,
    path: str | Path,
) -> Path:
    """Target sparsity of each schedule over epochs (steps) and the measured sparsity (dots).

    Args:
        history: ``(epoch, measured sparsity)`` pairs, e.g. :attr:`SparsityHistory.history`.
        schedules: ``{label: schedule}``: a function of the epochs, or an object with
            ``sparsity_at(epoch)`` (a ``SparsitySchedule``).
        max_epochs: right end of the epoch axis.
        path: where the PNG goes.
    """
    figure = _figure(7.0, 4.0)
    axes = figure.add_subplot()
    end = max(float(max_epochs), max((epoch for epoch, _ in history), default=0.0), 1.0)
    samples = 400
    epochs = [end * i / samples for i in range(samples + 1)]
    for label, schedule in schedules.items():
        values = schedule(epochs) if callable(schedule) else map(schedule.sparsity_at, epochs)
        targets = [100 * value for value in values]
        axes.step(epochs, targets, where="post", label=f"{label} target")
    if history:
        axes.plot(
            [epoch for epoch, _ in history],
            [100 * value for _, value in history],
            "o",
            color="black",
            label="measured",
        )
    axes.set_xlim(0, end)
    axes.set_ylim(0, 100)
    axes.set_xlabel("epoch")
    axes.set_ylabel("zeros in pruned weights (%)")
    axes.set_title("Sparsity schedule")
    axes.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_pareto(
    points: Sequence[tuple[str, float, float, bool]],
    path: str | Path,
    title: str = "",
    xlabel: str = "nonzero parameters",
    ylabel: str = "test accuracy (%)",
    percent: bool = True,
) -> Path:
    """Accuracy against a cost, the Pareto front joined by a line; a PNG at ``path``.

    Args:
        points: ``(label, cost, accuracy, on the Pareto front)`` per run; the label (what was
            swept) is written beside its point.
        path: where the PNG goes.
        title: the plot's title (e.g. the sweep dir).
        xlabel: the cost's axis label.
        ylabel: the accuracy's axis label.
        percent: accuracies are shares in [0, 1], drawn in percent.
    """
    scale = 100.0 if percent else 1.0
    figure = _figure(7.0, 5.0)
    axes = figure.add_subplot()
    others = [p for p in points if not p[3]]
    front = sorted((p for p in points if p[3]), key=lambda p: p[1])
    if others:
        axes.scatter(
            [p[1] for p in others], [scale * p[2] for p in others], color="tab:gray", label="run"
        )
    if front:
        axes.plot(
            [p[1] for p in front],
            [scale * p[2] for p in front],
            "o-",
            color="tab:red",
            label="Pareto front",
        )
    for label, size, accuracy, _ in points:
        axes.annotate(label, (size, scale * accuracy), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title or "Accuracy vs size")
    if points:
        axes.legend(loc="lower right")
    axes.grid(True, alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
