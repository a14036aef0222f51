"""``scripts/benchmark_transformers.py``: its section writer and markdown; no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_transformers.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script as a module (it is a file to run, not part of the package)."""
    name = "benchmark_transformers_script"
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
    before = "# Benchmarks\n\n<!-- quant:start -->\nother\n<!-- quant:end -->\n"
    path.write_text(before)
    bench.write_section(path, "first")
    assert (
        path.read_text()
        == before + "\n<!-- transformers:start -->\nfirst\n<!-- transformers:end -->\n"
    )
    bench.write_section(path, "second")
    assert (
        path.read_text()
        == before + "\n<!-- transformers:start -->\nsecond\n<!-- transformers:end -->\n"
    )


def test_markdown_reports_accuracies_gap_and_latency_ratio(bench: ModuleType) -> None:
    settings = bench.Settings()
    results = {
        "settings": settings,
        "command": "python scripts/benchmark_transformers.py",
        "date": "2026-12-01 00:00 UTC",
        "environment": {
            "cpu": "CPU", "cores": 2, "int8_flags": ["avx2"], "torch": "2", "onnxruntime": "1",
            "transformers": "5", "lightning": "2", "python": "3.11",
        },
        "summary": {
            "dense_test_acc": 0.95, "onnx_fp32_acc": 0.94, "onnx_int8_acc": 0.938,
            "test_acc": 0.94, "onnx_int8_agreement": 0.99, "sparsity": 0.8,
        },
        "latency": {"fp32": 40.0, "int8": 20.0},
        "minutes": 10.0,
        "load": (1.0, 1.0),
    }  # fmt: skip
    text = bench.transformers_markdown(results)
    assert "model=bert_tiny data=synthetic_text" in text
    assert "| dense | PyTorch | 95.00 |" in text
    assert "| 80% sparse, int8 | ONNX Runtime (`model_int8.onnx`) | 93.80 |" in text
    assert "-0.20 points (target within 0.5: met)" in text
    assert "| 40.00 | 20.00 | 0.50 |" in text
    assert "batch 32, sequence 128, 1 thread" in text
