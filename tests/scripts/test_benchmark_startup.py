"""``scripts/benchmark_startup.py``: its parsing, its writer, and a smoke run of the start-up rows.

Nothing here asserts a time: those live in docs/benchmarks.md, made by the script.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_startup.py"


@pytest.fixture(scope="module")
def startup() -> Iterator[ModuleType]:
    name = "benchmark_startup_script"
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


def test_import_time_is_read_from_importtime_output(startup: ModuleType) -> None:
    stderr = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       234 |    4131838 |         lightning\n"
        "import time:      1701 |    4266120 | lightning_sparse\n"
    )
    assert startup.import_seconds(stderr, "lightning_sparse") == pytest.approx(4.26612)
    assert startup.import_seconds(stderr, "lightning") == pytest.approx(4.131838)
    assert startup.import_seconds(stderr, "torch") != startup.import_seconds(stderr, "torch")


def test_writer_replaces_its_own_section_and_keeps_the_rest(
    startup: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n<!-- stages:start -->\nkeep me\n<!-- stages:end -->\n")
    startup.write_section(path, "startup", "first")
    startup.write_section(path, "startup", "second")
    text = path.read_text()
    assert "keep me" in text
    assert "second" in text
    assert "first" not in text
    assert text.count("<!-- startup:start -->") == 1


def test_the_startup_rows_of_this_checkout(startup: ModuleType) -> None:
    rows = startup.startup_rows(startup.REPO, "this checkout", repeats=1)
    assert [row[1] for row in rows][:3] == [
        "train --help",
        "train recipe.pruning.final_sparsty=0.9 (a typo)",
        "compare <empty folder>",
    ]
    assert rows[3][2].endswith("(torch and Lightning not imported)")
