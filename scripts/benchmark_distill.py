"""Does distillation from the dense self help pruning? Writes a section of docs/benchmarks.md.

On scikit-learn digits with the default ``SmallCNN``, for sparsity 0.95 and 0.98 and 3 seeds:
``gmp`` (pruning alone), ``gmp_distill`` (pruning with the dense self as teacher) and
``gmp_qat_distill`` (the main job: the same, then int8 QAT), each a whole
``python -m lightning_sparse.train`` run with the shipped recipe and only
``recipe.pruning.final_sparsity``, ``seed`` and, by default, one pruning schedule for all three
(``--schedule``: epochs 5-20, the main job's, so that the recipes differ only in distillation and
QAT), plus a dense run per seed. Accuracy is
on the test split, in PyTorch and in ONNX Runtime (fp32 export; int8 for the QAT recipe). Runs go
two at a time, one thread each.

Only the block between ``<!-- distill:start -->`` and ``<!-- distill:end -->`` is replaced
(appended if missing). Run from the repository root::

    python scripts/benchmark_distill.py                      # ~5 min on 2 CPU cores
    python scripts/benchmark_distill.py --quick --output /tmp/benchmarks.md   # smoke run
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- distill:start -->", "<!-- distill:end -->"
RECIPES = ("gmp", "gmp_distill", "gmp_qat_distill")


@dataclass(frozen=True)
class Job:
    """One training run: a recipe, a target sparsity (None: dense) and a seed."""

    recipe: str
    sparsity: float | None
    seed: int


def overrides(job: Job, extra: list[str]) -> list[str]:
    """Command-line overrides of one job."""
    args = [f"recipe={job.recipe}", f"seed={job.seed}", "trainer.enable_progress_bar=false"]
    if job.sparsity is not None:
        args.append(f"recipe.pruning.final_sparsity={job.sparsity}")
    return [*args, *extra]


def run_job(job: Job, extra: list[str], root: Path) -> dict[str, Any]:
    """Run one job as a user would; return its summary.json."""
    run_dir = root / f"{job.recipe}-{job.sparsity}-{job.seed}"
    # One thread per run: two runs share the 2 cores, and more threads only contend.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "lightning_sparse.train",
        *overrides(job, extra),
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


def pct(values: list[float]) -> str:
    """Mean ± std in percent (std 0 for one value)."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def per_seed(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.2f}" for v in values)


def render(
    results: dict[Job, dict[str, Any]],
    seeds: list[int],
    sparsities: list[float],
    extra: list[str],
    meta: dict[str, Any],
) -> str:
    """The markdown section (without its markers)."""
    command = "python scripts/benchmark_distill.py"
    lines = [
        "## Distillation from the dense self (digits, SmallCNN)",
        "",
        f"- Command: `{command}`",
        f"- Machine: {meta['machine']}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"Python {platform.python_version()}; two runs at a time, `OMP_NUM_THREADS=1` each",
        f"- Date: {meta['date']}; wall time {meta['minutes']:.1f} min; 1-min load average "
        f"{meta['load'][0]:.2f} at start, {meta['load'][1]:.2f} at end",
        "- Runs: `python -m lightning_sparse.train recipe=<recipe> "
        f"recipe.pruning.final_sparsity=<s> seed=<seed> {' '.join(extra)}` (pruning recipes), "
        "everything else the shipped defaults "
        "(30 epochs, Adam lr 0.01, each recipe's own schedule: see `conf/recipe/`); seeds "
        f"{', '.join(map(str, seeds))}. Test split of `DigitsDataModule(split_seed=0)` (360 "
        "images; one image is 0.28 pp). ONNX int8 only where the recipe quantizes.",
        "",
        "| Recipe | Target sparsity | Sparsity reached | Test acc. % (PyTorch) | per seed | "
        "ONNX fp32 % | ONNX int8 % | int8 per seed |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense = [results[Job("dense", None, s)] for s in seeds]
    dense_acc = [float(r["test_acc"]) for r in dense]
    lines.append(
        f"| dense | 0.00 | 0.0000 | {pct(dense_acc)} | {per_seed(dense_acc)} | "
        f"{pct([float(r['onnx_fp32_acc']) for r in dense])} | - | - |"
    )
    means: dict[tuple[str, float], float] = {}
    for sparsity in sparsities:
        for recipe in RECIPES:
            rows = [results[Job(recipe, sparsity, s)] for s in seeds]
            acc = [float(r["test_acc"]) for r in rows]
            int8 = [float(r["onnx_int8_acc"]) for r in rows if r.get("onnx_int8_acc") is not None]
            reached = statistics.mean(float(r["sparsity"]) for r in rows)
            means[(recipe, sparsity)] = statistics.mean(int8 or acc)
            lines.append(
                f"| {recipe} | {sparsity:.2f} | {reached:.4f} | {pct(acc)} | {per_seed(acc)} | "
                f"{pct([float(r['onnx_fp32_acc']) for r in rows])} | {pct(int8)} | "
                f"{per_seed(int8) if int8 else '-'} |"
            )
    lines += ["", "Targets (issue 4), on the means over seeds (int8 where quantized):", ""]
    dense_mean = statistics.mean(dense_acc)
    for sparsity in sparsities:
        gain = 100 * (means[("gmp_distill", sparsity)] - means[("gmp", sparsity)])
        gap = 100 * (means[("gmp_qat_distill", sparsity)] - dense_mean)
        lines.append(
            f"- {sparsity:.2f}: gmp_distill - gmp = {gain:+.2f} pp"
            + (
                f" (target >= +0.30: {'met' if gain >= 0.3 else '**not met**'})"
                if sparsity == 0.98
                else ""
            )
            + f"; gmp_qat_distill int8 - dense = {gap:+.2f} pp"
            + (
                f" (target >= -0.50: {'met' if gap >= -0.5 else '**not met**'})"
                if sparsity == 0.95
                else ""
            )
        )
    return "\n".join(lines)


def write_section(path: Path, markdown: str) -> None:
    """Replace the distill block of ``path`` (or append it); leave the rest of the file as it is."""
    block = f"{BEGIN}\n{markdown.strip()}\n{END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every job two at a time, write the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.98])
    parser.add_argument(
        "--schedule",
        default="recipe.pruning.start_epoch=5 recipe.pruning.end_epoch=20",
        help="pruning schedule overrides given to every pruning recipe",
    )
    parser.add_argument("--extra", default="", help="more Hydra overrides for every run")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: synthetic data, 3 epochs, one seed"
    )
    args = parser.parse_args(argv)
    extra = [*shlex.split(args.schedule), *shlex.split(args.extra)]
    seeds = list(args.seeds)
    if args.quick:
        seeds = [0]
        extra = [
            "data=synthetic",
            "trainer.max_epochs=3",
            *extra,
            # After the schedule: later overrides win.
            "recipe.pruning.start_epoch=1",
            "recipe.pruning.end_epoch=2",
        ]
    jobs = [Job("dense", None, s) for s in seeds] + [
        Job(recipe, sparsity, seed)
        for sparsity in args.sparsities
        for recipe in RECIPES
        for seed in seeds
    ]
    start, load_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        # `dense` has no pruning entry to override: drop the quick pruning overrides for it.
        def one(job: Job) -> dict[str, Any]:
            job_extra = [e for e in extra if not (job.recipe == "dense" and "pruning" in e)]
            return run_job(job, job_extra, Path(tmp))

        results = dict(zip(jobs, pool.map(one, jobs), strict=True))
    meta = {
        "machine": platform.processor() or platform.machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": (time.time() - start) / 60,
        "load": (load_start, os.getloadavg()[0]),
    }
    markdown = render(results, seeds, list(args.sparsities), extra, meta)
    write_section(args.output, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
