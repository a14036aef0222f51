"""Start-up time and the main job's wall time on a busy machine, for docs/benchmarks.md.

Two sections, each between its markers in ``docs/benchmarks.md`` (the rest of the file is kept):

- ``startup`` (``<!-- startup:start -->``): the wall time of ``python -m lightning_sparse.train
  --help``, of a misspelled override (``recipe.pruning.final_sparsty=0.9``) and of ``python -m
  lightning_sparse.compare`` on an empty folder, and what ``python -X importtime`` says the
  package costs to import; for this checkout and, with ``--before <checkout>``, another one (the
  same commands run from its tree).
- ``threads`` (``<!-- threads:start -->``): the wall time of the main job (``python -m
  lightning_sparse.train``, the default recipe) with ``threads=1`` and ``threads=null`` (torch's
  default, one per core), on the machine as it is and with two more CPU-bound processes running
  (each a single-threaded torch matmul loop, one core's worth of work), plus the summary's test
  accuracy and weights digest (equal digests: bit-identical weights).

Every number comes from the run that writes it; the machine is shared, so each row records the
1-minute load average when it started. Run from the repository root::

    python scripts/benchmark_startup.py                                # both sections, ~20 min
    python scripts/benchmark_startup.py --section startup --before /tmp/old-checkout
    python scripts/benchmark_startup.py --quick --output /tmp/bench.md # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from lightning_sparse.run.markdown import write_marked_block

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("startup", "threads")
# One core's worth of work: a single-threaded matmul loop.
BUSY = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(768, 768)\n"
    "while True:\n"
    "    a = (a @ a).tanh()\n"
)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, text: str) -> None:
    """Replace section ``name`` in ``path`` (append it when new); keep everything else."""
    write_marked_block(path, *_markers(name), text)


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}"


def run(
    args: Sequence[str], cwd: Path, tree: Path, timeout: float = 1800
) -> tuple[float, subprocess.CompletedProcess[str] | None]:
    """Wall time of ``python <args>`` with ``tree`` first on the path; None when it timed out."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)  # the job's own `threads` decides
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, None
    return time.perf_counter() - started, result


def import_seconds(stderr: str, module: str) -> float:
    """Cumulative import time of ``module`` from ``python -X importtime`` output, in seconds."""
    for line in stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6
    return float("nan")


def startup_rows(tree: Path, label: str, repeats: int) -> list[list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        empty = cwd / "empty"
        empty.mkdir()
        commands = {
            "train --help": ["-m", "lightning_sparse.train", "--help"],
            "train recipe.pruning.final_sparsty=0.9 (a typo)": [
                "-m",
                "lightning_sparse.train",
                "recipe.pruning.final_sparsty=0.9",
                f"hydra.run.dir={cwd / 'typo'}",
            ],
            "compare <empty folder>": ["-m", "lightning_sparse.compare", str(empty)],
        }
        rows = []
        for name, args in commands.items():
            times = [run(args, cwd, tree)[0] for _ in range(repeats)]
            rows.append([label, name, f"{statistics.median(times):.2f} s", f"{load_average():.1f}"])
        _, result = run(["-X", "importtime", "-m", "lightning_sparse.train", "--help"], cwd, tree)
        stderr = result.stderr if result else ""
        imported = import_seconds(stderr, "lightning_sparse")
        lightning = import_seconds(stderr, "lightning")
        note = (
            "torch and Lightning not imported"
            if lightning != lightning
            else (f"of which lightning {lightning:.2f} s")
        )
        rows.append(
            [
                label,
                "import lightning_sparse (-X importtime, train --help)",
                f"{imported:.2f} s ({note})",
                f"{load_average():.1f}",
            ]
        )
    return rows


def startup_section(before: Path | None, repeats: int) -> str:
    rows = []
    if before is not None:
        rows += startup_rows(before, f"before ({before.name})", repeats)
    rows += startup_rows(REPO, "this checkout", repeats)
    table = markdown_table(["tree", "command", f"wall (median of {repeats})", "load"], rows)
    return table


@contextmanager
def busy(count: int) -> Iterator[None]:
    """``count`` CPU-bound processes (single-threaded torch matmul loops) meanwhile."""
    processes = [
        subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        time.sleep(3 if count else 0)  # let them start computing
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main_job(threads: str, extra: Sequence[str], timeout: float) -> tuple[str, str, str]:
    """Wall time, test accuracy and weights digest of one main job."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = ["-m", "lightning_sparse.train", f"threads={threads}", *extra]
        seconds, result = run([*args, f"hydra.run.dir={run_dir}"], Path(tmp), REPO, timeout)
        if result is None:
            return f"> {seconds:.0f} s (stopped)", "-", "-"
        if result.returncode != 0:
            return f"failed ({seconds:.0f} s)", "-", "-"
        summary = json.loads((run_dir / "summary.json").read_text())
        accuracy = f"{100 * summary['test_acc']:.2f}%"
        return f"{seconds:.1f} s", accuracy, str(summary.get("weights_digest", "-"))[:12]


def threads_section(extra: Sequence[str], timeout: float, settings: Sequence[str]) -> str:
    rows = []
    for background in (0, 2):
        for threads in settings:
            with busy(background):
                load = load_average()
                wall, accuracy, digest = main_job(threads, extra, timeout)
            rows.append(
                [
                    f"threads={threads}",
                    f"+{background}" if background else "as it is",
                    f"{load:.1f}",
                    wall,
                    accuracy,
                    f"`{digest}`",
                ]
            )
    header = ["setting", "CPU-bound processes added", "load at start", "wall", "test acc", "digest"]
    return markdown_table(header, rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = [":---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def preamble(title: str, command: str, started: float) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    minutes = (time.perf_counter() - started) / 60
    return "\n".join(
        [
            f"## {title}",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine()}",
            f"- Date: {date}; section wall time {minutes:.1f} min; 1-min load average "
            f"{load_average():.2f} at the end (the machine is shared with other work)",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    parser.add_argument("--before", type=Path, default=None, help="another checkout to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per main job")
    parser.add_argument("--quick", action="store_true", help="debug=quick main jobs, 1 repeat")
    parser.add_argument(
        "--threads",
        default="1,null",
        help="comma-separated `threads` values of the main job; other than the default, the "
        "section is written as threads-<values>, beside the default one",
    )
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    command = "python scripts/benchmark_startup.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    chosen = SECTIONS if args.section == "all" else (args.section,)
    repeats = 1 if args.quick else args.repeats
    for section in chosen:
        started = time.perf_counter()
        if section == "startup":
            title = "Start-up: help, a misspelled override, compare (wall time, import time)"
            body = startup_section(args.before, repeats)
        else:
            settings = args.threads.split(",")
            title = "The main job on a busy machine: threads=" + " vs threads=".join(settings)
            extra = ["debug=quick"] if args.quick else []
            body = threads_section(extra, args.timeout, settings)
            if args.threads != "1,null":
                section = f"threads-{'-'.join(settings)}"
        text = f"{preamble(title, command.strip(), started)}\n\n{body}"
        print(text + "\n", flush=True)
        write_section(args.output, section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
