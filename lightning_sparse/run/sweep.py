"""Check every job of a sweep before the first one trains.

Hydra's basic sweeper composes each job only when the launcher reaches it, so a bad value in the
last job of a sweep (``recipe.pruning.final_sparsity=0.8,0.9,1.5``) surfaced after the others had
trained. :class:`SweepCheck` composes every job's config when the multirun starts and runs the
job's own checks on it (:func:`lightning_sparse.run.training.check_job`: recipe, trainer, paths,
objectives), so the sweep stops at once, naming each bad job and what is wrong.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from lightning_sparse.run.cli import compose_config, full_error_requested, user_message

__all__ = ["SweepCheck", "job_overrides"]

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper will launch them; None for other sweepers.

    A sweeper that chooses its jobs as it goes (Optuna) cannot be checked in advance.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = config.hydra.get("sweeper") or {}
    if sweeper.get("_target_") != _BASIC_SWEEPER:
        return None
    params = sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for job in batch]


class SweepCheck(HydraCallback):
    """Hydra callback: compose and check every job of a basic sweep before any job runs.

    When it acts: ``on_multirun_start``, before the launcher starts the first job. Jobs that
    ``resume`` a run are left to their own start (their config is the stored one).

    Raises:
        SystemExit: (code 1) some job's config is invalid; each is named with its overrides and
            the error, on stderr (``HYDRA_FULL_ERROR=1``: the first error is raised instead).
    """

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = job_overrides(config)
        if not jobs:
            return
        # Imported here: the check needs the techniques (torch, Lightning); a sweep trains anyway.
        from lightning_sparse.run.training import check_job

        config_name = str(config.hydra.job.config_name)
        problems = []
        for number, overrides in enumerate(jobs):
            try:
                cfg = compose_config(overrides, config_name=config_name)
                if OmegaConf.select(cfg, "resume", default=None):
                    continue
                check_job(cfg)
            except Exception as err:
                message = user_message(err)
                if message is None or full_error_requested():
                    raise
                problems.append(f"job {number} ({' '.join(overrides)}): {message}")
        if problems:
            count = f"{len(problems)} of {len(jobs)} sweep jobs"
            print(f"{count} would fail; no job was started:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            sys.stderr.flush()
            # Hydra turns a callback's exceptions into warnings; SystemExit passes through.
            raise SystemExit(1)
