"""The sweep comparison: run discovery, statuses, Pareto front, markdown, plot and command line.

The sweep dirs here are laid out as Hydra writes them (``<job>/.hydra/overrides.yaml``,
``<job>/summary.json``); tests/e2e/test_sweeps.py compares real sweeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from lightning_sparse.compare import main
from lightning_sparse.run.compare import (
    MARKDOWN_FILE,
    PLOT_FILE,
    RunRecord,
    SweepReport,
    collect_runs,
    is_sweep,
    mark_pareto_front,
    markdown_report,
    pareto_points,
    pareto_title,
    write_report,
)

COMMON = ["data=synthetic", "trainer.max_epochs=2"]


def make_job(
    sweep: Path,
    job: str,
    overrides: list[str],
    summary: dict[str, Any] | None,
    recipe: str = "gmp",
) -> Path:
    run_dir = sweep / job
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra_yaml = {"hydra": {"runtime": {"choices": {"recipe": recipe}}}}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def ok(acc: float, nonzero: int, sparsity: float = 0.9, **extra: Any) -> dict[str, Any]:
    return {
        "status": "ok",
        "test_acc": acc,
        "sparsity": sparsity,
        "params_nonzero": nonzero,
        "recipe": {"name": "gmp", "config": {}},
        **extra,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Four jobs: two on the Pareto front, one dominated, one failed, one without a summary."""
    sweep = tmp_path / "sweep"
    make_job(sweep, "0", [*COMMON, "recipe.pruning.final_sparsity=0.8"], ok(0.95, 3000, 0.8))
    make_job(sweep, "1", [*COMMON, "recipe.pruning.final_sparsity=0.9"], ok(0.90, 1500))
    make_job(sweep, "2", [*COMMON, "recipe.pruning.final_sparsity=0.5"], ok(0.90, 7000, 0.5))
    failed = {"status": "failed", "error": "ValueError: boom\nsecond line", "test_acc": None}
    make_job(sweep, "3", [*COMMON, "recipe.pruning.final_sparsity=0.99"], failed)
    make_job(sweep, "10", [*COMMON, "recipe.pruning.final_sparsity=0.95"], None, recipe="dense")
    (sweep / "multirun.yaml").write_text("{}")
    # A run's own subfolders are never runs, even when they hold a summary.json.
    (sweep / "0" / "wandb").mkdir()
    (sweep / "0" / "wandb" / "summary.json").write_text("{}")
    return sweep


def test_collect_runs_reads_every_job_in_job_order(sweep: Path) -> None:
    records = collect_runs(sweep)
    assert [r.job for r in records] == ["0", "1", "2", "3", "10"]
    assert [r.status for r in records] == ["ok", "ok", "ok", "failed", "failed"]
    assert records[0].overrides == [*COMMON, "recipe.pruning.final_sparsity=0.8"]
    assert (records[1].test_acc, records[1].sparsity, records[1].params_nonzero) == (
        0.9,
        0.9,
        1500,
    )
    assert records[3].error == "ValueError: boom\nsecond line"
    assert records[4].recipe == "dense"  # from .hydra/hydra.yaml when there is no summary
    assert "no summary.json" in (records[4].error or "")


def test_pareto_front_keeps_runs_nothing_beats(sweep: Path) -> None:
    records = collect_runs(sweep)
    assert [r.job for r in records if r.pareto] == ["0", "1"]  # 2 loses to 1: as accurate, larger


def test_pareto_front_keeps_ties_and_skips_failed_runs(tmp_path: Path) -> None:
    records = [
        RunRecord("a", tmp_path, "ok", test_acc=0.9, params_nonzero=10),
        RunRecord("b", tmp_path, "ok", test_acc=0.9, params_nonzero=10),
        RunRecord("c", tmp_path, "failed"),
        RunRecord("d", tmp_path, "interrupted", test_acc=1.0, params_nonzero=1),
    ]
    front = mark_pareto_front(records)
    assert [r.job for r in front] == ["a", "b"]
    assert [r.pareto for r in records] == [True, True, False, False]


def test_markdown_lists_varying_overrides_and_failures(sweep: Path) -> None:
    text = markdown_report(collect_runs(sweep), title="Sweep x")
    lines = text.splitlines()
    assert lines[0] == "# Sweep x"
    assert "5 runs: 3 completed, 2 failed." in text
    assert "Common overrides: `data=synthetic` `trainer.max_epochs=2`" in text
    header = next(line for line in lines if line.startswith("| job"))
    assert header == (
        "| job | status | recipe | overrides | test acc | sparsity | nonzero params | Pareto |"
    )
    row = next(line for line in lines if line.startswith("| 1 |"))
    assert (
        row == "| 1 | ok | gmp | recipe.pruning.final_sparsity=0.9 | 90.00% | 90.00% | 1,500 | ✓ |"
    )
    failed_row = next(line for line in lines if line.startswith("| 3 |"))
    assert "| failed |" in failed_row
    assert "| — | — | — |" in failed_row
    assert "## Failed jobs" in text
    assert "- `3` (" in text
    assert "ValueError: boom" in text
    assert "second line" not in text  # the first line of the error only
    assert "- `10` (" in text


def test_size_and_latency_columns_appear_when_measured(tmp_path: Path) -> None:
    make_job(tmp_path, "0", ["a=1"], ok(0.9, 10, size_bytes=2048, latency_ms=1.25))
    make_job(tmp_path, "1", ["a=2"], ok(0.8, 5))
    text = markdown_report(collect_runs(tmp_path))
    assert "| size | latency (ms) |" in text
    assert "| 2.0 KiB | 1.250 |" in text
    assert "| — | — |" in text


def test_size_and_latency_come_from_the_export_when_there_is_one(tmp_path: Path) -> None:
    export = {"compressed_bytes": 4096, "ort_int8_ms": None, "ort_fp32_ms": 0.5}
    make_job(tmp_path, "0", [], ok(0.9, 10, export=export))
    (record,) = collect_runs(tmp_path)
    assert (record.size_bytes, record.latency_ms) == (4096, 0.5)  # fp32: no int8 model
    assert record.latency_kind == "fp32"
    text = markdown_report([record])
    assert "| size | latency fp32 (ms) |" in text
    assert "| 4.0 KiB | 0.500 |" in text


def test_latency_says_which_model_it_timed_when_runs_differ(tmp_path: Path) -> None:
    make_job(tmp_path, "0", ["a=1"], ok(0.9, 10, ort_int8_ms=0.25, ort_fp32_ms=0.75))
    make_job(tmp_path, "1", ["a=2"], ok(0.9, 20, ort_int8_ms=None, ort_fp32_ms=0.5))
    (tmp_path / "multirun.yaml").write_text("{}")
    text = markdown_report(collect_runs(tmp_path))
    assert "| latency (ms) |" in text
    assert "| 0.250 (int8) |" in text
    assert "| 0.500 (fp32) |" in text


def test_a_date_dir_of_separate_runs_is_no_sweep(tmp_path: Path) -> None:
    date = tmp_path / "2026-12-01"
    for time, acc, nonzero, recipe in (("10-00-00", 0.9, 10, "gmp"), ("11-00-00", 0.8, 5, "qat")):
        run = make_job(date, time, [f"recipe={recipe}"], ok(acc, nonzero), recipe=recipe)
        hydra_yaml = {"hydra": {"mode": "RUN", "runtime": {"choices": {"recipe": recipe}}}}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    assert not is_sweep(date)
    text, records, plot = write_report(date)
    assert [r.pareto for r in records] == [False, False]  # no front across unrelated runs
    assert plot is None
    assert not (date / "pareto.png").exists()
    assert text.startswith(f"# Runs under {date}")
    assert "Not one sweep" in text


def test_jobs_of_a_multirun_are_a_sweep_without_multirun_yaml(tmp_path: Path) -> None:
    # Optuna's sweeper writes no multirun.yaml; its jobs say they ran in a multirun.
    for job in ("0", "1"):
        run = make_job(tmp_path, job, [f"a={job}"], ok(0.9, 10 + int(job)))
        hydra_yaml = {"hydra": {"mode": "MULTIRUN", "runtime": {"choices": {"recipe": "gmp"}}}}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    assert is_sweep(tmp_path)
    assert [r.pareto for r in collect_runs(tmp_path)] == [True, False]


def test_the_pareto_plot_labels_swept_values_and_says_what_was_swept(sweep: Path) -> None:
    records = collect_runs(sweep)
    labels = [label for label, *_ in pareto_points(records)]
    assert labels == ["final_sparsity=0.8", "final_sparsity=0.9", "final_sparsity=0.5"]
    title = pareto_title(records, sweep)
    assert title.startswith("dense, gmp: test accuracy vs nonzero parameters over ")
    assert "recipe.pruning.final_sparsity" in title
    assert "(2 failed, not shown)" in title


def test_pipes_in_overrides_are_escaped(tmp_path: Path) -> None:
    make_job(tmp_path, "0", ["recipe.pruning.params=[re:a|b]"], ok(0.9, 10))
    make_job(tmp_path, "1", ["x=1"], ok(0.9, 10))
    assert "re:a\\|b" in markdown_report(collect_runs(tmp_path))


def test_an_unreadable_summary_is_a_failed_run(tmp_path: Path) -> None:
    make_job(tmp_path, "0", [], None)
    (tmp_path / "0" / "summary.json").write_text('{"test_acc": 0.9,')  # cut short
    (record,) = collect_runs(tmp_path)
    assert record.failed
    assert (record.error or "").startswith("unreadable summary.json")


def test_a_single_run_dir_is_a_sweep_of_one(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(ok(0.5, 10)))
    (record,) = collect_runs(tmp_path)
    assert (record.job, record.status, record.pareto) == (tmp_path.name, "ok", True)


def test_cli_prints_the_table_and_writes_report_and_plot(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | ok | gmp |" in out
    assert f"Pareto plot: {sweep / PLOT_FILE}" in out
    assert (sweep / MARKDOWN_FILE).read_text() in out
    assert (sweep / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_cli_output_dir_and_no_plot(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(sweep), "--output-dir", str(out), "--no-plot"]) == 0
    assert (out / MARKDOWN_FILE).is_file()
    assert not (out / PLOT_FILE).exists()
    assert not (sweep / MARKDOWN_FILE).exists()


@pytest.mark.parametrize("make_dir", [False, True])
def test_cli_without_runs_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_dir: bool
) -> None:
    target = tmp_path / "nothing"
    if make_dir:
        target.mkdir()
    assert main([str(target)]) == 2
    err = capsys.readouterr().err
    assert ("no runs under" if make_dir else "is not a directory") in err


def hydra_config(sweep_dir: Path) -> Any:
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})


def test_sweep_report_exits_1_when_a_job_failed(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        SweepReport().on_multirun_end(config=hydra_config(sweep))
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert "| 3 | failed |" in captured.out
    assert "SweepFailedError: 2 of 5 sweep jobs failed: job 3: ValueError: boom" in captured.err
    assert (sweep / MARKDOWN_FILE).is_file()
    assert (sweep / PLOT_FILE).is_file()


def test_sweep_report_passes_a_clean_sweep_and_ignores_a_missing_dir(tmp_path: Path) -> None:
    make_job(tmp_path, "0", ["a=1"], ok(0.9, 10))
    SweepReport(plot=False).on_multirun_end(config=hydra_config(tmp_path))
    assert (tmp_path / MARKDOWN_FILE).is_file()
    SweepReport().on_multirun_end(config=hydra_config(tmp_path / "never-created"))
    assert not (tmp_path / "never-created").exists()


def test_sweep_report_can_leave_the_exit_code_alone(sweep: Path) -> None:
    SweepReport(fail_on_failed_jobs=False, plot=False).on_multirun_end(config=hydra_config(sweep))


def test_a_search_is_judged_on_its_own_objectives(tmp_path: Path) -> None:
    # objectives: [val_acc, macs], direction: [maximize, minimize]: the front, the table and the
    # plot are over validation accuracy and MACs, not test accuracy and nonzero parameters.
    results = {  # job: (width, val_acc, macs); test accuracy and nonzero params would disagree
        "0": (8, 0.90, 1000.0),
        "1": (16, 0.95, 4000.0),
        "2": (32, 0.93, 9000.0),  # dominated by job 1 on (val_acc, macs)
    }
    for job, (width, val_acc, macs) in results.items():
        summary = ok(1.0 - val_acc, int(macs), val_acc=val_acc, export={"macs": macs})
        run = make_job(tmp_path, job, [*COMMON, f"model.model.width={width}"], summary)
        hydra_yaml = {
            "hydra": {
                "mode": "MULTIRUN",
                "runtime": {"choices": {"recipe": "gmp"}},
                "sweeper": {"direction": ["maximize", "minimize"]},
            }
        }
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
        (run / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({"objectives": ["val_acc", "macs"]})
        )
    records = collect_runs(tmp_path)
    assert [r.pareto for r in records] == [True, True, False]
    assert pareto_points(records) == [
        ("width=8", 1000.0, 0.90, True),
        ("width=16", 4000.0, 0.95, True),
        ("width=32", 9000.0, 0.93, False),
    ]
    assert pareto_title(records, tmp_path).startswith(
        "gmp: validation accuracy vs MACs per sample over model.model.width"
    )
    text, _, plot = write_report(tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("| job"))
    assert "val acc" in header
    assert "MACs per sample" in header
    assert "| 93.00% | 9,000 |" in text
    assert plot is not None
    assert plot.is_file()
