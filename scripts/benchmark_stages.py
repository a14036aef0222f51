"""Measure one-shot pruning (magnitude vs Wanda) against GMP, and sparse vs dense transfer.

Two tables on scikit-learn's digits with the default ``SmallCNN``, over seeds:

- one-shot: a dense model is pruned once to each target sparsity by weight magnitude and by
  Wanda's data-aware score, per layer and with one global threshold, evaluated right away and
  after a short fine-tune that holds every zero (``ConstantPruning``); gradual magnitude pruning
  (``MagnitudePruning``) trained from scratch with the same total number of epochs is the
  baseline;
- transfer: models trained on the digits 0-4 (dense, and pruned by GMP) get a new head and are
  fine-tuned on the digits 5-9 the same way (``ConstantPruning`` holding every zero); the zeros of
  the sparse backbone must survive to the element.

Every number in the output comes from the run that writes it; the section records the command,
the machine, the versions and the date. The section sits between ``<!-- stages:start -->`` and
``<!-- stages:end -->`` in ``docs/benchmarks.md``; the rest of the file is left as it is. Run from
the repository root::

    python scripts/benchmark_stages.py                                 # ~5 min on 2 CPU cores
    python scripts/benchmark_stages.py --quick --output /tmp/bench.md  # smoke run, seconds
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch

from lightning_sparse.callbacks import ConstantPruning, MagnitudePruning
from lightning_sparse.core.targets import prunable_parameters
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule
from lightning_sparse.posttrain.oneshot import OneShotPruning, oneshot

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- stages:start -->", "<!-- stages:end -->"
CRITERIA = ("magnitude", "wanda")
HEAD = "model.fc2.weight"


@dataclass(frozen=True)
class StagesSettings:
    """What the benchmark runs; the defaults are the documented full run.

    Attributes:
        seeds: run seeds (initial weights, batch order, calibration batches).
        sparsities: one-shot and GMP targets (fraction of zeros over every Conv/Linear weight).
        scopes: ``layer`` (the target in every layer) and/or ``global`` (one threshold).
        dense_epochs: epochs of the dense model that is pruned one-shot (and of transfer sources).
        lr: Adam learning rate of dense, GMP and source training.
        finetune_epochs: epochs of the short fine-tune after one-shot pruning.
        finetune_lrs: Adam learning rates tried for that fine-tune and for the transfer fine-tune;
            each configuration reports the one with the best mean validation accuracy over seeds
            (never chosen on test accuracy).
        calibration_batches: training batches Wanda reads.
        gmp_start: epoch of GMP's first update.
        gmp_end: epoch GMP reaches its target (cubic), then fine-tunes to its last epoch.
        transfer_sparsity: GMP target of the sparse transfer source.
        transfer_epochs: fine-tune epochs on the digits 5-9.
        batch_size: samples per batch.
        threads: ``torch.set_num_threads`` for the run (1 is fastest for this small model).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    scopes: tuple[str, ...] = ("layer", "global")
    dense_epochs: int = 30
    lr: float = 0.01
    finetune_epochs: int = 2
    finetune_lrs: tuple[float, ...] = (0.001, 0.01)
    calibration_batches: int = 8
    gmp_start: float = 1.0
    gmp_end: float = 20.0
    transfer_sparsity: float = 0.9
    transfer_epochs: int = 10
    batch_size: int = 64
    threads: int = 1

    @property
    def gmp_epochs(self) -> int:
        """GMP trains as long as dense training plus the one-shot fine-tune: the same budget."""
        return self.dense_epochs + self.finetune_epochs


QUICK = StagesSettings(
    seeds=(0,),
    sparsities=(0.7,),
    scopes=("layer",),
    dense_epochs=2,
    finetune_epochs=1,
    calibration_batches=2,
    gmp_start=0.0,
    gmp_end=1.0,
    transfer_epochs=1,
    finetune_lrs=(0.001,),
)


@dataclass
class Results:
    """Accuracies (fractions) and sparsities, keyed by what produced them.

    ``oneshot[(criterion, scope, sparsity, seed, lr)]`` and ``transfer[(kind, seed, lr)]`` hold
    dicts with ``test``/``val`` (after the fine-tune), ``oneshot_test`` (before it) and
    ``sparsity``; ``gmp[(sparsity, seed)]`` holds ``(test, sparsity)``.
    """

    dense: dict[int, float] = field(default_factory=dict)
    oneshot: dict[tuple[str, str, float, int, float], dict[str, float]] = field(
        default_factory=dict
    )
    gmp: dict[tuple[float, int], tuple[float, float]] = field(default_factory=dict)
    transfer: dict[tuple[str, int, float], dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def _best_lr(settings: StagesSettings, val: Callable[[int, float], float]) -> float:
    """The fine-tune learning rate with the best mean validation accuracy (ties: the first)."""
    return max(
        settings.finetune_lrs,
        key=lambda lr: statistics.fmean(val(seed, lr) for seed in settings.seeds),
    )


def _quiet_trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def _module(settings: StagesSettings, num_classes: int = 10, lr: float | None = None) -> Any:
    return ClassificationModule(
        SmallCNN(num_classes=num_classes), num_classes=num_classes, lr=lr or settings.lr
    )


def _data(settings: StagesSettings, seed: int, classes: Sequence[int] | None = None) -> Any:
    return DigitsDataModule(batch_size=settings.batch_size, seed=seed, classes=classes)


def _test_acc(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    (result,) = _quiet_trainer().test(module, datamodule=datamodule, verbose=False)
    return float(result["test/acc"])


def _val_acc(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    (result,) = _quiet_trainer(limit_val_batches=1.0).validate(
        module, datamodule=datamodule, verbose=False
    )
    return float(result["val/acc"])


def _sparsity(module: torch.nn.Module, skip: Sequence[str] = ()) -> float:
    weights = [w for n, w in prunable_parameters(module).items() if n not in skip]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _train(
    settings: StagesSettings,
    seed: int,
    epochs: int,
    sparsity: float | None,
    classes: Sequence[int] | None = None,
    lr: float | None = None,
) -> ClassificationModule:
    """Train from scratch: dense, or with GMP to ``sparsity`` (cubic, gmp_start..gmp_end)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module = _module(settings, num_classes=len(classes) if classes else 10, lr=lr)
    callbacks = []
    if sparsity is not None:
        end = min(settings.gmp_end, float(epochs))
        callbacks.append(
            MagnitudePruning(
                final_sparsity=sparsity,
                start_epoch=min(settings.gmp_start, end),
                end_epoch=end,
                update_frequency=0.5,
            )
        )
    trainer = _quiet_trainer(max_epochs=epochs, callbacks=callbacks)
    trainer.fit(module, datamodule=_data(settings, seed, classes))
    return module


def _run_oneshot(settings: StagesSettings, results: Results, log: Callable[[str], None]) -> None:
    for seed in settings.seeds:
        log(f"dense, seed {seed}")
        dense = _train(settings, seed, settings.dense_epochs, None)
        state = {k: v.clone() for k, v in dense.state_dict().items()}
        results.dense[seed] = _test_acc(dense, _data(settings, seed))
        for sparsity in settings.sparsities:
            for scope in settings.scopes:
                for criterion in CRITERIA:
                    for lr in settings.finetune_lrs:
                        pl.seed_everything(seed, workers=True, verbose=False)
                        module = _module(settings, lr=lr)
                        module.load_state_dict(state)
                        step = OneShotPruning(
                            sparsity,
                            criterion=criterion,
                            global_sparsity=scope == "global",
                            calibration_batches=settings.calibration_batches,
                        )
                        summary = oneshot(
                            module,
                            _data(settings, seed),
                            [step],
                            finetune_epochs=settings.finetune_epochs,
                        )
                        results.oneshot[(criterion, scope, sparsity, seed, lr)] = {
                            "oneshot_test": summary["after_oneshot"]["test_acc"],
                            "test": summary["after_finetune"]["test_acc"],
                            "val": summary["after_finetune"]["val_acc"],
                            "sparsity": summary["sparsity"],
                        }
            log(f"GMP {sparsity}, seed {seed}")
            gmp = _train(settings, seed, settings.gmp_epochs, sparsity)
            results.gmp[(sparsity, seed)] = (_test_acc(gmp, _data(settings, seed)), _sparsity(gmp))


def _run_transfer(settings: StagesSettings, results: Results, log: Callable[[str], None]) -> None:
    lower, upper = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    with tempfile.TemporaryDirectory() as scratch:
        for seed in settings.seeds:
            sources: dict[str, tuple[ClassificationModule, Path, float]] = {}
            for kind, sparsity in (("dense", None), ("sparse", settings.transfer_sparsity)):
                log(f"transfer source {kind}, seed {seed}")
                source = _train(settings, seed, settings.dense_epochs, sparsity, lower)
                path = Path(scratch) / f"{kind}-{seed}.ckpt"
                torch.save({"state_dict": source.state_dict()}, path)
                sources[kind] = (source, path, _test_acc(source, _data(settings, seed, lower)))
            for lr in settings.finetune_lrs:
                for kind, (source, path, source_acc) in sources.items():
                    pl.seed_everything(seed, workers=True, verbose=False)
                    module = ClassificationModule(
                        SmallCNN(num_classes=5),
                        num_classes=5,
                        lr=lr,
                        init_from=str(path),
                        reset_head=True,
                    )
                    trainer = _quiet_trainer(
                        max_epochs=settings.transfer_epochs, callbacks=[ConstantPruning()]
                    )
                    trainer.fit(module, datamodule=_data(settings, seed, upper))
                    before = {n: w.detach() == 0 for n, w in prunable_parameters(source).items()}
                    after = {n: w.detach() == 0 for n, w in prunable_parameters(module).items()}
                    changed = sum(int((before[n] != after[n]).sum()) for n in before if n != HEAD)
                    results.transfer[(kind, seed, lr)] = {
                        "source_sparsity": _sparsity(source, skip=[HEAD]),
                        "source_acc": source_acc,
                        "test": _test_acc(module, _data(settings, seed, upper)),
                        "val": _val_acc(module, _data(settings, seed, upper)),
                        "sparsity": _sparsity(module, skip=[HEAD]),
                        "changed": float(changed),
                    }
                log(f"from scratch on 5-9, seed {seed}, lr {lr}")
                # The transfer's own recipe (epochs, learning rate), from random weights.
                model = _train(settings, seed, settings.transfer_epochs, None, upper, lr=lr)
                results.transfer[("scratch", seed, lr)] = {
                    "test": _test_acc(model, _data(settings, seed, upper)),
                    "val": _val_acc(model, _data(settings, seed, upper)),
                    "sparsity": _sparsity(model, skip=[HEAD]),
                }


def _epochs(count: float) -> str:
    return f"{count:g} epoch" if count == 1 else f"{count:g} epochs"


def _mean_std(values: Sequence[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = [":---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def _environment(settings: StagesSettings) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform's answer stands
    return (
        f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__} (run on CPU), lightning "
        f"{lightning.__version__}, Python {platform.python_version()}; "
        f"`torch.set_num_threads({settings.threads})`"
    )


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _oneshot_val(
    results: Results, criterion: str, scope: str, sparsity: float
) -> Callable[[int, float], float]:
    def val(seed: int, lr: float) -> float:
        return results.oneshot[(criterion, scope, sparsity, seed, lr)]["val"]

    return val


def _transfer_val(results: Results, kind: str) -> Callable[[int, float], float]:
    def val(seed: int, lr: float) -> float:
        return results.transfer[(kind, seed, lr)]["val"]

    return val


def _lr_text(lr: float) -> str:
    return f"lr {lr:g}"


def _oneshot_section(settings: StagesSettings, results: Results) -> str:
    seeds = settings.seeds
    first_lr = settings.finetune_lrs[0]

    def runs(criterion: str, scope: str, sparsity: float, lr: float) -> list[dict[str, float]]:
        return [results.oneshot[(criterion, scope, sparsity, seed, lr)] for seed in seeds]

    chosen: dict[tuple[str, str, float], float] = {}
    rows = []
    for sparsity in settings.sparsities:
        for scope in settings.scopes:
            cells = [f"{sparsity:.2f}", scope]
            for criterion in CRITERIA:
                # The one-shot model does not depend on the fine-tune's learning rate.
                before = [r["oneshot_test"] for r in runs(criterion, scope, sparsity, first_lr)]
                cells.append(_mean_std(before))
            for criterion in CRITERIA:
                lr = _best_lr(settings, _oneshot_val(results, criterion, scope, sparsity))
                chosen[(criterion, scope, sparsity)] = lr
                tuned = [r["test"] for r in runs(criterion, scope, sparsity, lr)]
                cells.append(f"{_mean_std(tuned)} ({_lr_text(lr)})")
            gmp = [results.gmp[(sparsity, s)][0] for s in seeds] if scope == "layer" else []
            cells.append(_mean_std(gmp) if gmp else "-")
            rows.append(cells)
    header = [
        "Target sparsity",
        "Scope",
        "Magnitude, one-shot",
        "Wanda, one-shot",
        f"Magnitude + fine-tune ({_epochs(settings.finetune_epochs)})",
        f"Wanda + fine-tune ({_epochs(settings.finetune_epochs)})",
        f"GMP from scratch ({_epochs(settings.gmp_epochs)})",
    ]
    # How far the sparsity measured on the weights lies from the target, over every run.
    deviation = max(
        [abs(v["sparsity"] - key[2]) for key, v in results.oneshot.items()]
        + [abs(v[1] - key[0]) for key, v in results.gmp.items()]
    )
    verdicts = []
    for sparsity in settings.sparsities:
        for scope in settings.scopes:
            for field_name, stage in (("oneshot_test", "one-shot"), ("test", "after fine-tune")):
                diffs = []
                for seed in seeds:
                    pair = {
                        c: results.oneshot[
                            (c, scope, sparsity, seed, chosen[(c, scope, sparsity)])
                        ][field_name]
                        for c in CRITERIA
                    }
                    diffs.append(pair["wanda"] - pair["magnitude"])
                better = sum(d > 0 for d in diffs)
                verdicts.append(
                    f"- {sparsity:.2f}, {scope}, {stage}: Wanda - magnitude = "
                    f"{100 * statistics.fmean(diffs):+.2f} pp (Wanda better on {better} of "
                    f"{len(seeds)} seeds)"
                )
    dense = _mean_std([results.dense[s] for s in seeds])
    return "\n".join(
        [
            "### One-shot: magnitude vs Wanda, with and without a short fine-tune, against GMP",
            "",
            f"Test accuracy %, mean ± std over seeds {', '.join(map(str, seeds))}. The dense "
            f"model that is pruned scores {dense}. Sparsity reached, measured on the weights of "
            f"every run of the table, is within {deviation:.6f} of its target (rounding to whole "
            "weights per layer). The fine-tune columns name the learning rate picked on "
            "validation accuracy. GMP prunes per layer, so it fills the `layer` rows only.",
            "",
            _table(header, rows),
            "",
            "Wanda minus magnitude, computed from the runs above:",
            "",
            *verdicts,
        ]
    )


def _transfer_section(settings: StagesSettings, results: Results) -> str:
    seeds = settings.seeds
    labels = {
        "sparse": f"GMP {settings.transfer_sparsity:.2f} source, transferred",
        "dense": "dense source, transferred",
        "scratch": "no source: the same fine-tune from random weights",
    }
    rows, means = [], {}
    for kind in ("sparse", "dense", "scratch"):
        lr = _best_lr(settings, _transfer_val(results, kind))
        entries = [results.transfer[(kind, s, lr)] for s in seeds]
        every_lr = [results.transfer[(kind, s, x)] for s in seeds for x in settings.finetune_lrs]
        has_source = "source_acc" in entries[0]
        means[kind] = statistics.fmean(e["test"] for e in entries)
        rows.append(
            [
                labels[kind],
                f"{statistics.fmean(e['source_sparsity'] for e in entries):.4f}"
                if has_source
                else "-",
                _mean_std([e["source_acc"] for e in entries]) if has_source else "-",
                f"{statistics.fmean(e['sparsity'] for e in entries):.4f}",
                str(int(sum(e["changed"] for e in every_lr))) if has_source else "-",
                _lr_text(lr),
                _mean_std([e["test"] for e in entries]),
                " / ".join(f"{100 * e['test']:.2f}" for e in entries),
            ]
        )
    header = [
        "Model",
        "Backbone sparsity of the source",
        "Source test acc. % (digits 0-4)",
        "Backbone sparsity after transfer",
        "Backbone zeros changed (all runs)",
        "Fine-tune lr (picked on val.)",
        "Test acc. % on digits 5-9",
        f"Per seed ({', '.join(map(str, seeds))})",
    ]
    lrs = ", ".join(f"{lr:g}" for lr in settings.finetune_lrs)
    return "\n".join(
        [
            "### Sparse transfer: digits 0-4 -> digits 5-9",
            "",
            f"Sources trained {_epochs(settings.dense_epochs)} on the digits 0-4 (Adam lr "
            f"{settings.lr}): dense, and GMP to {settings.transfer_sparsity:.2f} (cubic, epochs "
            f"{settings.gmp_start:g}-{min(settings.gmp_end, settings.dense_epochs):g}). Each gets "
            "a new 5-class head (`init_from`, `reset_head=True`) and is fine-tuned "
            f"{_epochs(settings.transfer_epochs)} on the digits 5-9 with `ConstantPruning` "
            "holding every zero, the same for both; Adam with each learning rate of "
            f"({lrs}), the one with the best mean validation accuracy reported. 'Backbone' is "
            "every Conv/Linear weight but the swapped head; 'zeros changed' counts, over every "
            "seed and learning rate, backbone weights whose being zero differs from the source.",
            "",
            _table(header, rows),
            "",
            f"Sparse minus dense transfer: {100 * (means['sparse'] - means['dense']):+.2f} pp "
            "test accuracy on the digits 5-9; transfer minus training from scratch: dense "
            f"{100 * (means['dense'] - means['scratch']):+.2f} pp, sparse "
            f"{100 * (means['sparse'] - means['scratch']):+.2f} pp. Computed from the runs above.",
        ]
    )


def run_stages_benchmark(
    settings: StagesSettings | None = None,
    *,
    command: str = "python scripts/benchmark_stages.py",
    progress: Callable[[str], None] | None = None,
) -> str:
    """Run the benchmark and return its section of ``docs/benchmarks.md`` as markdown.

    Args:
        settings: what to run (the documented full run by default; :data:`QUICK` for a smoke run).
        command: the command line recorded in the section.
        progress: called with a line of text as the runs go (e.g. ``print`` to stderr).

    Returns:
        The section, between its ``<!-- stages:start -->`` / ``<!-- stages:end -->`` markers.
    """
    settings = settings or StagesSettings()
    log = progress or (lambda message: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    started, load_start = time.perf_counter(), _load()
    results = Results()
    try:
        _run_oneshot(settings, results, log)
        _run_transfer(settings, results, log)
    finally:
        torch.set_num_threads(threads)
    results.seconds = time.perf_counter() - started
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    setup = [
        f"- Command: `{command}`",
        f"- Machine: {_environment(settings)}",
        f"- Date: {date}; section wall time {results.seconds / 60:.1f} min; 1-min load average "
        f"{load_start} at start, {_load()} at end (the machine is shared)",
        "- Task: scikit-learn digits, `DigitsDataModule(split_seed=0)` (1257/180/360 "
        "train/val/test images), default `SmallCNN` in `ClassificationModule`, batch "
        f"{settings.batch_size}. A seed fixes the initial weights, the batch order and the "
        "calibration batches.",
        f"- One-shot: a dense model trained {_epochs(settings.dense_epochs)} (Adam lr "
        f"{settings.lr}) is pruned once with `OneShotPruning` over every Conv/Linear weight, "
        "unstructured; `layer` scope prunes the target in every layer, `global` uses one "
        f"threshold over all. Wanda scores |W| * rms(input) over {settings.calibration_batches} "
        f"training batches. The fine-tune runs {_epochs(settings.finetune_epochs)} with "
        "`ConstantPruning` holding every zero, once with each Adam learning rate of "
        f"({', '.join(f'{lr:g}' for lr in settings.finetune_lrs)}); per configuration the one "
        "with the best mean validation accuracy over seeds is reported (validation: 180 images; "
        "the test split plays no part in any choice).",
        f"- GMP: `MagnitudePruning` from scratch for {_epochs(settings.gmp_epochs)} (the dense "
        "epochs plus the fine-tune: the same training budget as one-shot + fine-tune), cubic "
        f"from epoch {settings.gmp_start:g} to {min(settings.gmp_end, settings.gmp_epochs):g}, "
        f"an update every 0.5 epoch, Adam lr {settings.lr}, per layer.",
    ]
    body = "\n\n".join(
        [
            "## Every stage: one-shot pruning and sparse transfer (digits, SmallCNN)",
            "\n".join(setup),
            _oneshot_section(settings, results),
            _transfer_section(settings, results),
        ]
    )
    return f"{START}\n{body}\n{END}"


def write_section(path: Path, section: str) -> None:
    """Put ``section`` between its markers in ``path``; leave everything else in the file as is.

    An existing stages section is replaced in place; otherwise the section is appended. A missing
    file is created with a title.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = text.find(START), text.find(END)
    if begin != -1 and end > begin:
        text = text[:begin] + section + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file")
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument("--seeds", type=int, nargs="+", help="run seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    return parser.parse_args(argv)


def _silence() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_sparse"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its section into ``--output``."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = _parse(arguments)
    settings = QUICK if args.quick else StagesSettings()
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.threads:
        settings = replace(settings, threads=args.threads)
    _silence()
    command = shlex.join(["python", "scripts/benchmark_stages.py", *arguments])

    def progress(message: str) -> None:
        print(f"[stages] {message}", file=sys.stderr, flush=True)

    section = run_stages_benchmark(settings, command=command, progress=progress)
    write_section(args.output, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
