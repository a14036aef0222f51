"""Measure ``MagnitudePruning`` against Lightning's ``ModelPruning``; write docs/benchmarks.md.

Sections (``--section``):

- ``accuracy``: test accuracy on scikit-learn digits with the default ``SmallCNN`` and Adam, dense
  against ``MagnitudePruning`` and ``ModelPruning`` following the same absolute cubic schedule
  (``ModelPruning``'s "fraction of what remains" amounts are converted from it), over seeds, with
  the sparsity each run actually reached, measured on the weights.
- ``step_cost``: time per training step with masks in force, as a ratio to dense training in the
  same process; dense, ``MagnitudePruning`` and ``ModelPruning`` runs are interleaved round by
  round so that load from other processes hits every variant alike, and medians are reported.

Every number in the output comes from the run that writes it. Each section records the command,
the machine, the versions and the date; running one section leaves the others in the file as they
were. Run from the repository root::

    python scripts/benchmark.py                          # every section, < 10 min on 2 CPU cores
    python scripts/benchmark.py --section step_cost      # one section
    python scripts/benchmark.py --quick --output /tmp/benchmarks.md   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, cast

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from typing_extensions import override

from lightning_sparse import MagnitudePruning
from lightning_sparse.core.schedule import SparsitySchedule
from lightning_sparse.core.targets import prunable_parameters
from lightning_sparse.data import DigitsDataModule, SyntheticDataModule
from lightning_sparse.models import MLP, SmallCNN
from lightning_sparse.module import ClassificationModule

SECTIONS = ("accuracy", "step_cost")
SCOPES = ("global", "layer")
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

# Targets stated in issue 2; the tables say whether each run met them.
TARGET_ACCURACY_AT_098 = 98.0
TARGET_STEP_RATIO = 1.03

OURS = "MagnitudePruning (ours)"
LIGHTNING = "ModelPruning (Lightning)"
DENSE = "dense"

HEADER = """# Benchmarks

Written by `scripts/benchmark.py`: every number below comes from a run of it, with the command
that produced it. Do not edit the tables by hand; rerun the script (one `--section` at a time if
you like: the other sections are kept as they are).
"""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracySettings:
    """What the accuracy section trains: one value per knob, the same for both pruning methods."""

    seeds: tuple[int, ...]
    epochs: int
    sparsities: tuple[float, ...]
    scopes: tuple[str, ...]
    start_epoch: float
    end_epoch: float
    update_frequency: float
    lr: float
    batch_size: int
    lottery_ticket: bool
    limit_train_batches: int | None
    split_seed: int
    baseline_split_seeds: tuple[int, ...]


@dataclass(frozen=True)
class StepCostCase:
    """One model whose training step is timed under each variant."""

    key: str
    name: str
    build_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int
    steps_per_epoch: int


@dataclass(frozen=True)
class StepCostSettings:
    """How long and how often each variant is timed."""

    cases: tuple[StepCostCase, ...]
    rounds: int
    timed_epochs: int
    sparsity: float
    malloc_tuned: bool


@dataclass(frozen=True)
class Environment:
    """The machine and software a section ran on."""

    cpu: str
    cores: int
    threads: int
    torch: str
    lightning: str
    python: str


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


def describe_environment() -> Environment:
    """CPU model, core count, torch threads and versions of the running process."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform's answer stands
    return Environment(
        cpu=cpu,
        cores=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        lightning=lightning.__version__,
        python=platform.python_version(),
    )


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A single-process CPU trainer that prints, logs and saves nothing and skips validation."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        # Lightning's validation loop plays no part (accuracies are counted after training);
        # skipping it keeps the runs short.
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def weight_sparsity(module: nn.Module) -> float:
    """Zeros over all Conv/Linear weights together, measured on the weights themselves."""
    weights = prunable_parameters(module).values()
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w.detach() == 0).sum().item()) for w in weights)
    return zeros / total if total else 0.0


def conv_linear_weights(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``ModelPruning``'s ``parameters_to_prune`` for the weights ``__ALL_PRUNABLE__`` selects."""
    found = []
    for name in prunable_parameters(module):
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        found.append((owner, "weight"))
    return found


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table, first column left-aligned and the others right-aligned."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def section_preamble(
    title: str, command: str, env: Environment, started: float, load: tuple[float, float]
) -> str:
    """The heading and the provenance lines every section starts with."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    minutes = (time.perf_counter() - started) / 60
    return "\n".join(
        [
            f"## {title}",
            "",
            f"- Command: `{command}`",
            f"- Machine: {env.cpu}, {env.cores} cores; torch {env.torch} (run on CPU), "
            f"lightning {env.lightning}, Python {env.python}; "
            f"`torch.set_num_threads({env.threads})`",
            f"- Date: {date}; section wall time {minutes:.1f} min; "
            f"1-min load average {load[0]:.2f} at start, {load[1]:.2f} at end "
            "(the machine is shared)",
        ]
    )


def load_average() -> float:
    """1-minute load average, or NaN where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def progress(message: str) -> None:
    """One line of progress on stderr, so that a long run shows where it is."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


class RemainingAmount:
    """``ModelPruning``'s ``amount(epoch)`` that reproduces an absolute sparsity schedule.

    ``ModelPruning`` prunes in ``on_train_epoch_end`` of epoch ``c`` a fraction of the weights that
    are still unpruned. ``MagnitudePruning``'s update due at epoch ``c + 1`` lands at the same
    moment (after the last optimizer step of epoch ``c``), so with ``s`` the absolute schedule the
    amount is ``1 - (1 - s(c + 1)) / (1 - s(c))``.

    Args:
        schedule: the absolute schedule; every update must fall on an integer epoch, the only
            moments at which ``ModelPruning`` can act.

    Raises:
        ValueError: an update falls between epoch ends.
    """

    def __init__(self, schedule: SparsitySchedule) -> None:
        for index in range(schedule.num_updates):
            epoch = schedule.update_epoch(index)
            if abs(epoch - round(epoch)) > 1e-9:
                raise ValueError(
                    f"The schedule updates at epoch {epoch:g}; ModelPruning prunes only at epoch "
                    "ends, so start_epoch, end_epoch and update_frequency must give integer epochs."
                )
        self.schedule = schedule

    def __call__(self, epoch: int) -> float:
        """Fraction of the remaining weights to prune at the end of (0-based) ``epoch``."""
        before = self.schedule.sparsity_at(epoch)
        after = self.schedule.sparsity_at(epoch + 1)
        if after <= before:
            # 0 makes ModelPruning skip the epoch instead of registering an empty pruning step.
            return 0.0
        return 1.0 - (1.0 - after) / (1.0 - before)


@dataclass(frozen=True)
class Evaluation:
    """A trained model: correct predictions per split and the zeros in its Conv/Linear weights."""

    val_correct: int
    val_total: int
    test_correct: int
    test_total: int
    sparsity: float
    kept: torch.Tensor = field(repr=False)

    @property
    def val_acc(self) -> float:
        """Validation accuracy in percent."""
        return 100.0 * self.val_correct / self.val_total

    @property
    def test_acc(self) -> float:
        """Test accuracy in percent."""
        return 100.0 * self.test_correct / self.test_total


@dataclass(frozen=True)
class AccuracyRun:
    """One training run: what was trained and how it came out."""

    method: str
    scope: str
    target: float
    seed: int
    split_seed: int
    result: Evaluation
    seconds: float


def accuracy_schedule(settings: AccuracySettings, sparsity: float) -> SparsitySchedule:
    """The cubic schedule both methods follow to ``sparsity``."""
    return SparsitySchedule(
        init_sparsity=0.0,
        final_sparsity=sparsity,
        start_epoch=settings.start_epoch,
        end_epoch=settings.end_epoch,
        update_frequency=settings.update_frequency,
        inter_func="cubic",
    )


def pruning_callback(
    module: nn.Module, method: str, schedule: SparsitySchedule, scope: str, lottery_ticket: bool
) -> Callback:
    """``MagnitudePruning`` or ``ModelPruning`` for every Conv/Linear weight of ``module``."""
    global_ = scope == "global"
    if method == OURS:
        return MagnitudePruning(
            final_sparsity=schedule.final_sparsity,
            init_sparsity=schedule.init_sparsity,
            start_epoch=schedule.start_epoch,
            end_epoch=schedule.end_epoch,
            update_frequency=schedule.update_frequency,
            inter_func=schedule.inter_func,
            global_sparsity=global_,
        )
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=conv_linear_weights(module),
        use_global_unstructured=global_,
        amount=RemainingAmount(schedule),
        make_pruning_permanent=True,
        # Its default (True) rewinds the kept weights to their initial values after every
        # pruning step; gradual magnitude pruning keeps training the weights it has.
        use_lottery_ticket_hypothesis=lottery_ticket,
        verbose=0,
    )


@torch.no_grad()
def count_correct(module: nn.Module, loader: Iterable[Any]) -> tuple[int, int]:
    """(correct predictions, samples) of ``module`` over ``loader``; integers compare exactly."""
    module.eval()
    correct = total = 0
    for inputs, labels in loader:
        correct += int((module(inputs).argmax(dim=1) == labels).sum().item())
        total += len(labels)
    return correct, total


def train_digits(
    settings: AccuracySettings,
    seed: int,
    split_seed: int,
    make_callback: Callable[[nn.Module], Callback] | None,
) -> Evaluation:
    """Train the default CNN on digits with ``make_callback``'s pruning (or none), evaluate it."""
    pl.seed_everything(seed, verbose=False)
    module = ClassificationModule(SmallCNN(), num_classes=10, lr=settings.lr)
    datamodule = DigitsDataModule(batch_size=settings.batch_size, seed=seed, split_seed=split_seed)
    callbacks = [make_callback(module)] if make_callback is not None else []
    extra = {}
    if settings.limit_train_batches is not None:
        extra["limit_train_batches"] = settings.limit_train_batches
    trainer = quiet_trainer(
        max_epochs=settings.epochs, callbacks=callbacks, deterministic=True, **extra
    )
    trainer.fit(module, datamodule=datamodule)
    val_correct, val_total = count_correct(module, datamodule.val_dataloader())
    test_correct, test_total = count_correct(module, datamodule.test_dataloader())
    weights = prunable_parameters(module).values()
    kept = torch.cat([w.detach().reshape(-1) != 0 for w in weights])
    return Evaluation(
        val_correct=val_correct,
        val_total=val_total,
        test_correct=test_correct,
        test_total=test_total,
        sparsity=1.0 - kept.float().mean().item(),
        kept=kept,
    )


def accuracy_plan(settings: AccuracySettings) -> list[tuple[str, str, float]]:
    """(method, scope, target sparsity) of every configuration, dense first."""
    plan = [(DENSE, "-", 0.0)]
    for sparsity in settings.sparsities:
        for scope in settings.scopes:
            plan += [(OURS, scope, sparsity), (LIGHTNING, scope, sparsity)]
    return plan


def run_accuracy(settings: AccuracySettings) -> list[AccuracyRun]:
    """Every configuration for every seed on the main split, then dense on the other splits.

    A seed fixes the initial weights and the batch order, so every configuration of one seed
    starts from the same weights and sees the same batches.
    """
    jobs = [
        (seed, settings.split_seed, *configuration)
        for seed in settings.seeds
        for configuration in accuracy_plan(settings)
    ]
    jobs += [
        (seed, split_seed, DENSE, "-", 0.0)
        for split_seed in settings.baseline_split_seeds
        if split_seed != settings.split_seed
        for seed in settings.seeds
    ]
    runs = []
    for seed, split_seed, method, scope, sparsity in jobs:
        make_callback = None
        if method != DENSE:
            make_callback = partial(
                pruning_callback,
                method=method,
                schedule=accuracy_schedule(settings, sparsity),
                scope=scope,
                lottery_ticket=settings.lottery_ticket,
            )
        started = time.perf_counter()
        result = train_digits(settings, seed, split_seed, make_callback)
        seconds = time.perf_counter() - started
        runs.append(AccuracyRun(method, scope, sparsity, seed, split_seed, result, seconds))
        progress(
            f"[accuracy {len(runs)}/{len(jobs)}] split {split_seed} seed {seed} {method} "
            f"{scope} {sparsity:.2f}: test {result.test_acc:.2f}% val {result.val_acc:.2f}% "
            f"sparsity {result.sparsity:.4f} ({seconds:.1f} s)"
        )
    return runs


def _select(
    runs: Sequence[AccuracyRun], method: str, scope: str, target: float, split_seed: int
) -> list[AccuracyRun]:
    """The runs of one configuration, ordered by seed so that methods pair up seed by seed."""
    chosen = [
        r
        for r in runs
        if (r.method, r.scope, r.target, r.split_seed) == (method, scope, target, split_seed)
    ]
    return sorted(chosen, key=lambda r: r.seed)


def _mean_std_text(values: Sequence[float]) -> str:
    """``mean ± std`` with two decimals."""
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def accuracy_tables(settings: AccuracySettings, runs: Sequence[AccuracyRun]) -> str:
    """Settings, results per configuration, ours against Lightning, and dense across splits."""
    split = settings.split_seed
    seeds = ", ".join(str(s) for s in settings.seeds)
    rows = []
    for method, scope, target in accuracy_plan(settings):
        chosen = _select(runs, method, scope, target, split)
        reached = [r.result.sparsity for r in chosen]
        rows.append(
            [
                method,
                scope,
                f"{target:.2f}",
                f"{statistics.fmean(reached):.4f} ({min(reached):.4f}-{max(reached):.4f})",
                _mean_std_text([r.result.test_acc for r in chosen]),
                " / ".join(f"{r.result.test_acc:.2f}" for r in chosen),
                _mean_std_text([r.result.val_acc for r in chosen]),
            ]
        )
    results = markdown_table(
        [
            "Method",
            "Scope",
            "Target sparsity",
            "Sparsity reached: mean (min-max)",
            "Test acc. % (mean ± std)",
            f"Test acc. per seed ({seeds})",
            "Val acc. % (mean ± std)",
        ],
        rows,
    )

    comparison_rows = []
    for sparsity in settings.sparsities:
        for scope in settings.scopes:
            ours = _select(runs, OURS, scope, sparsity, split)
            theirs = _select(runs, LIGHTNING, scope, sparsity, split)
            diffs = [
                a.result.test_correct - b.result.test_correct
                for a, b in zip(ours, theirs, strict=True)
            ]
            shared = [
                (a.result.kept & b.result.kept).sum().item() / max(a.result.kept.sum().item(), 1)
                for a, b in zip(ours, theirs, strict=True)
            ]
            ours_acc = statistics.fmean(r.result.test_acc for r in ours)
            theirs_acc = statistics.fmean(r.result.test_acc for r in theirs)
            target_met = "-"
            if math.isclose(sparsity, 0.98):
                target_met = "yes" if ours_acc >= TARGET_ACCURACY_AT_098 else "**no**"
            per_image = 100.0 / ours[0].result.test_total
            comparison_rows.append(
                [
                    scope,
                    f"{sparsity:.2f}",
                    f"{ours_acc:.2f}",
                    f"{theirs_acc:.2f}",
                    f"{per_image * statistics.fmean(diffs):+.2f}",
                    f"{sum(d > 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / "
                    f"{sum(d < 0 for d in diffs)}",
                    f"{100 * statistics.fmean(shared):.1f}%",
                    # Integer counts of correct images: equal means equal, no float tolerance.
                    "yes" if sum(diffs) >= 0 else "**no**",
                    target_met,
                ]
            )
    comparison = markdown_table(
        [
            "Scope",
            "Target sparsity",
            "Ours %",
            "ModelPruning %",
            "Ours - ModelPruning (pp, mean over seeds)",
            "Seeds better / equal / worse",
            "Kept weights shared (same seed)",
            "Ours >= ModelPruning",
            f"Ours >= {TARGET_ACCURACY_AT_098:.1f}% (at 0.98)",
        ],
        comparison_rows,
    )

    splits = [split, *(s for s in settings.baseline_split_seeds if s != split)]
    split_rows = []
    for split_seed in splits:
        chosen = _select(runs, DENSE, "-", 0.0, split_seed)
        split_rows.append(
            [
                str(split_seed) + (" (main)" if split_seed == split else ""),
                _mean_std_text([r.result.test_acc for r in chosen]),
                " / ".join(f"{r.result.test_acc:.2f}" for r in chosen),
                _mean_std_text([r.result.val_acc for r in chosen]),
            ]
        )
    by_split = markdown_table(
        [
            "Dense, `split_seed`",
            "Test acc. % (mean ± std)",
            f"Test acc. per seed ({seeds})",
            "Val acc. % (mean ± std)",
        ],
        split_rows,
    )

    example = accuracy_schedule(settings, settings.sparsities[-1])
    amounts = RemainingAmount(example)
    amount_text = ", ".join(
        f"{amounts(epoch):.3f}" for epoch in range(settings.epochs) if amounts(epoch) > 0
    )
    main_runs = [r for r in runs if r.split_seed == split]
    sizes = main_runs[0].result
    train_size = _train_size(split)
    epochs_text = f"{settings.epochs} epochs"
    if settings.limit_train_batches is not None:
        epochs_text += f" of at most {settings.limit_train_batches} batches"
    setup = "\n".join(
        [
            f"- Task: scikit-learn digits, `DigitsDataModule(split_seed={split})` (stratified, "
            f"{train_size}/{sizes.val_total}/{sizes.test_total} train/val/test images; one test "
            f"image is {100 / sizes.test_total:.2f} pp), default `SmallCNN` in "
            f"`ClassificationModule`, Adam lr {settings.lr:g} (constant), batch "
            f"{settings.batch_size}, {epochs_text}, seeds {seeds}. A seed fixes the initial "
            "weights and the batch order: the methods are compared on identical starts. The "
            "learning rate and the schedule's epochs are the script's defaults, picked on "
            "validation accuracy (our method, 0.98, global scope; never on test accuracy) and "
            "then used unchanged for every method, target and scope.",
            f"- Schedule, the same for both: cubic from 0 at epoch {settings.start_epoch:g} to "
            f"the target at epoch {settings.end_epoch:g}, an update every "
            f"{settings.update_frequency:g} epoch(s), then {settings.epochs - settings.end_epoch:g}"
            " epochs of fine-tuning with the masks held. Targets are absolute; `ModelPruning` "
            "gets `amount(e) = 1 - (1 - s(e+1)) / (1 - s(e))` at the end of epoch e, the moment "
            f"`MagnitudePruning` applies its update due at epoch e+1 (for "
            f"{settings.sparsities[-1]:.2f}: {amount_text}).",
            "- Both prune every Conv/Linear weight (biases untouched) by L1 magnitude, "
            "unstructured. Scope `global`: one threshold over all of them "
            "(`global_sparsity=True` / `use_global_unstructured=True`); `layer`: the target in "
            "every layer (both `False`). `ModelPruning`: `l1_unstructured`, "
            "`make_pruning_permanent=True`, "
            f"`use_lottery_ticket_hypothesis={settings.lottery_ticket}`.",
            "- Sparsity reached: zeros over all Conv/Linear weights of the trained model (after "
            "`ModelPruning` made its pruning permanent). Accuracies are counted image by image "
            "on the trained model; 'kept weights shared' is the fraction of our non-zero weights "
            "that are also non-zero in `ModelPruning`'s model of the same seed.",
            f"- Mean wall time per run: {statistics.fmean(r.seconds for r in runs):.1f} s.",
        ]
    )
    return (
        f"{setup}\n\n{results}\n\n{comparison}\n\n"
        "Dense baseline on other data splits (same seeds and training; the split is fixed by "
        "`split_seed`, so these test sets hold other images):\n\n"
        f"{by_split}"
    )


def _train_size(split_seed: int) -> int:
    """Training images in the digits split ``split_seed``."""
    datamodule = DigitsDataModule(split_seed=split_seed)
    datamodule.setup()
    # The digits splits are in-memory TensorDatasets, which have a length.
    return len(cast(Sized, datamodule.train_set))


# --------------------------------------------------------------------------------------------
# Step cost
# --------------------------------------------------------------------------------------------


class StepTimer(Callback):
    """Wall and CPU time of every training step, ``on_train_batch_start`` to ``on_train_batch_end``.

    Put it last in the trainer's callbacks: hooks run in list order, so its
    ``on_train_batch_end`` runs after every other callback's (our weight re-zeroing included),
    while the step between its two hooks holds the forward, the backward, the gradient zeroing in
    ``on_before_optimizer_step`` and the optimizer step. CPU time (``time.process_time``) counts
    only what this process computed, so it is barely moved by other processes on a shared
    machine, while wall time is what a user waits for; both are kept. Whole epochs are timed too
    (``on_train_epoch_start`` to ``on_train_epoch_end``), to catch per-epoch work outside steps.

    Args:
        first_timed_epoch: epochs before this one (warm-up, the pruning itself) are not recorded.
    """

    def __init__(self, first_timed_epoch: int) -> None:
        self.first_timed_epoch = first_timed_epoch
        self.step_wall: list[float] = []
        self.step_cpu: list[float] = []
        self.epoch_wall: list[float] = []
        self._step_start: tuple[float, float] | None = None
        self._epoch_start: float | None = None

    def _timing(self, trainer: pl.Trainer) -> bool:
        """Whether the current epoch is recorded."""
        return trainer.current_epoch >= self.first_timed_epoch

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter() if self._timing(trainer) else None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._timing(trainer):
            self._step_start = (time.perf_counter(), time.process_time())

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._step_start is not None:
            wall, cpu = time.perf_counter(), time.process_time()
            self.step_wall.append(wall - self._step_start[0])
            self.step_cpu.append(cpu - self._step_start[1])
            self._step_start = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is not None:
            self.epoch_wall.append(time.perf_counter() - self._epoch_start)
            self._epoch_start = None


class PruneOnceAmount:
    """``ModelPruning`` amount: ``sparsity`` at the end of epoch 0, nothing afterwards."""

    def __init__(self, sparsity: float) -> None:
        self.sparsity = sparsity

    def __call__(self, epoch: int) -> float:
        """The fraction to prune at the end of ``epoch``."""
        return self.sparsity if epoch == 0 else 0.0


def step_cost_callback(variant: str, module: nn.Module, sparsity: float) -> Callback | None:
    """The pruning callback of ``variant``, with masks in force from epoch 1 on.

    Both prune once, at the same moment: the end of epoch 0 (``ModelPruning`` can act only at an
    epoch end; ours' update due at epoch 1 lands right after the last step of epoch 0). Pruning
    both at one moment matters: with Adam, a weight pruned from the first step has an
    ``exp_avg_sq`` of exactly 0, and ``torch.sqrt`` of zeros is several times slower than of
    normal numbers on some CPUs, so pruning one method earlier would bill it for the optimizer.
    Epoch 0 is not timed. Both prune per layer; the scope does not change the per-step work.
    """
    if variant == DENSE:
        return None
    if variant == OURS:
        return MagnitudePruning(final_sparsity=sparsity, start_epoch=1.0, end_epoch=1.0)
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=conv_linear_weights(module),
        use_global_unstructured=False,
        amount=PruneOnceAmount(sparsity),
        make_pruning_permanent=True,
        use_lottery_ticket_hypothesis=False,
        verbose=0,
    )


@dataclass
class VariantTimes:
    """Times of one variant: one list per round (fit)."""

    step_wall: list[list[float]] = field(default_factory=list)
    step_cpu: list[list[float]] = field(default_factory=list)
    epoch_wall: list[list[float]] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)

    def pooled_median(self, kind: str) -> float:
        """Median over every timed step (or epoch) of every round; ``kind`` names the field."""
        rounds: list[list[float]] = getattr(self, kind)
        return statistics.median(t for times in rounds for t in times)

    def round_ratios(self, dense: VariantTimes, kind: str) -> list[float]:
        """Each round's median over the same round's dense median (fits adjacent in time)."""
        mine: list[list[float]] = getattr(self, kind)
        base: list[list[float]] = getattr(dense, kind)
        return [
            statistics.median(a) / statistics.median(b) for a, b in zip(mine, base, strict=True)
        ]


def time_variant(
    case: StepCostCase, variant: str, settings: StepCostSettings
) -> tuple[StepTimer, float]:
    """One fit of ``case`` under ``variant``; returns its timer and the weights' sparsity."""
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(case.build_model(), num_classes=10, lr=1e-3)
    datamodule = SyntheticDataModule(
        num_classes=10,
        input_shape=case.input_shape,
        train_size=case.batch_size * case.steps_per_epoch,
        val_size=case.batch_size,
        test_size=case.batch_size,
        batch_size=case.batch_size,
    )
    timer = StepTimer(first_timed_epoch=1)
    pruning = step_cost_callback(variant, module, settings.sparsity)
    # The timer goes last so that its batch-end runs after the pruning callback's.
    callbacks = [pruning, timer] if pruning is not None else [timer]
    trainer = quiet_trainer(max_epochs=1 + settings.timed_epochs, callbacks=callbacks)
    # Garbage left by the previous fit is collected now, and no collection runs inside a step.
    gc.collect()
    gc.disable()
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        gc.enable()
    return timer, weight_sparsity(module)


def run_step_cost(settings: StepCostSettings) -> dict[str, dict[str, VariantTimes]]:
    """Interleaved rounds per case: every round fits each variant once, in a rotating order."""
    variants = (DENSE, OURS, LIGHTNING)
    results: dict[str, dict[str, VariantTimes]] = {}
    for case in settings.cases:
        results[case.name] = {variant: VariantTimes() for variant in variants}
        for round_index in range(settings.rounds):
            # Rotating the order keeps any first-in-round or last-in-round effect off one variant.
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                timer, sparsity = time_variant(case, variant, settings)
                times = results[case.name][variant]
                times.step_wall.append(timer.step_wall)
                times.step_cpu.append(timer.step_cpu)
                times.epoch_wall.append(timer.epoch_wall)
                times.sparsity.append(sparsity)
                progress(
                    f"[step_cost] {case.name} round {round_index + 1}/{settings.rounds} "
                    f"{variant}: median {1e3 * statistics.median(timer.step_wall):.2f} ms wall, "
                    f"{1e3 * statistics.median(timer.step_cpu):.2f} ms CPU"
                )
    return results


def step_cost_tables(
    settings: StepCostSettings, results: dict[str, dict[str, VariantTimes]]
) -> str:
    """Settings and the step-cost table: median step time per variant and its ratio to dense."""
    rows = []
    verdicts = []
    for case in settings.cases:
        params = sum(p.numel() for p in case.build_model().parameters())
        per_variant = results[case.name]
        dense = per_variant[DENSE]
        for variant, times in per_variant.items():
            wall = times.round_ratios(dense, "step_wall")
            ratio = statistics.median(wall)
            cpu_ratio = statistics.median(times.round_ratios(dense, "step_cpu"))
            epoch_ratio = statistics.median(times.round_ratios(dense, "epoch_wall"))
            rows.append(
                [
                    case.name,
                    f"{params / 1e6:.2f}M",
                    str(case.batch_size),
                    variant,
                    f"{statistics.fmean(times.sparsity):.3f}",
                    str(sum(len(r) for r in times.step_wall)),
                    f"{1e3 * times.pooled_median('step_wall'):.2f}",
                    f"**{ratio:.3f}**",
                    f"{min(wall):.3f}-{max(wall):.3f}",
                    f"{cpu_ratio:.3f}",
                    f"{epoch_ratio:.3f}",
                ]
            )
            if variant != DENSE:
                met = "met" if ratio <= TARGET_STEP_RATIO else "**not met**"
                target = f" (target <= {TARGET_STEP_RATIO:.2f}: {met})" if variant == OURS else ""
                verdicts.append(f"- {case.name}, {variant}: {ratio:.3f} x dense{target}")
    table = markdown_table(
        [
            "Model",
            "Params",
            "Batch",
            "Variant",
            "Sparsity in force",
            "Timed steps",
            "Median step, wall (ms)",
            "Ratio to dense (median of rounds)",
            "Per-round ratio (min-max)",
            "Ratio, CPU time",
            "Ratio, whole epochs",
        ],
        rows,
    )
    malloc = (
        "glibc malloc set to keep and reuse freed memory (`mallopt`: mmap threshold 32 MiB, "
        "trim threshold 2 GiB) so that the page faults of re-mapping large freed blocks, which "
        "vary with heap state from fit to fit, do not drown the differences (`--system-malloc` "
        "turns this off)"
        if settings.malloc_tuned
        else "glibc malloc left at its defaults (`--system-malloc`): expect noisier ratios"
    )
    setup = "\n".join(
        [
            f"- {settings.rounds} interleaved rounds per model; a round fits dense, ours and "
            "`ModelPruning` once each (the order rotates from round to round); a fit is one "
            f"untimed epoch then {settings.timed_epochs} timed epoch(s). Synthetic data, "
            "`ClassificationModule` with Adam (lr 0.001), no validation, the same initial weights "
            f"for every fit. The garbage collector is paused during fits; {malloc}. "
            f"`torch.set_num_threads({torch.get_num_threads()})` (`--threads`): on a shared "
            "2-core machine a second intra-op thread mostly waits for other processes' work.",
            f"- Masks in force in every timed step: {settings.sparsity:g} sparsity in every "
            "Conv/Linear weight (per layer, unstructured by magnitude), applied once at the same "
            "moment for both, the end of epoch 0: ours with `start_epoch=end_epoch=1`, "
            f"`ModelPruning` with amount {settings.sparsity:g} at the end of epoch 0 "
            "(`l1_unstructured`, `use_lottery_ticket_hypothesis=False`).",
            "- Step time: from `on_train_batch_start` to `on_train_batch_end` of a timing "
            "callback placed after the pruning callback, so it holds the forward, the backward, "
            "our gradient zeroing (`on_before_optimizer_step`), the optimizer step and our weight "
            "re-zeroing (`on_train_batch_end`); for `ModelPruning`, the mask multiply in every "
            "forward and its backward.",
            "- Ratio to dense: the median over rounds of (the variant's median step time in the "
            "round / dense's median in the same round); the headline. CPU time: the same with "
            "`time.process_time()`, which other processes barely move. Whole epochs: the same "
            "with the wall time of whole timed epochs, which adds per-epoch work such as our "
            "sparsity logging.",
        ]
    )
    return f"{setup}\n\n{table}\n\n" + "\n".join(verdicts)


# --------------------------------------------------------------------------------------------
# Output file
# --------------------------------------------------------------------------------------------


def _markers(name: str) -> tuple[str, str]:
    """The HTML comments that open and close section ``name`` in the output file."""
    return f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"


def write_sections(path: Path, sections: dict[str, str]) -> None:
    """Replace ``sections`` (name -> markdown) in ``path``; keep everything else it holds.

    A section lives between HTML comment markers, so a later run of one section finds and replaces
    exactly its own block; a new section is appended. Text outside this script's blocks (the other
    benchmark scripts' sections, notes) is kept as it is.
    """
    text = path.read_text() if path.exists() else HEADER
    for name in SECTIONS:
        if name not in sections:
            continue
        begin, end = _markers(name)
        block = f"{begin}\n{sections[name].strip()}\n{end}"
        pattern = re.compile(re.escape(begin) + r"\n.*?\n" + re.escape(end), re.DOTALL)
        if match := pattern.search(text):
            text = text[: match.start()] + block + text[match.end() :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options; those left unset take the full or the ``--quick`` default."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file")
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke version (seconds; numbers meaningless)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    accuracy.add_argument("--epochs", type=int, help="default 30 (quick: 3)")
    accuracy.add_argument(
        "--sparsities", type=float, nargs="+", help="default 0.9 0.95 0.98 (also quick)"
    )
    accuracy.add_argument(
        "--scopes", choices=SCOPES, nargs="+", help="default global layer (quick: global)"
    )
    accuracy.add_argument("--start-epoch", type=float, help="default 0 (quick: 0)")
    accuracy.add_argument("--end-epoch", type=float, help="default 20 (quick: 2)")
    accuracy.add_argument("--update-frequency", type=float, default=1.0)
    accuracy.add_argument("--lr", type=float, default=1e-2)
    accuracy.add_argument("--batch-size", type=int, default=64)
    accuracy.add_argument(
        "--split-seed", type=int, default=0, help="DigitsDataModule split of every pruning run"
    )
    accuracy.add_argument(
        "--baseline-split-seeds",
        type=int,
        nargs="*",
        help="other splits on which only dense is run, for context; default 1 2 3 (quick: 1)",
    )
    accuracy.add_argument(
        "--lottery-ticket",
        action="store_true",
        help="ModelPruning's use_lottery_ticket_hypothesis (its default; off for plain GMP)",
    )
    step = parser.add_argument_group("step_cost")
    step.add_argument(
        "--models", choices=["cnn", "mlp"], nargs="+", default=["cnn", "mlp"], help="to time"
    )
    step.add_argument("--rounds", type=int, help="default 15 (quick: 1)")
    step.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc malloc's thresholds alone (noisier step times)",
    )
    step.add_argument("--timed-epochs", type=int, help="default 2 (quick: 1)")
    return parser.parse_args(list(argv))


def _pick(value: Any, full: Any, quick: Any, is_quick: bool) -> Any:
    """An option's value: as given, else its ``--quick`` or full default."""
    if value is not None:
        return value
    return quick if is_quick else full


def accuracy_settings(args: argparse.Namespace) -> AccuracySettings:
    """Resolve the accuracy options."""
    quick = bool(args.quick)
    return AccuracySettings(
        seeds=tuple(_pick(args.seeds, [0, 1, 2], [0], quick)),
        epochs=_pick(args.epochs, 30, 3, quick),
        sparsities=tuple(_pick(args.sparsities, [0.9, 0.95, 0.98], [0.9, 0.95, 0.98], quick)),
        scopes=tuple(_pick(args.scopes, ["global", "layer"], ["global"], quick)),
        start_epoch=_pick(args.start_epoch, 0.0, 0.0, quick),
        end_epoch=_pick(args.end_epoch, 20.0, 2.0, quick),
        update_frequency=args.update_frequency,
        lr=args.lr,
        batch_size=args.batch_size,
        lottery_ticket=bool(args.lottery_ticket),
        limit_train_batches=4 if quick else None,
        split_seed=args.split_seed,
        baseline_split_seeds=tuple(_pick(args.baseline_split_seeds, [1, 2, 3], [1], quick)),
    )


def step_cost_settings(args: argparse.Namespace, malloc_tuned: bool) -> StepCostSettings:
    """Resolve the step-cost options and the models to time."""
    quick = bool(args.quick)
    # ~4.9M parameters: 64*2304 + 2304*2048 + 2048*10 weights plus biases.
    hidden = (64, 64) if quick else (2304, 2048)
    cases = (
        StepCostCase(
            key="cnn",
            name="SmallCNN (digits-sized 1x8x8)",
            build_model=SmallCNN,
            input_shape=(1, 8, 8),
            batch_size=64,
            steps_per_epoch=4 if quick else 40,
        ),
        StepCostCase(
            key="mlp",
            name=f"MLP 64-{'-'.join(map(str, hidden))}-10",
            build_model=lambda: MLP(input_dim=64, hidden=hidden, num_classes=10),
            input_shape=(64,),
            batch_size=256,
            steps_per_epoch=3 if quick else 10,
        ),
    )
    return StepCostSettings(
        cases=tuple(case for case in cases if case.key in args.models),
        rounds=_pick(args.rounds, 15, 1, quick),
        timed_epochs=_pick(args.timed_epochs, 2, 1, quick),
        sparsity=0.9,
        malloc_tuned=malloc_tuned,
    )


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed blocks of up to 32 MiB instead of unmapping them.

    By default glibc serves large blocks with ``mmap`` and unmaps them on free, adjusting that
    threshold as the program runs; every training step then page-faults in fresh memory for
    its temporaries, and how much depends on the heap's history, so the same fit runs 10-20%
    faster or slower from one time to the next. Fixed thresholds make step times repeatable.
    Returns whether it worked (False off glibc).
    """
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(
        mallopt(m_trim_threshold, 2**31 - 1)
    )


def silence_lightning() -> None:
    """Keep stdout for the tables: Lightning's info lines and known-harmless warnings go."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_sparse"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Every loader is in-memory; workers would only add process start-up time.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected sections, print their markdown and write it into ``--output``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads={args.threads} is not allowed; it must be >= 1.")
    torch.set_num_threads(args.threads)
    silence_lightning()
    command = shlex.join(["python", "scripts/benchmark.py", *argv])
    env = describe_environment()
    chosen = SECTIONS if args.section == "all" else (args.section,)
    malloc_tuned = "step_cost" in chosen and not args.system_malloc and keep_freed_memory()
    written: dict[str, str] = {}
    for section in chosen:
        started, load_start = time.perf_counter(), load_average()
        if section == "accuracy":
            settings = accuracy_settings(args)
            body = accuracy_tables(settings, run_accuracy(settings))
            title = "Accuracy: MagnitudePruning vs Lightning's ModelPruning (digits, SmallCNN)"
        else:
            step_settings = step_cost_settings(args, malloc_tuned)
            body = step_cost_tables(step_settings, run_step_cost(step_settings))
            title = "Cost per training step with masks enforced (ratio to dense)"
        if args.quick:
            title += " [--quick smoke run: numbers are meaningless]"
        preamble = section_preamble(title, command, env, started, (load_start, load_average()))
        written[section] = f"{preamble}\n\n{body}"
        print(written[section] + "\n", flush=True)
    write_sections(args.output, written)
    progress(f"wrote {', '.join(written)} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
