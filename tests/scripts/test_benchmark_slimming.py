"""``scripts/benchmark_slimming.py``: its variants, dominance and markdown, from made-up summaries
(no training, no timing asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_slimming.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("benchmark_slimming_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _args(**kwargs: Any) -> argparse.Namespace:
    defaults: dict[str, Any] = {
        "seeds": [0, 1],
        "epochs": 30,
        "removal_epoch": 20.0,
        "warmup": 2.0,
        "strengths": [1e-4],
        "slim_model": "cnn",
        "slim_data": "digits",
        "baselines": ["l1", "bn_scale"],
        "removal": 0.5,
        "slim_allocation": "uniform",
        "override": [],
        "argv": [],
    }
    return argparse.Namespace(**{**defaults, **kwargs})


def _summary(val: float, macs: int, test: float = 0.9) -> dict[str, Any]:
    return {"status": "ok", "val_acc": val, "test_acc": test, "macs": macs, "macs_dense": 1000}


def test_every_variant_removes_half_the_macs_on_the_same_schedule(bench: ModuleType) -> None:
    variants = dict(bench.slimming_variants(_args(strengths=[1e-4, 1e-3])))
    assert list(variants) == [
        "channel removal, l1, uniform (no penalty)",
        "channel removal, bn_scale, uniform (no penalty)",
        "slimming, penalty 0.0001, uniform",
        "slimming, penalty 0.001, uniform",
    ]
    for overrides in variants.values():
        assert "recipe=slimming" in overrides
        assert "recipe.channel.final_sparsity=0.5" in overrides
        assert "recipe.channel.start_epoch=20.0" in overrides
        assert "recipe.channel.allocation=uniform" in overrides
    l1 = variants["channel removal, l1, uniform (no penalty)"]
    assert "~recipe.regularization" in l1
    assert "recipe.channel.importance=l1" in l1
    assert "recipe.regularization.strength=0.001" in variants["slimming, penalty 0.001, uniform"]


def test_global_variants_rank_across_layers_at_the_removal_asked(bench: ModuleType) -> None:
    args = _args(baselines=["l1", "l1_global"], slim_allocation="global", removal=0.75)
    variants = dict(bench.slimming_variants(args))
    assert list(variants) == [
        "channel removal, l1, uniform (no penalty)",
        "channel removal, l1, global (no penalty)",
        "slimming, penalty 0.0001, global",
    ]
    assert (
        "recipe.channel.allocation=global" in variants["channel removal, l1, global (no penalty)"]
    )
    assert "recipe.channel.allocation=global" in variants["slimming, penalty 0.0001, global"]
    for overrides in variants.values():
        assert "recipe.channel.final_sparsity=0.75" in overrides


def test_baselines_can_be_chosen_and_overrides_reach_every_variant(bench: ModuleType) -> None:
    args = _args(baselines=["l1"], override=["model.lr_schedule=cosine"])
    variants = dict(bench.slimming_variants(args))
    assert list(variants) == [
        "channel removal, l1, uniform (no penalty)",
        "slimming, penalty 0.0001, uniform",
    ]
    for overrides in variants.values():
        # last, so it wins over the variant's own values
        assert overrides[-1] == "model.lr_schedule=cosine"


@pytest.mark.parametrize(
    ("trial", "dominates"),
    [
        ((0.95, 400), True),  # as accurate, cheaper
        ((0.96, 1000), True),  # more accurate, as cheap
        ((0.95, 1000), False),  # the same point
        ((0.97, 1200), False),  # more accurate, dearer
        ((0.90, 100), False),  # cheaper, less accurate
    ],
)
def test_dominance_needs_both_and_one_strictly(
    bench: ModuleType, trial: tuple[float, int], dominates: bool
) -> None:
    assert bench._dominates(_summary(*trial), _summary(0.95, 1000)) is dominates


def test_render_reports_seeds_macs_and_the_dominating_trials(
    bench: ModuleType, tmp_path: Path
) -> None:
    run = {"command": "python -m lightning_sparse.train recipe=slimming"}
    slim = [
        {
            "variant": "slimming, penalty 0.0001",
            "runs": [
                {**run, "summary": _summary(0.90, 500)},
                {**run, "summary": _summary(0.92, 500)},
            ],
        }
    ]
    search = {
        "minutes": 12.0,
        "main": {
            "command": "python -m lightning_sparse.train",
            "summary": {**_summary(0.95, 1000), "ort_fp32_ms": 2.5},
        },
        "command": "python -m lightning_sparse.train hparams_search=compression_nas",
        "front": 1,
        "trials": [
            {
                "job": "0",
                "params": {
                    "width": "8",
                    "depth": "2",
                    "hidden": "32",
                    "batch_norm": "true",
                    "final_sparsity": "0.5",
                },
                "summary": {**_summary(0.96, 300), "ort_fp32_ms": 0.75},
            },
            {"job": "1", "params": {}, "summary": {"status": "failed"}},
        ],
    }
    text = bench.render(slim, _args())
    assert "| slimming, penalty 0.0001 | 91.00 ± 1.41 | 90.00 ± 0.00 | 500 |" in text
    assert "1,000 MACs dense" in text
    assert "## Network Slimming (cnn, digits)" in text
    assert "`data=digits model=cnn model.model.batch_norm=true`" in text
    resnet = bench.render(slim, _args(slim_model="resnet18", slim_data="mnist5k"))
    assert "`data=mnist5k model=resnet18` (1,000 MACs dense)" in resnet  # its own BatchNorm
    found = bench.render_search(search, _args(search_data="mnist5k"))
    assert "(mnist5k)" in found
    assert "1 of the trials dominate it" in found
    assert "and 2.50 ms fp32" in found
    assert "| 0 | 8 | 2 | 32 | true | 50% | 96.00 | 300 | 0.75 | 90.00 | yes |" in found
    assert "| 1 | failed |" in found
    # Each part has its own block: rewriting the search keeps the slimming table.
    out = tmp_path / "benchmarks.md"
    bench.write_marked_block(out, bench.BEGIN, bench.END, text)
    bench.write_marked_block(out, bench.NAS_BEGIN, bench.NAS_END, found)
    bench.write_marked_block(out, bench.NAS_BEGIN, bench.NAS_END, found.replace("2.50", "3.00"))
    written = out.read_text()
    assert "91.00 ± 1.41" in written
    assert "and 3.00 ms fp32" in written
    assert "2.50 ms" not in written


def test_each_model_and_data_set_keeps_its_own_block(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    cnn = bench.slimming_markers("cnn", "digits")
    resnet = bench.slimming_markers("resnet18", "mnist5k")
    assert cnn == (bench.BEGIN, bench.END)
    assert resnet == (
        "<!-- slimming-resnet18-mnist5k:start -->",
        "<!-- slimming-resnet18-mnist5k:end -->",
    )
    bench.write_marked_block(out, *cnn, "cnn table")
    bench.write_marked_block(out, *resnet, "resnet table")
    bench.write_marked_block(out, *resnet, "resnet table, rerun")
    text = out.read_text()
    assert "cnn table" in text
    assert "resnet table, rerun" in text
    assert text.count("resnet table") == 1


def test_a_finished_run_with_the_same_overrides_is_reused(
    bench: ModuleType, tmp_path: Path
) -> None:
    run_dir = tmp_path / "0_0"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- model=resnet18\n- seed=0\n")
    (run_dir / "summary.json").write_text('{"status": "ok", "val_acc": 0.5}')
    overrides = ["model=resnet18", "seed=0"]
    assert bench.finished_run(run_dir, overrides) == {"status": "ok", "val_acc": 0.5}
    assert bench.finished_run(run_dir, ["model=resnet18", "seed=1"]) is None
    (run_dir / "summary.json").write_text('{"status": "failed"}')
    assert bench.finished_run(run_dir, overrides) is None
    assert bench.finished_run(tmp_path / "missing", overrides) is None
