"""``scripts/benchmark_stages.py``: a smoke run of its tables, and a writer that touches only them.

Nothing here asserts an accuracy or a time: those live in docs/benchmarks.md, made by the script.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_stages.py"


@pytest.fixture(scope="module")
def stages() -> Iterator[ModuleType]:
    """The script as a module (it is a file to run, not part of the package)."""
    name = "benchmark_stages_script"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def test_writer_replaces_its_own_section_and_keeps_the_rest(
    stages: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "benchmarks.md"
    others = "# Benchmarks\n\n<!-- benchmark:accuracy -->\nkeep me\n<!-- /benchmark:accuracy -->\n"
    path.write_text(others)
    first = f"{stages.START}\nfirst\n{stages.END}"
    stages.write_section(path, first)
    assert path.read_text() == others + "\n" + first + "\n"
    second = f"{stages.START}\nsecond\n{stages.END}"
    path.write_text(path.read_text() + "\ntrailing text\n")
    stages.write_section(path, second)
    text = path.read_text()
    assert text.startswith(others)
    assert "first" not in text
    assert text.count(stages.START) == 1
    assert text.endswith(f"{second}\n\ntrailing text\n")
    fresh = tmp_path / "new" / "benchmarks.md"
    stages.write_section(fresh, first)
    assert fresh.read_text() == f"# Benchmarks\n\n{first}\n"


@pytest.mark.slow
def test_quick_run_fills_both_tables(stages: ModuleType) -> None:
    section = stages.run_stages_benchmark(stages.QUICK, command="quick")
    assert section.startswith(stages.START)
    assert section.endswith(stages.END)
    assert "- Command: `quick`" in section
    assert "- Machine: " in section
    assert "| 0.70 | layer |" in section  # the one-shot table's row
    assert "| GMP 0.90 source, transferred | 0.9000 |" in section
    # The sparse backbone kept every zero through the transfer.
    row = next(line for line in section.splitlines() if line.startswith("| GMP 0.90 source"))
    assert row.split("|")[4].strip() == "0.9000"
    assert row.split("|")[5].strip() == "0"
    assert "nan" not in section
