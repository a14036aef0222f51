"""Network Slimming and the compression-aware search: docs/benchmarks.md sections.

Slimming: ``recipe=slimming`` on ``SmallCNN`` with BatchNorm (``model.model.batch_norm=true``,
width 32) against channel removal with the same schedule, the same MACs target (``--removal`` of
the dense model's) and no penalty, channels ranked by ``l1`` (the weights' magnitude: the channel
recipe's default) or by ``bn_scale`` (|gamma| without having been penalised), every layer keeping
the same share or (``_global``, ``--slim-allocation global``) one ranking across layers, over
several seeds.
Whole ``python -m lightning_sparse.train`` runs: validation accuracy (the last validation pass),
test accuracy and the MACs the export counts.

Search: ``hparams_search=compression_nas`` with ``--trials`` trials through the real Optuna
sweeper on ``--search-data``, and the shipped main recipe (``gmp_qat_distill``, the default job)
trained with the same data and seed; whether a trial dominates the main job on (validation
accuracy, MACs), with each one's ONNX Runtime latency beside it.

Each part replaces only its own block of the output (``<!-- slimming:start -->`` ...
``<!-- slimming:end -->`` for the CNN on digits, ``<!-- slimming-<model>-<data>:start -->`` for
others, ``<!-- nas:start -->`` ... ``<!-- nas:end -->``; appended if missing), so one can be rerun
without the other (``--skip``). Run from the repository root::

    python scripts/benchmark_slimming.py                 # ~15 min on 2 busy CPU cores
    python scripts/benchmark_slimming.py --skip slimming --search-data mnist5k --trials 40 --jobs 2
    # the issue's ResNet-18 comparison (about 70 min on 2 cores; l1_global adds three runs):
    python scripts/benchmark_slimming.py --skip search --slim-model resnet18 --slim-data mnist5k
        --epochs 7 --removal-epoch 5 --warmup 0.5 --removal 0.75 --strengths 1e-3
        --slim-allocation global --baselines l1 --override model.lr=0.003
        --override model.lr_schedule=cosine --parallel 6
    python scripts/benchmark_slimming.py --quick --output /tmp/benchmarks.md   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lightning_sparse.run.markdown import write_marked_block

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- slimming:start -->", "<!-- slimming:end -->"
NAS_BEGIN, NAS_END = "<!-- nas:start -->", "<!-- nas:end -->"


def slimming_markers(model: str, data: str) -> tuple[str, str]:
    """The block a slimming run writes: one per model and data set, so the CNN on digits and
    ResNet-18 on mnist5k keep their own sections."""
    if (model, data) == ("cnn", "digits"):
        return BEGIN, END
    tag = f"slimming-{model}-{data}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def slim_model(model: str, data: str) -> list[str]:
    """The slimmed model: the CNN gets its BatchNorm switched on; others (resnet18) have theirs."""
    extra = ["model.model.batch_norm=true"] if model == "cnn" else []
    return [f"data={data}", f"model={model}", *extra]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(REPO),
        "HYDRA_FULL_ERROR": "0",
    }


def _command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lightning_sparse.train", *overrides]


def _shown(command: list[str]) -> str:
    """The command as a reader would type it, without this script's run-dir and quiet flags."""
    kept = [
        arg
        for arg in command[1:]
        if not arg.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "trainer.enable_progress"))
    ]
    return "python " + shlex.join(kept)


def _train_run(overrides: list[str], run_dir: Path, quick: bool) -> dict[str, Any]:
    # Hydra records these (not the hydra.* ones) in the run's .hydra/overrides.yaml.
    task = [*overrides, *(["debug=quick"] if quick else []), "trainer.enable_progress_bar=false"]
    command = _command([*task, f"hydra.run.dir={run_dir}"])
    summary = finished_run(run_dir, task)
    if summary is None:
        result = subprocess.run(
            command, cwd=REPO, env=_env(), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
    return {"command": _shown(command), "summary": summary}


def finished_run(run_dir: Path, overrides: list[str]) -> dict[str, Any] | None:
    """The summary of a run already finished in ``run_dir`` with these overrides (a
    ``--work-dir`` kept from an earlier, interrupted or extended benchmark), else None."""
    summary_path, overrides_path = run_dir / "summary.json", run_dir / ".hydra" / "overrides.yaml"
    if not (summary_path.is_file() and overrides_path.is_file()):
        return None
    if yaml.safe_load(overrides_path.read_text()) != overrides:
        return None
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary if summary.get("status") == "ok" else None


BASELINES = {
    # name: (label, importance, allocation)
    "l1": ("channel removal, l1, uniform (no penalty)", "l1", "uniform"),
    "l1_global": ("channel removal, l1, global (no penalty)", "l1", "global"),
    "bn_scale": ("channel removal, bn_scale, uniform (no penalty)", "bn_scale", "uniform"),
    "bn_scale_global": ("channel removal, bn_scale, global (no penalty)", "bn_scale", "global"),
}


def slimming_variants(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each variant; the same schedule and MACs target for all."""
    schedule = [
        f"trainer.max_epochs={args.epochs}",
        f"recipe.channel.start_epoch={args.removal_epoch}",
        f"recipe.channel.final_sparsity={args.removal}",
    ]
    variants = []
    for name in args.baselines:
        # The same recipe, the penalty removed: what channel removal does without slimming.
        label, importance, allocation = BASELINES[name]
        variants.append(
            (
                label,
                [
                    "recipe=slimming",
                    "~recipe.regularization",
                    *schedule,
                    f"recipe.channel.importance={importance}",
                    f"recipe.channel.allocation={allocation}",
                ],
            )
        )
    for strength in args.strengths:
        variants.append(
            (
                f"slimming, penalty {strength:g}, {args.slim_allocation}",
                [
                    "recipe=slimming",
                    *schedule,
                    f"recipe.channel.allocation={args.slim_allocation}",
                    f"recipe.regularization.start_epoch={args.warmup}",
                    f"recipe.regularization.strength={strength}",
                ],
            )
        )
    # The same extra overrides (an lr schedule, say) for every variant, after the variant's own.
    return [(label, [*overrides, *args.override]) for label, overrides in variants]


def slimming_section(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Every (variant, seed) run, ``args.parallel`` at once (one torch thread each)."""
    model = slim_model(args.slim_model, args.slim_data)
    variants = slimming_variants(args)

    def one(index: int, label: str, overrides: list[str], seed: int) -> dict[str, Any]:
        run = _train_run([*model, *overrides, f"seed={seed}"], work / f"{index}_{seed}", args.quick)
        s = run["summary"]
        print(label, seed, s["val_acc"], s["test_acc"], s["macs"], flush=True)
        return run

    jobs = [
        (index, label, overrides, seed)
        for index, (label, overrides) in enumerate(variants)
        for seed in args.seeds
    ]
    # Threads only wait on the training subprocesses; each run is its own process.
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        runs = list(pool.map(lambda job: one(*job), jobs))
    per_variant = len(args.seeds)
    return [
        {"variant": label, "runs": runs[i * per_variant : (i + 1) * per_variant]}
        for i, (label, _) in enumerate(variants)
    ]


def search_section(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    main_dir = work / "main"
    data = f"data={args.search_data}"
    main = _train_run([data, f"seed={args.seed}"], main_dir, args.quick)
    sweep = work / "nas"
    parallel = (
        ["hydra/launcher=joblib", f"hydra.sweeper.n_jobs={args.jobs}"] if args.jobs > 1 else []
    )
    start = time.time()
    command = _command(
        [
            "hparams_search=compression_nas",
            data,
            f"seed={args.seed}",
            f"hydra.sweeper.n_trials={args.trials}",
            *parallel,
            *(["debug=quick"] if args.quick else []),
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    result = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    trials = []
    for job in sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        summary = json.loads((job / "summary.json").read_text())
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        swept = {
            key.rsplit(".", 1)[-1]: value
            for key, _, value in (o.partition("=") for o in overrides)
            if key.startswith(("model.model.", "recipe.channel.final_sparsity"))
        }
        trials.append({"job": job.name, "params": swept, "summary": summary})
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    return {
        "minutes": (time.time() - start) / 60,
        "main": main,
        "command": _shown(command),
        "trials": trials,
        "front": len(results.get("solutions") or []),
    }


def _dominates(trial: dict[str, Any], main: dict[str, Any]) -> bool:
    acc, macs = trial["val_acc"], trial["macs"]
    return (
        acc >= main["val_acc"]
        and macs <= main["macs"]
        and (acc > main["val_acc"] or macs < main["macs"])
    )


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model_name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = f"{model_name}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        pass
    return cpu


def _mean_sd(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def _provenance(args: argparse.Namespace, threads: str) -> list[str]:
    """The command, date, machine and versions under a section's title."""
    import torch

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"`python scripts/benchmark_slimming.py {shlex.join(args.argv)}`".replace(" `", "`"),
        f"({now}; {_machine()}, shared with other jobs; torch {torch.__version__}; {threads}).",
        "",
    ]


def render(slim: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"## Network Slimming ({args.slim_model}, {args.slim_data})",
        "",
        *_provenance(args, "one torch thread"),
    ]
    if slim:
        dense = slim[0]["runs"][0]["summary"]["macs_dense"]
        model = " ".join(slim_model(args.slim_model, args.slim_data))
        lines += [
            "### Slimming vs channel removal without the penalty",
            "",
            f"`{model}` ({dense:,} MACs dense); "
            f"{args.epochs} epochs, channels removed at epoch {args.removal_epoch:g} until "
            f"{args.removal:.0%} of the MACs are gone, then fine-tuning; _uniform_: every group "
            "of coupled channels keeps the same share, _global_: one ranking across layers "
            "(`recipe.channel.allocation`); the slimming penalty from epoch "
            f"{args.warmup:g} to the removal. Seeds {', '.join(map(str, args.seeds))}: mean ± "
            "standard deviation, on the data set's own validation and test splits. Validation "
            "accuracy is the last validation pass.",
            "",
            "| variant | val acc (%) | test acc (%) | MACs | command (seed 0) |",
            "|---|---|---|---|---|",
        ]
        for row in slim:
            summaries = [run["summary"] for run in row["runs"]]
            macs = sorted({int(s["macs"]) for s in summaries})
            lines.append(
                f"| {row['variant']} | {_mean_sd([s['val_acc'] for s in summaries])} | "
                f"{_mean_sd([s['test_acc'] for s in summaries])} | "
                f"{', '.join(f'{m:,}' for m in macs)} | `{row['runs'][0]['command']}` |"
            )
        lines.append("")
    return "\n".join(lines)


def _ms(summary: dict[str, Any]) -> str:
    value = summary.get("ort_fp32_ms")
    return f"{value:.2f}" if isinstance(value, (int, float)) else "—"


def render_search(search: dict[str, Any], args: argparse.Namespace) -> str:
    main = search["main"]["summary"]
    trials = search["trials"]
    done = [t for t in trials if t["summary"].get("status") == "ok"]
    dominating = [t for t in done if _dominates(t["summary"], main)]
    lines = [
        f"## Compression-aware search vs the main recipe ({args.search_data})",
        "",
        *_provenance(
            args, f"one torch thread per job; the search took {search['minutes']:.0f} min"
        ),
        f"`{search['command']}`: {len(trials)} trials ({len(done)} completed), Optuna's "
        f"Pareto front holds {search['front']}. The main job (`{search['main']['command']}`, "
        f"recipe gmp_qat_distill: 90% unstructured zeros, int8) has validation accuracy "
        f"{100 * main['val_acc']:.2f}% at {int(main['macs']):,} MACs (zeros do not lower "
        f"the MACs) and {_ms(main)} ms fp32 in ONNX Runtime (batch 64, one thread). "
        f"**{len(dominating)} of the trials dominate it** on (validation accuracy, MACs): "
        "validation accuracy at least as high and fewer MACs. Latency (fp32, batch 64, one "
        "thread, each run timing its own model on a shared machine) is beside it, not an "
        "objective.",
        "",
        "| trial | width | depth | hidden | BatchNorm | MACs removed | val acc (%) | MACs "
        "| ORT fp32 ms | test acc (%) | dominates main |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        s, p = t["summary"], t["params"]
        if s.get("status") != "ok":
            lines.append(f"| {t['job']} | failed | | | | | | | | | |")
            continue
        lines.append(
            f"| {t['job']} | {p.get('width', '—')} | {p.get('depth', '—')} | "
            f"{p.get('hidden', '—')} | {p.get('batch_norm', '—')} | "
            f"{100 * float(p.get('final_sparsity', 0)):.0f}% | "
            f"{100 * s['val_acc']:.2f} | {int(s['macs']):,} | {_ms(s)} | "
            f"{100 * s['test_acc']:.2f} | {'yes' if _dominates(s, main) else ''} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--removal-epoch", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--strengths", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=0, help="the search's and main job's seed")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--search-data", default="digits", help="the search's data set")
    parser.add_argument("--slim-model", default="cnn", help="the slimmed model (cnn, resnet18)")
    parser.add_argument("--slim-data", default="digits", help="the slimming runs' data set")
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once (joblib)")
    parser.add_argument(
        "--parallel", type=int, default=1, help="slimming runs at once (one thread each)"
    )
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=list(BASELINES),
        default=["l1", "bn_scale"],
        help="the no-penalty channel removals compared with slimming (importance, and _global: "
        "one ranking across layers)",
    )
    parser.add_argument(
        "--removal", type=float, default=0.5, help="share of the dense MACs removed"
    )
    parser.add_argument(
        "--slim-allocation",
        choices=["uniform", "global"],
        default="uniform",
        help="how the slimming runs share the removal among layers (the paper: global)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override added to every slimming run (repeatable)",
    )
    parser.add_argument("--skip", choices=["slimming", "search"], default=None)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: debug=quick, one seed, two trials"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the runs here (default: a temporary dir); a run already finished there with "
        "the same overrides is reused, so an interrupted or extended benchmark picks up",
    )
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.seeds, args.strengths, args.trials = [0], [1e-3], 2
    with tempfile.TemporaryDirectory(prefix="bench_slimming_") as tmp:
        work = args.work_dir or Path(tmp)
        slim = [] if args.skip == "slimming" else slimming_section(args, work)
        search = None if args.skip == "search" else search_section(args, work)
    if slim:
        text = render(slim, args)
        write_marked_block(args.output, *slimming_markers(args.slim_model, args.slim_data), text)
        print(text)
    if search is not None:
        text = render_search(search, args)
        write_marked_block(args.output, NAS_BEGIN, NAS_END, text)
        print(text)


if __name__ == "__main__":
    main()
