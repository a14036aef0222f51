"""Compare the runs of a sweep: ``python -m lightning_sparse.compare <sweep dir>``.

Prints a markdown table of every run found under the sweep dir (recipe, the overrides that differ
between runs, status, test accuracy, sparsity, nonzero parameters, and size and latency where a
summary has them), writes it to ``<sweep dir>/compare.md`` and plots accuracy against nonzero
parameters, the Pareto front highlighted, to ``<sweep dir>/pareto.png``.

A run is a directory holding ``summary.json`` or Hydra's ``.hydra/overrides.yaml``. A run whose
summary says ``status: failed``, or that has no (readable) summary at all, is listed as failed
with its error; it never stops the comparison of the others. Size and latency columns appear when
any summary has them (:data:`SIZE_KEYS`, :data:`LATENCY_KEYS`: the compressed file's bytes and the
ONNX Runtime latency that ``lightning_sparse.export`` measures, int8 when quantized).

The same report runs by itself at the end of every multirun (:class:`SweepReport`, registered
under ``hydra.callbacks`` in ``conf/train.yaml``), which also makes the sweep exit non-zero when a
job failed.

Example::

    python -m lightning_sparse.train -m recipe.pruning.final_sparsity=0.8,0.9,0.95 seed=0,1,2
    python -m lightning_sparse.compare runs/train/multirun/2026-01-31/12-00-00
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_sparse.run.compare import SweepReport, write_report

__all__ = ["SweepReport", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the markdown table, write ``compare.md`` and ``pareto.png``.

    Returns:
        0 when runs were found (failed ones included), 2 when the folder is missing or holds none.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_sparse.compare",
        description="Compare the runs of a sweep: markdown table and Pareto plot.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep dir (runs/<task>/multirun/…)")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where compare.md and pareto.png go"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip pareto.png")
    args = parser.parse_args(argv)
    try:
        text, records, plot_path = write_report(
            args.sweep_dir, args.output_dir, plot=not args.no_plot
        )
    except FileNotFoundError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    if not records:
        print(
            f"compare: no runs under {args.sweep_dir} (a run has summary.json or "
            ".hydra/overrides.yaml).",
            file=sys.stderr,
        )
        return 2
    print(text, end="")
    if plot_path is not None:
        print(f"\nPareto plot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
