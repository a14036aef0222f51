"""``scripts/benchmark_quant.py``: its section writer and its markdown; no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_quant.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script as a module (it is a file to run, not part of the package)."""
    name = "benchmark_quant_script"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def test_the_section_is_replaced_and_the_rest_kept_byte_for_byte(
    bench: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "benchmarks.md"
    before = (
        "# Benchmarks\n\n<!-- benchmark:accuracy -->\nother table\n<!-- /benchmark:accuracy -->\n"
    )
    path.write_text(before)
    bench.write_section(path, "first")
    assert path.read_text() == before + "\n<!-- quant:start -->\nfirst\n<!-- quant:end -->\n"
    path.write_text(path.read_text() + "\ntrailing text\n")
    bench.write_section(path, "second")
    assert path.read_text() == (
        before + "\n<!-- quant:start -->\nsecond\n<!-- quant:end -->\n\ntrailing text\n"
    )


def test_markdown_reports_every_measurement_and_target(bench: ModuleType) -> None:
    settings = bench.Settings(
        seeds=[0, 1],
        epochs=30,
        qat_overrides=[],
        gmp_qat_overrides=[],
        latency_runs=9,
        latency_threads=[1],
    )
    accuracy = [
        {"seed": s, "fp32": 0.97, "ptq_w8": 0.97, "qat_w8": 0.972, "ptq_w4": 0.9, "qat_w4": 0.96}
        for s in (0, 1)
    ]
    results = {
        "settings": settings,
        "command": "python scripts/benchmark_quant.py",
        "date": "2026-01-01 00:00 UTC",
        "minutes": 1.0,
        "load": (1.0, 2.0),
        "environment": {
            "cpu": "CPU",
            "cores": 2,
            "int8_flags": ["avx512_vnni"],
            "torch": "t",
            "onnx": "o",
            "onnxruntime": "r",
            "lightning": "l",
            "python": "p",
            "torch_threads": 1,
        },
        "accuracy": accuracy,
        "size": {
            "sparsity": 0.95,
            "dense_bytes": 605224,
            "compressed_bytes": 29000,
            "compression_ratio": 605224 / 29000,
            "onnx_int8_acc": 0.95,
        },
        "latency": [
            {
                "model": "m",
                "params": 10,
                "threads": 1,
                "fp32_ms": 10.0,
                "int8_ms": 3.0,
                "agreement": 1.0,
            },
        ],
    }
    text = bench.quant_markdown(results)
    assert "int8 instructions in /proc/cpuinfo: avx512_vnni" in text
    assert "| **mean** | 97.00 | 97.00 | 97.20 | 90.00 | 96.00 |" in text
    assert "QAT at least as good as PTQ: 97.20 vs 97.00 (met)" in text
    assert "| SmallCNN (digits) | 0.9500 | 605,224 | 29,000 | 20.87x | 95.00 |" in text
    assert "Target >= 20x: met" in text
    assert "| m | 10 | 1 | 10.00 | 3.00 | 0.30 | 100.0% |" in text
    assert "Target int8 / fp32 <= 0.6: met (worst 0.30)" in text
