"""Measure quantization end to end; write the ``quant`` section of docs/benchmarks.md.

Three measurements, every number from the run that writes it:

- **Accuracy**: on scikit-learn digits with the default ``SmallCNN``, per seed: a float model
  trained ``--epochs`` epochs, then post-training quantized (``ptq``, 16 calibration batches); and
  the same seed trained with the shipped ``recipe=qat``. Both exported and evaluated by ONNX
  Runtime (``model.onnx`` and ``model_int8.onnx``) on the test split.
- **Size**: ``recipe=gmp_qat`` with ``final_sparsity=0.95``; ``compressed.safetensors`` against the
  dense fp32 ``state_dict``.
- **Speed**: ONNX Runtime int8 against fp32 at batch 64 on models large enough for int8 kernels to
  matter (weights calibrated by ``ptq`` on synthetic data: latency does not depend on training),
  timed side by side (interleaved calls, medians), with 1 thread and with all cores.

Run from the repository root::

    python scripts/benchmark_quant.py                         # ~5-10 min on 2 CPU cores
    python scripts/benchmark_quant.py --quick --output /tmp/b.md   # smoke run, numbers meaningless

Only the block between ``<!-- quant:start -->`` and ``<!-- quant:end -->`` is replaced (appended if
missing); the rest of the file is kept byte for byte.
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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch

from lightning_sparse.callbacks import MagnitudePruning, QuantizationAwareTraining
from lightning_sparse.data import DigitsDataModule, SyntheticDataModule
from lightning_sparse.deploy import ort as quant_backend
from lightning_sparse.deploy.export import export_model
from lightning_sparse.models import MLP, SmallCNN
from lightning_sparse.module import ClassificationModule
from lightning_sparse.posttrain.ptq import ptq
from lightning_sparse.run.markdown import write_marked_block
from lightning_sparse.run.recipe import load

BEGIN, END = "<!-- quant:start -->", "<!-- quant:end -->"
DEFAULT_OUTPUT = Path("docs/benchmarks.md")
INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
CALIBRATION_BATCHES = 16
LR = 1e-3  # conf/model/cnn.yaml's


@dataclass
class Settings:
    """What one invocation measures."""

    seeds: list[int]
    epochs: int
    qat_overrides: list[str]
    gmp_qat_overrides: list[str]
    latency_runs: int
    latency_threads: list[int | None]
    qat_schedule: str = ""
    gmp_qat_schedule: str = ""


def cpu_description() -> tuple[str, list[str]]:
    """CPU model name and which of its flags are int8 dot-product instructions."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, [flag for flag in INT8_FLAGS if flag in flags]


def _trainer(max_epochs: int, callbacks: Sequence[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        deterministic=True,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _train(seed: int, epochs: int, callbacks: Sequence[pl.Callback]) -> ClassificationModule:
    pl.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(seed=seed)
    module = ClassificationModule(SmallCNN(), num_classes=10, lr=LR)
    _trainer(epochs, callbacks).fit(module, datamodule)
    return module


def _export(module: ClassificationModule, datamodule: pl.LightningDataModule, **kw: Any) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return export_model(module, datamodule, Path(tmp) / "export", **kw)


def run_accuracy(settings: Settings) -> list[dict[str, Any]]:
    """Per seed: a float model (fp32), PTQ of it and QAT from the same start, each with 8-bit and
    4-bit weights; every accuracy measured by ONNX Runtime."""
    rows = []
    for seed in settings.seeds:
        datamodule = DigitsDataModule(seed=seed)
        trained = _train(seed, settings.epochs, [])
        state = {key: value.clone() for key, value in trained.state_dict().items()}
        row: dict[str, Any] = {"seed": seed}
        for bits in (8, 4):
            model = ClassificationModule(SmallCNN(), num_classes=10, lr=LR)
            model.load_state_dict(state)
            ptq(model, datamodule, num_batches=CALIBRATION_BATCHES, num_bits=bits)
            summary = _export(model, datamodule, latency_runs=5)
            row["fp32"] = summary["onnx_fp32_acc"]
            row[f"ptq_w{bits}"] = summary["onnx_int8_acc"]
            overrides = [
                f"trainer.max_epochs={settings.epochs}",
                f"recipe.quantization.num_bits={bits}",
                *settings.qat_overrides,
            ]
            callbacks = load("qat", overrides)
            settings.qat_schedule = _describe(callbacks)
            summary = _export(_train(seed, settings.epochs, callbacks), datamodule, latency_runs=5)
            row[f"qat_w{bits}"] = summary["onnx_int8_acc"]
        rows.append(row)
        _progress(f"accuracy seed {seed}: {row}")
    return rows


def run_size(settings: Settings) -> dict[str, Any]:
    """A 95%-sparse int8 SmallCNN (gmp_qat) against the dense fp32 state_dict."""
    seed = settings.seeds[0]
    callbacks = load(
        "gmp_qat",
        [
            f"trainer.max_epochs={settings.epochs}",
            "recipe.pruning.final_sparsity=0.95",
            *settings.gmp_qat_overrides,
        ],
    )
    settings.gmp_qat_schedule = _describe(callbacks)
    module = _train(seed, settings.epochs, callbacks)
    weights = [p for n, p in module.named_parameters() if n.endswith("weight")]
    zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    summary = _export(module, DigitsDataModule(seed=seed), latency_runs=5)
    summary["sparsity"] = zeros
    _progress(f"size: {summary['compression_ratio']:.2f}x")
    return summary


def latency_models() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    """Models where int8 kernels have work to do, with their input shapes."""
    return {
        "SmallCNN(width=64), 3x32x32 input": (
            SmallCNN(in_channels=3, num_classes=10, width=64, input_size=32),
            (3, 32, 32),
        ),
        "MLP 3072-2048-2048-10": (MLP(input_dim=[3, 32, 32], hidden=[2048, 2048]), (3, 32, 32)),
    }


def run_latency(settings: Settings) -> list[dict[str, Any]]:
    """ORT fp32 vs int8 latency at batch 64, side by side, per model and thread count."""
    rows = []
    for name, (backbone, shape) in latency_models().items():
        pl.seed_everything(0, verbose=False)
        datamodule = SyntheticDataModule(
            num_classes=10, input_shape=shape, train_size=256, val_size=64, test_size=128
        )
        module = ClassificationModule(backbone, num_classes=10)
        ptq(module, datamodule, num_batches=4)
        for threads in settings.latency_threads:
            summary = _export(
                module,
                datamodule,
                batch_size=64,
                latency_runs=settings.latency_runs,
                threads=threads,
            )
            rows.append(
                {
                    "model": name,
                    "params": sum(p.numel() for p in backbone.parameters()),
                    "threads": threads,
                    "fp32_ms": summary["ort_fp32_ms"],
                    "int8_ms": summary["ort_int8_ms"],
                    "agreement": summary["onnx_int8_agreement"],
                }
            )
            _progress(f"latency {name}, threads {threads}: {rows[-1]}")
    return rows


def _describe(callbacks: Sequence[pl.Callback]) -> str:
    """The schedules of a built recipe, in words (so the text follows the recipe)."""
    parts = []
    for callback in callbacks:
        if isinstance(callback, MagnitudePruning):
            parts.append(
                f"pruning to {callback.final_sparsity:g} ({callback.inter_func}, epochs "
                f"{callback.start_epoch:g}-{callback.end_epoch:g})"
            )
        if isinstance(callback, QuantizationAwareTraining):
            frozen = callback.disable_quantization_observer_epoch
            parts.append(
                f"fake quantization from epoch {callback.start_epoch:g}"
                + (f", scales frozen from epoch {frozen:g}" if frozen is not None else "")
            )
    return "; ".join(parts)


def _progress(message: str) -> None:
    print(f"[benchmark_quant] {message}", file=sys.stderr, flush=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| :--- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def quant_markdown(results: dict[str, Any]) -> str:
    """The section's markdown from :func:`run` results (every number comes from them)."""
    env = results["environment"]
    settings: Settings = results["settings"]
    out = [
        "## Quantization: ONNX Runtime int8 vs fp32, compressed size (lightning_sparse.export)",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {env['cpu']}, {env['cores']} cores; int8 instructions in /proc/cpuinfo: "
        f"{', '.join(env['int8_flags']) or 'none of ' + ', '.join(INT8_FLAGS)}; "
        f"torch {env['torch']} (CPU), lightning {env['lightning']}, onnx {env['onnx']}, "
        f"onnxruntime {env['onnxruntime']}, Python {env['python']}; torch threads "
        f"{env['torch_threads']}",
        f"- Date: {results['date']}; wall time {results['minutes']:.1f} min; 1-min load average "
        f"{results['load'][0]:.2f} at start, {results['load'][1]:.2f} at end (the machine is "
        "shared)",
        "",
        "### Accuracy (digits test split, 360 images: one image is 0.28 points)",
        "",
        f"`SmallCNN` in `ClassificationModule` (Adam lr {LR:g}), batch 64, {settings.epochs} "
        f"epochs, seeds {', '.join(map(str, settings.seeds))}. *fp32*: the float model through "
        f"`model.onnx`; *PTQ*: the same weights calibrated by `ptq` on "
        f"{CALIBRATION_BATCHES} training batches, through `model_int8.onnx`; *QAT*: the same "
        "seed trained with "
        f"`{' '.join(['recipe=qat', *settings.qat_overrides])}` ({settings.qat_schedule}), "
        "through `model_int8.onnx`. "
        "Deltas are against the fp32 model of the same seed.",
        "",
    ]
    rows = results["accuracy"]
    keys = ("fp32", "ptq_w8", "qat_w8", "ptq_w4", "qat_w4")
    table = [[str(row["seed"]), *(_pct(row[key]) for key in keys)] for row in rows]
    mean = {key: statistics.mean(row[key] for row in rows) for key in keys}
    delta = {key: 100 * (mean[key] - mean["fp32"]) for key in keys}
    table.append(["**mean**", *(_pct(mean[key]) for key in keys)])
    table.append(["**mean - fp32**", "", *(f"{delta[key]:+.2f}" for key in keys[1:])])
    header = [
        "seed",
        "fp32",
        "PTQ int8",
        "QAT int8",
        "PTQ, 4-bit weights",
        "QAT, 4-bit weights",
    ]
    out += ["Test accuracy %, every column run by ONNX Runtime:", "", _table(header, table), ""]
    out.append(
        f"Targets (int8, i.e. 8-bit weights): within 0.5 points of fp32 (mean): PTQ "
        f"{delta['ptq_w8']:+.2f} ({_verdict(abs(delta['ptq_w8']) <= 0.5)}), QAT "
        f"{delta['qat_w8']:+.2f} ({_verdict(abs(delta['qat_w8']) <= 0.5)}); QAT at least as good "
        f"as PTQ: {_pct(mean['qat_w8'])} vs {_pct(mean['ptq_w8'])} "
        f"({_verdict(mean['qat_w8'] >= mean['ptq_w8'])}). The 4-bit columns (inputs stay 8-bit) "
        "are the harder case, where rounding has more to cost and QAT more to recover."
    )
    size = results["size"]
    out += [
        "",
        "### Size",
        "",
        f"`recipe=gmp_qat` with `recipe.pruning.final_sparsity=0.95` (seed {settings.seeds[0]}, "
        f"{settings.epochs} epochs; {settings.gmp_qat_schedule}), every Conv/Linear weight. "
        "`compressed.safetensors` stores each weight as a bitmask "
        "plus its int8 non-zeros and a float32 scale per output channel; biases stay float32.",
        "",
        _table(
            [
                "model",
                "weight sparsity",
                "dense fp32 state_dict (B)",
                "compressed.safetensors (B)",
                "ratio",
                "ORT int8 acc %",
            ],
            [
                [
                    "SmallCNN (digits)",
                    f"{size['sparsity']:.4f}",
                    f"{size['dense_bytes']:,}",
                    f"{size['compressed_bytes']:,}",
                    f"{size['compression_ratio']:.2f}x",
                    _pct(size["onnx_int8_acc"]),
                ]
            ],
        ),
        "",
        f"Target >= 20x: {_verdict(size['compression_ratio'] >= 20)}. A bitmask costs 1 bit per "
        "weight whatever the sparsity (1/32 of fp32), which with int8 values bounds the ratio near "
        "23x at 95%; coding the positions (e.g. gaps between non-zeros) could roughly double it.",
        "",
        "### Speed (ONNX Runtime, CPU execution provider, batch 64)",
        "",
        "Weights calibrated by `ptq` on synthetic data (latency does not depend on what was "
        f"learned); median of {settings.latency_runs} runs per model after a warm-up, fp32 and "
        "int8 calls interleaved so that load from other processes hits both alike. ONNX Runtime "
        "runs `model_int8.onnx` as QLinearConv/QGemm (u8 inputs, s8 weights). *agreement*: top-1 "
        "agreement of ORT int8 with PyTorch's fake-quantized model on the synthetic test split.",
        "",
    ]
    speed_rows = [
        [
            row["model"],
            f"{row['params']:,}",
            str(row["threads"] or f"all ({env['cores']})"),
            f"{row['fp32_ms']:.2f}",
            f"{row['int8_ms']:.2f}",
            f"{row['int8_ms'] / row['fp32_ms']:.2f}",
            f"{100 * row['agreement']:.1f}%",
        ]
        for row in results["latency"]
    ]
    out.append(
        _table(
            ["model", "params", "threads", "fp32 ms", "int8 ms", "int8 / fp32", "agreement"],
            speed_rows,
        )
    )
    worst = max(row["int8_ms"] / row["fp32_ms"] for row in results["latency"])
    out += ["", f"Target int8 / fp32 <= 0.6: {_verdict(worst <= 0.6)} (worst {worst:.2f})."]
    return "\n".join(out)


def run(settings: Settings, command: str) -> dict[str, Any]:
    """Every measurement, with the environment it ran in."""
    cpu, flags = cpu_description()
    start, load_start = time.time(), os.getloadavg()[0]
    versions = quant_backend.versions()
    results: dict[str, Any] = {
        "settings": settings,
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": {
            "cpu": cpu,
            "cores": os.cpu_count() or 1,
            "int8_flags": flags,
            "torch": versions["torch"],
            "onnx": versions["onnx"],
            "onnxruntime": versions["onnxruntime"],
            "lightning": lightning.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    results["accuracy"] = run_accuracy(settings)
    results["size"] = run_size(settings)
    results["latency"] = run_latency(settings)
    results["minutes"] = (time.time() - start) / 60
    results["load"] = (load_start, os.getloadavg()[0])
    return results


def write_section(path: Path, markdown: str) -> None:
    """Replace the quant block of ``path`` (or append it); leave the rest of the file as it is."""
    write_marked_block(path, BEGIN, END, markdown)


def settings_from(args: argparse.Namespace) -> Settings:
    """Full or ``--quick`` settings."""
    if args.quick:
        return Settings(
            seeds=[0],
            epochs=3,
            qat_overrides=[
                "recipe.quantization.start_epoch=1",
                "recipe.quantization.freeze_bn_stats_epoch=2",
                "recipe.quantization.disable_quantization_observer_epoch=2",
            ],
            gmp_qat_overrides=[
                "recipe.pruning.start_epoch=0",
                "recipe.pruning.end_epoch=1",
                "recipe.quantization.disable_quantization_observer_epoch=2",
            ],
            latency_runs=3,
            latency_threads=[1],
        )
    return Settings(
        seeds=list(args.seeds),
        epochs=30,
        qat_overrides=[],
        gmp_qat_overrides=[],
        latency_runs=args.latency_runs,
        latency_threads=[1, None],
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write its section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--quick", action="store_true", help="smoke run; numbers meaningless")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--latency-runs", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # training and PyTorch references; ORT threads are set per session
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    command = "python " + shlex.join(["scripts/benchmark_quant.py", *sys.argv[1:]])
    results = run(settings_from(args), command)
    markdown = quant_markdown(results)
    write_section(args.output, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
