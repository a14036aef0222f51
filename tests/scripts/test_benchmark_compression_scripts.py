"""``scripts/benchmark_deep_compression.py`` and ``scripts/benchmark_lr_phases.py``: their markdown
and section writers, from made-up summaries (no training, no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str) -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def deep() -> Iterator[ModuleType]:
    yield from _load("benchmark_deep_compression")


@pytest.fixture(scope="module")
def phases() -> Iterator[ModuleType]:
    yield from _load("benchmark_lr_phases")


META = {"machine": "x86_64", "date": "2026-12-01 00:00 UTC", "minutes": 1.0, "load": (1.0, 2.0)}


def _summary(acc: float, size: int, wall: float = 300.0) -> dict[str, Any]:
    return {
        "test_acc": acc,
        "val_acc": acc,
        "sparsity": 0.95,
        "dense_bytes": 1_724_320,
        "compressed_bytes": size,
        "wall_s": wall,
        "cpu_s": wall / 2,
        "compression": {
            "bits_per_weight": size * 8 / 431_080,
            "entropy_bits_per_weight": size * 8 / 431_080 / 1.1,
            "bits_over_entropy_bound": 1.1,
        },
    }


def test_deep_compression_markdown_states_every_target(deep: ModuleType) -> None:
    sizes = {"dense": 1_725_000, deep.PLAIN: 28_600}
    results = {
        deep.Job(variant, seed): _summary(0.98, sizes.get(variant, 30_000))
        for variant in deep.VARIANTS
        for seed in (0, 1)
    }
    markdown = deep.render(results, [0, 1], META)
    assert "| deep_compression | 98.00 ± 0.00 | 98.00 / 98.00 | +0.00 |" in markdown
    assert "ratio >= 49x: met (60.3x" in markdown
    assert "within 0.5 pt of dense: met (+0.00 pp)" in markdown
    assert "within 10 minutes: met (at most 2.5 CPU-minutes on one thread" in markdown
    assert "measured wall time up to 5.0 min" in markdown
    assert "weight sharing vs 4-bit QAT" in markdown


def test_deep_compression_commands_run_the_recipe_as_shipped(deep: ModuleType) -> None:
    line = deep.command(deep.Job(deep.PLAIN, 2), [], Path("/tmp/x"))
    assert line[3:] == [
        "model=lenet5",
        "data=mnist5k",
        "recipe=deep_compression",
        "seed=2",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=/tmp/x",
    ]


def test_lr_phases_chooses_on_validation_never_on_test(phases: ModuleType) -> None:
    labels = phases.candidates(20, 45)
    results = {}
    for index, label in enumerate(labels):
        for seed in (0, 1):
            # Validation prefers the last candidate; test would prefer the first.
            val, test = 0.9 + 0.01 * index, 0.99 - 0.01 * index
            results[phases.Job(label, 0.98, seed)] = {"val_acc": val, "test_acc": test}
    chosen = phases.choose(results, list(labels), [0, 1])
    assert chosen == list(labels)[-1]
    for seed in (0, 1):
        results[phases.Job(chosen, 0.95, seed)] = {"val_acc": 0.97, "test_acc": 0.986}
        results[phases.Job("dense", 0.0, seed)] = {"val_acc": 0.99, "test_acc": 0.99}
    markdown = phases.render(results, labels, chosen, [0, 1], [], META)
    assert f"| {chosen} (chosen) | 0.98 |" in markdown
    assert "0.95 within 0.5 pt of dense: met (-0.40 pp)" in markdown
    assert "0.98: >= 97.0%: **not met**" in markdown


def test_sections_are_replaced_and_the_rest_kept(deep: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nother\n")
    deep.write_section(path, "first")
    deep.write_section(path, "second")
    assert path.read_text() == (
        "# Benchmarks\n\nother\n\n<!-- deep_compression:start -->\nsecond\n"
        "<!-- deep_compression:end -->\n"
    )
