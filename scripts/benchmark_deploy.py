"""Measure speed at deployment; write the ``deploy`` section of docs/benchmarks.md.

ResNet-18 (torchvision, CIFAR-style stem) on ``data=mnist5k`` (1x28x28), four ways:

- **dense fp32**: ``recipe=dense`` for ``--epochs`` epochs;
- **dense int8**: that model quantized after training (``python -m lightning_sparse.oneshot
  recipe=ptq_int8``, 16 calibration batches);
- **channels removed, fp32 / int8**: ``recipe=channel_qat`` with ``recipe.channel.final_sparsity``
  set to each removal ratio (share of the dense MACs): channels go in the first half epoch, then
  quantization-aware training; *fp32* is that run's ``model.onnx`` (the same weights, fake
  quantization off), *int8* its ``model_int8.onnx``.

Every run is made by the package's own entry points, as a user would type them, into ``--runs``
(a run already there with ``status: ok`` is reused, so the script can be stopped and rerun), one
per configuration and seed. Accuracy is ONNX Runtime's on mnist5k's test split (1000 images: one
image is 0.1 points), per seed. Latency: the seed-0 runs' ONNX files, all timed side by side
(interleaved calls, medians) at batch 1 and 64 with 1 and 2 ONNX Runtime threads; MACs are per
sample (Conv and Linear layers). The wall time of each ``recipe=channel_qat`` run is reported
against the 15-minute target.

Run from the repository root::

    python scripts/benchmark_deploy.py                    # hours on a 2-core CPU; reuses runs
    python scripts/benchmark_deploy.py --quick --output /tmp/d.md --runs /tmp/d  # smoke run
    python scripts/benchmark_deploy.py --untrained --ratios 0.5 --latency-runs 10  # minutes

``--untrained`` measures latency only, on random-weight ResNet-18 and MobileNetV3-small (dense
and with channels removed in one shot, each fp32 and int8), with no training run.

Only the block between ``<!-- deploy:start -->`` and ``<!-- deploy:end -->`` is replaced (appended
if missing; ``--untrained``: the ``deploy-untrained`` block); the rest of the file is kept byte for
byte.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sparse.run.markdown import write_marked_block

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- deploy:start -->", "<!-- deploy:end -->"
# --untrained writes its own block, so the trained benchmark and the latency-only one sit side by
# side.
UNTRAINED = "deploy-untrained"
DEFAULT_OUTPUT = Path("docs/benchmarks.md")
TIME_FILE = "benchmark_time.json"
COMMON = ["model=resnet18", "data=mnist5k", "trainer.enable_progress_bar=false"]


@dataclass
class Settings:
    """What one invocation measures."""

    seeds: list[int]
    epochs: int
    ratios: list[float]
    runs: Path
    latency_runs: int
    threads: list[int] = field(default_factory=lambda: [1, 2])
    batches: list[int] = field(default_factory=lambda: [1, 64])
    # Overrides of every training run, and of the channel runs (--quick shortens them).
    extra: list[str] = field(default_factory=list)
    channel_extra: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One run: its directory and the command that makes it."""

    name: str
    seed: int
    directory: Path
    command: list[str]


def _progress(message: str) -> None:
    print(f"[benchmark_deploy] {message}", file=sys.stderr, flush=True)


def jobs(settings: Settings, seed: int) -> list[Job]:
    """The runs of one seed, in the order they must be made (PTQ reads the dense run)."""
    python = [sys.executable, "-m"]
    epochs = f"trainer.max_epochs={settings.epochs}"
    dense_dir = settings.runs / "dense" / f"seed{seed}"

    def train(name: str, overrides: list[str]) -> Job:
        directory = settings.runs / name / f"seed{seed}"
        command = [
            *python,
            "lightning_sparse.train",
            *overrides,
            *COMMON,
            f"seed={seed}",
            *settings.extra,
            f"hydra.run.dir={directory}",
        ]
        return Job(name, seed, directory, command)

    made = [train("dense", ["recipe=dense", epochs, "baseline=null"])]
    ptq_dir = settings.runs / "dense_ptq" / f"seed{seed}"
    made.append(
        Job(
            "dense_ptq",
            seed,
            ptq_dir,
            [
                *python,
                "lightning_sparse.oneshot",
                "recipe=ptq_int8",
                *COMMON,
                f"ckpt_path={dense_dir}",
                f"seed={seed}",
                f"hydra.run.dir={ptq_dir}",
            ],
        )
    )
    for ratio in settings.ratios:
        made.append(
            train(
                f"channel_{ratio:g}",
                [
                    "recipe=channel_qat",
                    f"recipe.channel.final_sparsity={ratio}",
                    *settings.channel_extra,
                ],
            )
        )
    return made


def summary_of(directory: Path) -> dict[str, Any] | None:
    path = directory / "summary.json"
    if not path.is_file():
        return None
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary if summary.get("status", "ok") == "ok" else None


def make(job: Job) -> dict[str, Any]:
    """Run ``job`` unless a finished run is there; its summary with the wall time it took."""
    summary = summary_of(job.directory)
    timing = job.directory / TIME_FILE
    if summary is None:
        _progress(f"running {shlex.join(job.command[2:])}")
        load = os.getloadavg()[0]
        start = time.time()
        cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(job.command, cwd=REPO, env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{job.name} seed {job.seed} failed (exit {result.returncode}).")
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        record = {
            "seconds": time.time() - start,
            # CPU time (user + system, all threads): what the run costs whatever the load.
            "cpu_seconds": cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime,
            "load": [load, os.getloadavg()[0]],
            "command": "python " + shlex.join(job.command[2:]),
        }
        timing.write_text(json.dumps(record, indent=2) + "\n")
        summary = summary_of(job.directory)
        assert summary is not None
    record = json.loads(timing.read_text()) if timing.is_file() else {}
    return {**summary, "wall": record}


def _test_batch(size: int) -> np.ndarray:
    """``size`` mnist5k test images (repeated if needed), as the exporter times them."""
    from lightning_sparse.data import MNIST5kDataModule

    data = MNIST5kDataModule(batch_size=64)
    data.setup("test")
    images = next(iter(data.test_dataloader()))[0]
    repeats = -(-size // len(images))
    return images.repeat(repeats, 1, 1, 1)[:size].float().numpy()


def measure_latency(files: dict[str, Path], settings: Settings) -> list[dict[str, Any]]:
    """Each ONNX file timed beside the others, per thread count and batch size."""
    from lightning_sparse.deploy.ort import OrtModel, interleaved_latency_ms

    rows = []
    for threads in settings.threads:
        sessions = {label: OrtModel(path, threads) for label, path in files.items()}
        for batch in settings.batches:
            latency = interleaved_latency_ms(
                sessions, _test_batch(batch), runs=settings.latency_runs
            )
            rows.append({"threads": threads, "batch": batch, "ms": latency})
            _progress(f"threads {threads}, batch {batch}: {latency}")
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(settings: Settings, command: str) -> dict[str, Any]:
    """Every run of every seed, then the side-by-side latency of seed 0's models."""
    import lightning
    import onnxruntime
    import torch

    start, load = time.time(), os.getloadavg()[0]
    summaries: dict[str, list[dict[str, Any]]] = {}
    for seed in settings.seeds:
        for job in jobs(settings, seed):
            summaries.setdefault(job.name, []).append(make(job))
    first = {name: runs[0] for name, runs in summaries.items()}
    files = {"dense fp32": Path(first["dense"]["onnx_fp32_path"])}
    files["dense int8"] = Path(first["dense_ptq"]["onnx_int8_path"])
    for ratio in settings.ratios:
        name = f"channel_{ratio:g}"
        files[f"{name} fp32"] = Path(first[name]["onnx_fp32_path"])
        files[f"{name} int8"] = Path(first[name]["onnx_int8_path"])
    latency = measure_latency(files, settings)
    return {
        "settings": settings,
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": {
            "cpu": cpu_name(),
            "cores": os.cpu_count() or 1,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "summaries": summaries,
        "latency": latency,
        "minutes": (time.time() - start) / 60,
        "load": (load, os.getloadavg()[0]),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| :--- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _accuracy(values: Sequence[float | None]) -> str:
    present = [100 * v for v in values if v is not None]
    if not present:
        return "n/a"
    if len(present) == 1:
        return f"{present[0]:.2f}"
    return f"{statistics.mean(present):.2f} ± {statistics.stdev(present):.2f}"


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def deploy_markdown(results: dict[str, Any]) -> str:
    """The section's markdown from :func:`run` results (every number comes from them)."""
    settings: Settings = results["settings"]
    env = results["environment"]
    summaries = results["summaries"]
    dense_macs = summaries["dense"][0]["macs"]
    configs: list[tuple[str, str, str, str]] = [
        ("dense fp32", "dense", "onnx_fp32_acc", "dense fp32"),
        ("dense int8 (PTQ)", "dense_ptq", "onnx_int8_acc", "dense int8"),
    ]
    for ratio in settings.ratios:
        name = f"channel_{ratio:g}"
        configs.append(
            (f"{ratio:.0%} of MACs removed, fp32", name, "onnx_fp32_acc", f"{name} fp32")
        )
        configs.append(
            (f"{ratio:.0%} of MACs removed, int8", name, "onnx_int8_acc", f"{name} int8")
        )
    points = [(row["threads"], row["batch"]) for row in results["latency"]]
    header = [
        "model",
        "MACs",
        "params",
        "test acc % (mnist5k)",
        *(f"ms, batch {b}, {t} thr" for t, b in points),
        *(f"speed-up, batch {b}, {t} thr" for t, b in points),
    ]
    rows, accuracy = [], {}
    for label, run_name, acc_key, timing_key in configs:
        runs = summaries[run_name]
        accuracy[label] = _mean([run.get(acc_key) for run in runs])
        macs = runs[0].get("macs") or dense_macs
        times = [row["ms"][timing_key] for row in results["latency"]]
        dense_times = [row["ms"]["dense fp32"] for row in results["latency"]]
        rows.append(
            [
                label,
                f"{macs / 1e6:.1f} M ({macs / dense_macs:.0%})",
                f"{runs[0]['params'] / 1e6:.2f} M",
                _accuracy([run.get(acc_key) for run in runs]),
                *(f"{ms:.2f}" for ms in times),
                *(f"{dense / ms:.1f}x" for ms, dense in zip(times, dense_times, strict=True)),
            ]
        )
    seeds = ", ".join(map(str, settings.seeds))
    out = [
        "## Speed at deployment: channels removed, int8 (ResNet-18, mnist5k, ONNX Runtime)",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']} (CPU), lightning "
        f"{env['lightning']}, onnxruntime {env['onnxruntime']}, Python {env['python']}",
        f"- Date: {results['date']}; wall time {results['minutes']:.1f} min; 1-min load average "
        f"{results['load'][0]:.2f} at start, {results['load'][1]:.2f} at end (the machine is "
        "shared: absolute times drift with its load, the side-by-side ratios much less)",
        "",
        "torchvision's ResNet-18 (`model=resnet18`: 3x3 stride-1 stem, no max-pool) on "
        f"`data=mnist5k` (1x28x28; 3500 train / 500 val / 1000 test images), seeds {seeds}. "
        f"*dense fp32*: `recipe=dense trainer.max_epochs={settings.epochs}`; *dense int8*: that "
        "model after `python -m lightning_sparse.oneshot recipe=ptq_int8`; *MACs removed*: "
        "`recipe=channel_qat` (channel removal in the first half epoch, then quantization-aware "
        "training to epoch "
        f"{summaries[configs[-1][1]][0].get('epochs')}) with `recipe.channel.final_sparsity` set "
        "to the "
        "share; its fp32 row is the same weights with fake quantization off (`model.onnx`). "
        "Accuracy: ONNX Runtime on the test split (1000 images: one image is 0.1 points), mean ± "
        "standard deviation over seeds. Latency: seed 0's ONNX files, timed side by side "
        f"(interleaved, median of {settings.latency_runs} calls) on mnist5k test images; "
        "speed-up against dense fp32 in the same measurement.",
        "",
        _table(header, rows),
        "",
    ]
    dense_acc = accuracy["dense fp32"]
    notes = []
    if dense_acc is not None:
        for label, value in accuracy.items():
            if "int8" in label and "removed" in label and value is not None:
                notes.append(f"{label}: {100 * (value - dense_acc):+.2f} points vs dense fp32")
    if notes:
        out += ["Accuracy against dense fp32 (mean): " + "; ".join(notes) + ".", ""]
    walls = [
        run["wall"]
        for ratio in settings.ratios
        for run in summaries[f"channel_{ratio:g}"]
        if run.get("wall")
    ]
    if walls:
        minutes = ", ".join(
            f"{w['seconds'] / 60:.1f} wall / {w.get('cpu_seconds', 0) / 60:.1f} CPU (load "
            f"{w['load'][0]:.1f}-{w['load'][1]:.1f})"
            for w in walls
        )
        out += [
            "Time of each `recipe=channel_qat model=resnet18 data=mnist5k` run (training, test, "
            f"export and report; minutes, with the 1-min load average): {minutes}. CPU time "
            "counts both threads: on an idle 2-core machine the run takes about half of it.",
            "",
        ]
    dense_int8 = [row["ms"]["dense int8"] / row["ms"]["dense fp32"] for row in results["latency"]]
    out.append(
        "int8 on ResNet-18 runs at "
        + ", ".join(f"{ratio:.2f}x" for ratio in dense_int8)
        + " of its fp32 latency (same order of columns): residual additions are quantized, so "
        "ONNX Runtime runs every convolution on its integer kernels (docs/decisions.md). "
        "Channel removal pays on its own, in fp32 and int8 alike."
    )
    return "\n".join(out)


UNTRAINED_MODELS = ("resnet18", "mobilenet_v3_small")


def _untrained_module(name: str, images: Any) -> Any:
    """A model of ``conf/model`` with random weights and BatchNorm statistics of ``images``."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from lightning_sparse import models
    from lightning_sparse.module import ClassificationModule

    torch.manual_seed(0)
    module = ClassificationModule(getattr(models, name)(num_classes=10, in_channels=1), 10)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                layer.momentum = None
        module.train()
        module(images)
    return module.eval()


def run_untrained(settings: Settings, command: str) -> dict[str, Any]:
    """Random-weight ResNet-18 and MobileNetV3-small, dense and with channels removed (one shot,
    l1), each PTQ-calibrated on mnist5k training images and exported by ``export_model``; every
    model's ONNX files are then timed side by side. No training: latency only."""
    import lightning
    import onnxruntime
    import torch

    from lightning_sparse.data import MNIST5kDataModule
    from lightning_sparse.deploy.export import export_model
    from lightning_sparse.posttrain.channel import OneShotChannelPruning
    from lightning_sparse.posttrain.ptq import ptq_calibrate

    torch.set_num_threads(1)
    start, load = time.time(), os.getloadavg()[0]
    data = MNIST5kDataModule(batch_size=64)
    data.setup("fit")
    train = [batch for _, batch in zip(range(4), data.train_dataloader(), strict=False)]
    test_images = torch.from_numpy(_test_batch(64))
    latency: dict[str, list[dict[str, Any]]] = {}
    macs: dict[str, dict[str, int]] = {}
    for name in UNTRAINED_MODELS:
        files: dict[str, Path] = {}
        macs[name] = {}
        for ratio in [0.0, *settings.ratios]:
            module = _untrained_module(name, train[0][0])
            label = "dense" if ratio == 0 else f"{ratio:.0%} of MACs removed"
            if ratio:
                step = OneShotChannelPruning(sparsity=ratio)
                step.check(module)
                step.apply(module, train[:1])
            ptq_calibrate(module, train)
            out = settings.runs / name / label.replace(" ", "_").replace("%", "pct")
            summary = export_model(module, test_images, out, batch_size=1, latency_runs=1)
            files[f"{label} fp32"] = Path(summary["onnx_fp32_path"])
            files[f"{label} int8"] = Path(summary["onnx_int8_path"])
            macs[name][label] = int(summary["macs"])
            _progress(f"{name} {label}: exported")
        latency[name] = measure_latency(files, settings)
    return {
        "settings": settings,
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": {
            "cpu": cpu_name(),
            "cores": os.cpu_count() or 1,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "latency": latency,
        "macs": macs,
        "minutes": (time.time() - start) / 60,
        "load": (load, os.getloadavg()[0]),
    }


def untrained_markdown(results: dict[str, Any]) -> str:
    """The section's markdown from :func:`run_untrained` results: latency and int8/fp32 ratios."""
    settings: Settings = results["settings"]
    env = results["environment"]
    out = [
        "## Speed at deployment: int8 and channels removed (ResNet-18, MobileNetV3-small, "
        "ONNX Runtime)",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']} (CPU), lightning "
        f"{env['lightning']}, onnxruntime {env['onnxruntime']}, Python {env['python']}",
        f"- Date: {results['date']}; wall time {results['minutes']:.1f} min; 1-min load average "
        f"{results['load'][0]:.2f} at start, {results['load'][1]:.2f} at end (the machine is "
        "shared: absolute times drift with its load, the side-by-side ratios much less)",
        "",
        "Latency only, **untrained** models (`--untrained`): torchvision's ResNet-18 and "
        "MobileNetV3-small as `model=resnet18` / `model=mobilenet_v3_small` build them (stride-1 "
        "stem) for mnist5k's 1x28x28 images, random weights (seed 0) with BatchNorm statistics "
        "of 64 training images; *MACs removed*: `OneShotChannelPruning` (l1) to that share of "
        "the MACs; *int8*: PTQ on 4 training batches, then `export_model` (residual Adds, SE "
        "Muls and Conv outputs calibrated on its first batch). Each model's ONNX files are timed "
        f"side by side (interleaved, median of {settings.latency_runs} calls) on mnist5k test "
        "images; ratios are against the same model's dense fp32 in the same measurement. "
        "Accuracy is not measured here (random weights); the trained runs of the full "
        "benchmark (`python scripts/benchmark_deploy.py`) were not made for this section.",
        "",
    ]
    for name, rows in results["latency"].items():
        labels = list(rows[0]["ms"])
        points = [(row["threads"], row["batch"]) for row in rows]
        header = [
            "model",
            "MACs",
            *(f"ms, batch {b}, {t} thr" for t, b in points),
            *(f"x dense fp32, batch {b}, {t} thr" for t, b in points),
        ]
        table = []
        dense_macs = results["macs"][name]["dense"]
        for label in labels:
            variant = label.rsplit(" ", 1)[0]
            count = results["macs"][name][variant]
            times = [row["ms"][label] for row in rows]
            base = [row["ms"]["dense fp32"] for row in rows]
            table.append(
                [
                    label,
                    f"{count / 1e6:.1f} M ({count / dense_macs:.0%})",
                    *(f"{ms:.2f}" for ms in times),
                    *(f"{ms / ref:.2f}" for ms, ref in zip(times, base, strict=True)),
                ]
            )
        out += [f"**{name}**", "", _table(header, table), ""]
    return "\n".join(out).rstrip() + "\n"


def write_section(path: Path, markdown: str, untrained: bool = False) -> None:
    """Replace the deploy block of ``path`` (or append it); leave the rest of the file as it is.

    ``untrained``: the ``deploy-untrained`` block instead.
    """
    if untrained:
        write_marked_block(
            path, f"<!-- {UNTRAINED}:start -->", f"<!-- {UNTRAINED}:end -->", markdown
        )
    else:
        write_marked_block(path, BEGIN, END, markdown)


def settings_from(args: argparse.Namespace) -> Settings:
    """Full or ``--quick`` settings."""
    if args.quick:
        return Settings(
            seeds=[0],
            epochs=1,
            ratios=[0.5],
            runs=args.runs,
            latency_runs=3,
            threads=[1],
            extra=["trainer.limit_train_batches=4", "trainer.limit_val_batches=1"],
            channel_extra=[
                "trainer.max_epochs=1",
                "recipe.channel.start_epoch=0.25",
                "recipe.channel.end_epoch=0.5",
                "recipe.channel.update_frequency=0.25",
                "recipe.quantization.disable_quantization_observer_epoch=0.75",
            ],
        )
    return Settings(
        seeds=list(args.seeds),
        epochs=args.epochs,
        ratios=list(args.ratios),
        runs=args.runs,
        latency_runs=args.latency_runs,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write its section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmark_deploy"))
    parser.add_argument("--quick", action="store_true", help="smoke run; numbers meaningless")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs of the dense model (channel_qat's)"
    )
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="latency only: random-weight ResNet-18 and MobileNetV3-small, no training runs",
    )
    args = parser.parse_args(argv)
    command = "python " + shlex.join(["scripts/benchmark_deploy.py", *sys.argv[1:]])
    if args.untrained:
        results = run_untrained(settings_from(args), command)
        markdown = untrained_markdown(results)
    else:
        results = run(settings_from(args), command)
        markdown = deploy_markdown(results)
    write_section(args.output, markdown, untrained=args.untrained)
    print(markdown)


if __name__ == "__main__":
    main()
