"""``scripts/benchmark_low_rank.py``: its table and section, from made-up rows (no training)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from lightning_sparse.run.markdown import write_marked_block

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_low_rank.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("benchmark_low_rank_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_section_reports_ratios_and_whether_the_target_is_met(
    bench: ModuleType, tmp_path: Path
) -> None:
    def row(seed: int, low_rank_acc: float) -> object:
        return bench.Row(
            model="mlp",
            data="digits",
            seed=seed,
            dense_acc=0.95,
            low_rank_acc=low_rank_acc,
            macs_dense=84_480,
            macs=40_448,
            params_dense=83_466,
            params=40_330,
            ranks={"model.fc1": 16, "model.fc2": 64},
            latency_ms={
                "1": {"dense": 0.02, "low_rank": 0.01},
                "64": {"dense": 0.2, "low_rank": 0.1},
            },
        )

    args = bench.parse(["--quick", "--output", str(tmp_path / "b.md")])
    args.factorize_at = 1.0
    text = bench.render([row(0, 0.95), row(1, 0.94)], args, {"torch": "x"})
    assert "| mlp / digits | 0 | 95.00% | 95.00% | +0.00 | 84,480 -> 40,448 | 2.09x" in text
    assert "| 2.00x | 2.00x | fc1 16, fc2 64 |" in text
    # mean drop 0.5 pt at 2.09x: met
    assert text.splitlines()[-1].endswith("| yes |")
    write_marked_block(tmp_path / "b.md", bench.BEGIN, bench.END, text)
    written = (tmp_path / "b.md").read_text()
    assert bench.BEGIN in written
    assert "--quick" in written
