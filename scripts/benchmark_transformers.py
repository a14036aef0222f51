"""Measure the transformer workload; write the ``transformers`` section of docs/benchmarks.md.

One run of the main recipe on ``model=bert_tiny data=synthetic_text`` through the app's own job
(``lightning_sparse.run.training.run``), every number from that run:

- **Accuracy** on the test split (per token, padding excluded): the dense model (``baseline=train``:
  a dense model trained in the same job with the same settings and seed), the 80% sparse model in
  float (``model.onnx`` in ONNX Runtime) and in int8 (``model_int8.onnx``), and PyTorch's
  fake-quantized model (what int8 must match within 0.5 points).
- **Latency**: both exported models in ONNX Runtime at batch 32, sequence 128 (all positions
  attended), one intra-op thread, interleaved calls, medians.

Training and ONNX Runtime use one thread each (``torch.set_num_threads(1)``); run it alone.

Run from the repository root::

    python scripts/benchmark_transformers.py                  # ~15 min on 2 CPU cores
    python scripts/benchmark_transformers.py --quick --output /tmp/b.md   # smoke run

Only the block between ``<!-- transformers:start -->`` and ``<!-- transformers:end -->`` is
replaced (appended if missing); the rest of the file is kept byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig

from lightning_sparse.deploy import ort
from lightning_sparse.run.markdown import write_marked_block
from lightning_sparse.run.recipe import compose_config
from lightning_sparse.run.training import run as run_job

BEGIN, END = "<!-- transformers:start -->", "<!-- transformers:end -->"
DEFAULT_OUTPUT = Path("docs/benchmarks.md")
INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
LATENCY_BATCH, LATENCY_SEQUENCE = 32, 128


@dataclass
class Settings:
    """What one invocation measures."""

    model: str = "bert_tiny"
    epochs: int = 30
    prune_start: float = 10.0
    prune_end: float = 20.0
    seq_length: int = 128
    train_size: int = 1024
    sparsity: float = 0.8
    latency_runs: int = 100
    extra: list[str] = field(default_factory=list)

    def overrides(self) -> list[str]:
        """The job's command line."""
        return [
            f"model={self.model}",
            "data=synthetic_text",
            f"data.seq_length={self.seq_length}",
            f"data.train_size={self.train_size}",
            "recipe=gmp_qat_distill",
            f"recipe.pruning.final_sparsity={self.sparsity}",
            f"recipe.pruning.start_epoch={self.prune_start}",
            f"recipe.pruning.end_epoch={self.prune_end}",
            f"trainer.max_epochs={self.epochs}",
            "baseline=train",
            *self.extra,
        ]


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


def latency(export_dir: Path, runs: int, vocab_size: int) -> dict[str, float]:
    """Median ms of ``model.onnx`` and ``model_int8.onnx`` at batch 32, sequence 128, 1 thread."""
    generator = np.random.default_rng(0)
    shape = (LATENCY_BATCH, LATENCY_SEQUENCE)
    inputs = {
        "input_ids": generator.integers(1, vocab_size, shape, dtype=np.int64),
        "attention_mask": np.ones(shape, dtype=np.int64),
    }
    sessions = {
        "fp32": ort.OrtModel(export_dir / "model.onnx", threads=1),
        "int8": ort.OrtModel(export_dir / "model_int8.onnx", threads=1),
    }
    return ort.interleaved_latency_ms(sessions, inputs, runs=runs)


def run(settings: Settings, command: str) -> dict[str, Any]:
    """The job, its latency, and the environment it ran in."""
    cpu, flags = cpu_description()
    start, load_start = time.time(), os.getloadavg()[0]
    versions = ort.versions()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(
            [
                *settings.overrides(),
                "logger=csv",
                "trainer.enable_progress_bar=false",
                f"output_dir='{tmp}'",
            ],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
        try:
            summary = run_job(cfg)
        finally:
            HydraConfig.instance().cfg = None  # type: ignore[assignment]
        timing = latency(Path(tmp) / "export", settings.latency_runs, int(cfg.data.vocab_size))
    import transformers

    return {
        "settings": settings,
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": {
            "cpu": cpu,
            "cores": os.cpu_count() or 1,
            "int8_flags": flags,
            "torch": versions["torch"],
            "onnxruntime": versions["onnxruntime"],
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },
        "summary": summary,
        "latency": timing,
        "minutes": (time.time() - start) / 60,
        "load": (load_start, os.getloadavg()[0]),
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def transformers_markdown(results: dict[str, Any]) -> str:
    """The section: command, machine, date, then accuracy and latency tables."""
    settings: Settings = results["settings"]
    env = results["environment"]
    summary = results["summary"]
    timing = results["latency"]
    # + 0.0 turns a rounded -0.00 into 0.00
    int8_gap = round(100 * (summary["onnx_int8_acc"] - summary["test_acc"]), 2) + 0.0
    ratio = timing["int8"] / timing["fp32"]
    lines = [
        f"## Transformers: `model={settings.model} data=synthetic_text`, "
        f"{settings.sparsity:.0%} sparse and int8",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {env['cpu']}, {env['cores']} cores; int8 instructions in /proc/cpuinfo: "
        f"{', '.join(env['int8_flags']) or 'none'}; torch {env['torch']}, transformers "
        f"{env['transformers']}, lightning {env['lightning']}, onnxruntime {env['onnxruntime']}, "
        f"Python {env['python']}; one thread for training and for ONNX Runtime",
        f"- Date: {results['date']}; wall time {results['minutes']:.1f} min; 1-min load average "
        f"{results['load'][0]:.2f} at start, {results['load'][1]:.2f} at end",
        "",
        f"One job: `python -m lightning_sparse.train {' '.join(settings.overrides())}`. "
        f"Sequences of {settings.seq_length // 2}-{settings.seq_length} tokens "
        f"({settings.train_size} for training), labels per token (padding excluded). The main "
        f"recipe: dense to epoch {settings.prune_start:g}, pruning of every encoder Linear and "
        f"the head to {settings.sparsity:.0%} (cubic, epochs {settings.prune_start:g}-"
        f"{settings.prune_end:g}) with the dense self as teacher, then int8 QAT to epoch "
        f"{settings.epochs}. *dense*: `baseline=train`, a dense model trained in the same job "
        "with the same settings and seed; *fp32*: the final weights without quantization; "
        "*fake-quantized*: what `model_int8.onnx` must reproduce. Embeddings and attention "
        "products stay float.",
        "",
        "| model | runs in | test accuracy % |",
        "| :--- | :--- | ---: |",
        f"| dense | PyTorch | {_pct(summary.get('dense_test_acc'))} |",
        f"| {settings.sparsity:.0%} sparse, fp32 | ONNX Runtime (`model.onnx`) | "
        f"{_pct(summary['onnx_fp32_acc'])} |",
        f"| {settings.sparsity:.0%} sparse, int8 | ONNX Runtime (`model_int8.onnx`) | "
        f"{_pct(summary['onnx_int8_acc'])} |",
        f"| {settings.sparsity:.0%} sparse, fake-quantized | PyTorch | "
        f"{_pct(summary['test_acc'])} |",
        "",
        f"int8 in ONNX Runtime vs PyTorch's fake-quantized model: {int8_gap:+.2f} points "
        f"(target within 0.5: {'met' if abs(int8_gap) <= 0.5 else 'NOT met'}); top-1 agreement "
        f"{_pct(summary['onnx_int8_agreement'])}%. Measured sparsity {summary['sparsity']:.4f}.",
        "",
        f"Latency, ONNX Runtime CPU, batch {LATENCY_BATCH}, sequence {LATENCY_SEQUENCE}, 1 thread, "
        f"median of {settings.latency_runs} interleaved runs (the projections run as "
        "MatMulIntegerToFloat in int8; attention products and embeddings stay float):",
        "",
        "| fp32 ms | int8 ms | int8 / fp32 |",
        "| ---: | ---: | ---: |",
        f"| {timing['fp32']:.2f} | {timing['int8']:.2f} | {ratio:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, markdown: str) -> None:
    """Replace the block of ``path`` (or append it); leave the rest of the file as it is."""
    write_marked_block(path, BEGIN, END, markdown)


def settings_from(args: argparse.Namespace) -> Settings:
    """Full or ``--quick`` settings."""
    if args.quick:
        return Settings(
            model=args.model,
            epochs=3,
            prune_start=0.5,
            prune_end=1.0,
            seq_length=16,
            train_size=128,
            latency_runs=3,
            extra=["data.val_size=32", "data.test_size=32"],
        )
    return Settings(model=args.model, latency_runs=args.latency_runs)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write its section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--quick", action="store_true", help="smoke run; numbers meaningless")
    parser.add_argument("--model", default="bert_tiny", choices=["bert_tiny", "gpt2_tiny"])
    parser.add_argument("--latency-runs", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    command = "python " + shlex.join(["scripts/benchmark_transformers.py", *sys.argv[1:]])
    results = run(settings_from(args), command)
    markdown = transformers_markdown(results)
    write_section(args.output, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
