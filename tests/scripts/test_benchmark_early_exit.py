"""``scripts/benchmark_early_exit.py``: a smoke run end to end (slow) and its section writer."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_early_exit.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script as a module (it is a file to run, not part of the package)."""
    name = "benchmark_early_exit_script"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def test_the_section_is_replaced_and_the_rest_kept(bench: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# Benchmarks\n\nbefore\n{bench.BEGIN}\nold\n{bench.END}\nafter\n")
    bench.write_section(f"{bench.BEGIN}\nnew\n{bench.END}", path)
    assert path.read_text() == f"# Benchmarks\n\nbefore\n{bench.BEGIN}\nnew\n{bench.END}\nafter\n"


@pytest.mark.slow
def test_quick_run_writes_both_tables(bench: ModuleType, tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    bench.main(["--quick", "--output", str(output)])
    text = output.read_text()
    assert "| plain model |" in text
    assert "calibrated, drop <= 0.5 pt" in text
    assert "| sparsity_reg, group lasso 0.0001 | 50% |" in text
