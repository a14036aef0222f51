"""The main job: ``python -m lightning_sparse.train [overrides]`` trains, compresses and reports.

Flow of one run (see DESIGN.md): seed; check the trainer's strategy and validate the recipe (nothing
is trained or written before they pass, apart from Hydra's own ``.hydra/``); build data, model,
callbacks and loggers; save the resolved recipe and the environment; fit; test; write
``summary.json``, plots, and print the summary as a table; close the trackers. Everything lands in
the Hydra run dir (``runs/<task_name>/<date>/<time>/``, see ``runs/README.md``).

A job that raises records ``summary.json`` with ``status: failed`` and the error. In a single run
an error in the user's input (a config value, a path) then ends the process with its message
alone (exit code 1; the traceback is in ``train.log``), and any other error propagates with its
traceback; in a multirun the job returns None instead, so the sweep goes on with its other jobs,
and the sweep's report (:class:`lightning_sparse.compare.SweepReport`) lists the failed jobs and
makes the sweep exit non-zero at its end. Every job of a sweep is checked before the first one
runs (:class:`lightning_sparse.run.sweep.SweepCheck`).

Torch, Lightning and the job code are imported inside the job, so ``--help`` and a misspelled
key (:func:`lightning_sparse.run.cli.precheck_command_line`) answer in well under a second.

Examples::

    python -m lightning_sparse.train recipe=gmp recipe.pruning.final_sparsity=0.95 seed=1
    python -m lightning_sparse.train -m recipe.pruning.final_sparsity=0.8,0.9,0.95 seed=0,1,2
    python -m lightning_sparse.train trainer=ddp_sim
    python -m lightning_sparse.train hparams_search=pruning_pareto
    python -m lightning_sparse.train resume=runs/train/2026-11-26/10-00-00 trainer.max_epochs=60
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_sparse.run.cli import config_dir, precheck_command_line


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job from a composed config (``conf/train.yaml``), as ``oneshot.run`` and ``export.run``
    are for theirs; see :func:`lightning_sparse.run.training.run`."""
    from lightning_sparse.run.training import run as run_training

    return run_training(cfg)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def app(cfg: DictConfig) -> float | list[float] | None:
    """The Hydra app: one job from the composed config; returns the objectives for sweepers.

    Returns:
        ``objectives`` from the summary: a float for one, a list for several (multi-objective
        Optuna search), None for a failed job in a multirun.

    Raises:
        Exception: an unexpected error, in a single run (after recording it in summary.json); an
            error in the config or a path ends the process with its message instead (exit 1).
    """
    # Imported here, not at the top: `--help` and a misspelled override answer without torch.
    from lightning_sparse.run.training import run_job

    return run_job(cfg)


def main() -> None:
    """Console entry point (``lightning-sparse-train``): check the command line, run the app."""
    precheck_command_line("train")
    app()


if __name__ == "__main__":
    main()
