"""``scripts/benchmark_deploy.py``: its runs, section writer and markdown; no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_deploy.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The script as a module (it is a file to run, not part of the package)."""
    name = "benchmark_deploy_script"
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


def test_the_runs_are_the_commands_a_user_types(bench: ModuleType, tmp_path: Path) -> None:
    settings = bench.Settings(seeds=[1], epochs=5, ratios=[0.5], runs=tmp_path, latency_runs=3)
    jobs = bench.jobs(settings, 1)
    assert [job.name for job in jobs] == ["dense", "dense_ptq", "channel_0.5"]
    dense, ptq, channel = (job.command[2:] for job in jobs)
    assert dense[:3] == ["lightning_sparse.train", "recipe=dense", "trainer.max_epochs=5"]
    assert ptq[:2] == ["lightning_sparse.oneshot", "recipe=ptq_int8"]
    assert f"ckpt_path={tmp_path / 'dense' / 'seed1'}" in ptq
    assert channel[:3] == [
        "lightning_sparse.train",
        "recipe=channel_qat",
        "recipe.channel.final_sparsity=0.5",
    ]
    for command in (dense, ptq, channel):
        assert {"model=resnet18", "data=mnist5k", "seed=1"} <= set(command)


def _summary(acc: float, int8: float | None, macs: int, params: int) -> dict:
    return {
        "onnx_fp32_acc": acc,
        "onnx_int8_acc": int8,
        "macs": macs,
        "params": params,
        "epochs": 5,
        "wall": {"seconds": 600.0, "load": [2.0, 3.0], "command": "python -m ..."},
    }


def test_markdown_reports_every_configuration_and_the_speed_ups(
    bench: ModuleType, tmp_path: Path
) -> None:
    settings = bench.Settings(
        seeds=[0, 1], epochs=5, ratios=[0.75], runs=tmp_path, latency_runs=9, threads=[1]
    )
    dense = _summary(0.99, None, 400_000_000, 11_000_000)
    ms = {"dense fp32": 40.0, "dense int8": 60.0, "channel_0.75 fp32": 10.0}
    ms["channel_0.75 int8"] = 5.0
    results = {
        "settings": settings,
        "command": "python scripts/benchmark_deploy.py",
        "date": "2026-01-01 00:00 UTC",
        "minutes": 100.0,
        "load": (1.0, 2.0),
        "environment": {
            "cpu": "CPU",
            "cores": 2,
            "torch": "t",
            "lightning": "l",
            "onnxruntime": "r",
            "python": "p",
        },
        "summaries": {
            "dense": [dense, _summary(0.98, None, 400_000_000, 11_000_000)],
            "dense_ptq": [_summary(0.99, 0.985, 400_000_000, 11_000_000)] * 2,
            "channel_0.75": [_summary(0.99, 0.985, 100_000_000, 3_000_000)] * 2,
        },
        "latency": [{"threads": 1, "batch": 64, "ms": ms}],
    }
    text = bench.deploy_markdown(results)
    assert "| dense fp32 | 400.0 M (100%) | 11.00 M | 98.50 ± 0.71 | 40.00 | 1.0x |" in text
    assert "| dense int8 (PTQ) | 400.0 M (100%) | 11.00 M | 98.50 ± 0.00 | 60.00 | 0.7x |" in text
    assert (
        "| 75% of MACs removed, int8 | 100.0 M (25%) | 3.00 M | 98.50 ± 0.00 | 5.00 | 8.0x |"
        in text
    )
    assert "75% of MACs removed, int8: +0.00 points vs dense fp32" in text
    assert "600.0 s" not in text
    assert "10.0 wall / 0.0 CPU (load 2.0-3.0)" in text
    assert "runs at 1.50x of its fp32 latency" in text


def test_the_section_is_replaced_and_the_rest_kept(bench: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nother\n")
    bench.write_section(path, "first")
    assert (
        path.read_text()
        == "# Benchmarks\n\nother\n\n<!-- deploy:start -->\nfirst\n<!-- deploy:end -->\n"
    )
    bench.write_section(path, "untrained", untrained=True)
    assert "<!-- deploy-untrained:start -->\nuntrained\n<!-- deploy-untrained:end -->" in (
        path.read_text()
    )
    bench.write_section(path, "second")
    assert "first" not in path.read_text()
    assert "untrained" in path.read_text()  # the other block stays
    assert path.read_text().startswith("# Benchmarks\n\nother\n")
