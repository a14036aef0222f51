"""``scripts/benchmark.py``: the ``--quick`` smoke run, the amount conversion and the file writer.

Nothing here asserts a time: speed numbers live in docs/benchmarks.md, made by the script itself.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from lightning_sparse.core.schedule import SparsitySchedule
from tests import forkserver

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"
OURS = "MagnitudePruning (ours)"
LIGHTNING = "ModelPruning (Lightning)"


@pytest.fixture(scope="module")
def benchmark() -> Iterator[ModuleType]:
    """The script as a module (it is a file to run, not part of the package)."""
    name = "benchmark_script"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the script's annotations through sys.modules while it executes
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` as rows of cells, header first, alignment row dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set(":-") for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.slow
def test_quick_run_writes_and_prints_both_sections(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    result = forkserver.run(
        [str(SCRIPT), "--quick", "--output", str(output)],
        REPO_ROOT,
        {**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = output.read_text()

    # provenance: each section names its command, machine, versions and date
    for section in ("accuracy", "step_cost"):
        assert f"<!-- benchmark:{section} -->" in text
        assert f"<!-- /benchmark:{section} -->" in text
    assert text.count(f"- Command: `python scripts/benchmark.py --quick --output {output}`") == 2
    machines = [line for line in text.splitlines() if line.startswith("- Machine: ")]
    assert len(machines) == 2
    for line in machines:
        for fact in (" cores; torch ", "lightning ", "`torch.set_num_threads(1)`"):
            assert fact in line
    assert text.count("- Date: ") == 2

    accuracy, comparison, by_split, step_cost = markdown_tables(text)
    # the tables are printed as well as written
    assert markdown_tables(result.stdout) == [accuracy, comparison, by_split, step_cost]

    # accuracy: dense, then ours and ModelPruning at each target (quick: one seed, global scope)
    assert accuracy[0][:5] == [
        "Method",
        "Scope",
        "Target sparsity",
        "Sparsity reached: mean (min-max)",
        "Test acc. % (mean ± std)",
    ]
    expected_rows = [["dense", "-", "0.00"]]
    for target in ("0.90", "0.95", "0.98"):
        expected_rows += [[OURS, "global", target], [LIGHTNING, "global", target]]
    assert [row[:3] for row in accuracy[1:]] == expected_rows
    for row in accuracy[1:]:
        assert len(row) == len(accuracy[0])
        reached = float(row[3].split()[0])
        # both methods reach the target sparsity, measured on the weights
        assert reached == pytest.approx(float(row[2]), abs=1e-3)
        mean, std = (float(part) for part in row[4].split("±"))
        assert 0 <= mean <= 100
        assert std >= 0

    assert comparison[0][:4] == ["Scope", "Target sparsity", "Ours %", "ModelPruning %"]
    assert [row[:2] for row in comparison[1:]] == [
        ["global", "0.90"],
        ["global", "0.95"],
        ["global", "0.98"],
    ]
    for row in comparison[1:]:
        assert row[-2] in ("yes", "**no**")
    # the 98% target is judged at 0.98 only
    assert [row[-1] for row in comparison[1:3]] == ["-", "-"]
    assert comparison[3][-1] in ("yes", "**no**")

    assert [row[0] for row in by_split[1:]] == ["0 (main)", "1"]

    # step cost: dense, ours and ModelPruning for each of the two models
    assert step_cost[0][:4] == ["Model", "Params", "Batch", "Variant"]
    assert "Ratio to dense (median of rounds)" in step_cost[0]
    variants = [row[3] for row in step_cost[1:]]
    assert variants == ["dense", OURS, LIGHTNING] * 2
    assert {row[0].split()[0] for row in step_cost[1:]} == {"SmallCNN", "MLP"}
    ratio_column = step_cost[0].index("Ratio to dense (median of rounds)")
    sparsity_column = step_cost[0].index("Sparsity in force")
    for row in step_cost[1:]:
        ratio = float(row[ratio_column].strip("*"))
        assert math.isfinite(ratio)
        assert ratio > 0
        # the masks were really in force while the pruned variants were timed
        assert float(row[sparsity_column]) == pytest.approx(
            0.0 if row[3] == "dense" else 0.9, abs=1e-3
        )
    assert [float(row[ratio_column].strip("*")) for row in step_cost[1::3]] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("start_epoch", "end_epoch", "update_frequency"), [(0, 20, 1), (2, 15, 1), (1, 9, 2)]
)
def test_model_pruning_amounts_reproduce_the_absolute_schedule(
    benchmark: ModuleType, start_epoch: float, end_epoch: float, update_frequency: float
) -> None:
    schedule = SparsitySchedule(0.0, 0.98, start_epoch, end_epoch, update_frequency, "cubic")
    amount = benchmark.RemainingAmount(schedule)
    remaining = 1.0
    for epoch in range(30):
        # pruning a fraction of what remains at the end of epoch e ...
        remaining *= 1.0 - amount(epoch)
        # ... leaves exactly the absolute target due at epoch e + 1
        assert 1.0 - remaining == pytest.approx(schedule.sparsity_at(epoch + 1), abs=1e-12)
    # no pruning at all outside the schedule: ModelPruning skips an amount of 0
    assert amount(end_epoch) == 0.0


def test_model_pruning_amounts_refuse_updates_between_epoch_ends(benchmark: ModuleType) -> None:
    schedule = SparsitySchedule(0.0, 0.9, 0.0, 2.0, 0.5, "cubic")
    with pytest.raises(ValueError, match="ModelPruning prunes only at epoch ends"):
        benchmark.RemainingAmount(schedule)


def test_writing_one_section_keeps_the_others(benchmark: ModuleType, tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    benchmark.write_sections(output, {"step_cost": "## Step\n\nold step"})
    # another script's block, which this one must leave alone
    with output.open("a") as handle:
        handle.write("\n<!-- quant:start -->\n## Quant\n\nint8 table\n<!-- quant:end -->\n")
    benchmark.write_sections(output, {"accuracy": "## Accuracy\n\nfirst"})
    benchmark.write_sections(output, {"accuracy": "## Accuracy\n\nsecond"})
    text = output.read_text()
    assert text.startswith("# Benchmarks")
    assert "first" not in text
    assert "second" in text
    assert "old step" in text
    assert "<!-- quant:start -->\n## Quant\n\nint8 table\n<!-- quant:end -->" in text
    assert text.count("<!-- benchmark:accuracy -->") == 1
    assert text.count("<!-- benchmark:step_cost -->") == 1
