"""Helpers every entry point's job shares: run dir, recipe name, threads, paths, data, loggers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.core.checkpoint import readable_checkpoint

__all__ = [
    "CHECKPOINT_FIELDS",
    "ConfigError",
    "build_data",
    "check_paths",
    "check_threads",
    "is_multirun",
    "known_run_dir",
    "loggers",
    "recipe_name",
    "record_failure",
    "run_dir",
    "set_threads",
    "sweep_job_number",
]

log = logging.getLogger(__name__)

# Config keys that name a checkpoint (a file or a run dir); checked before a run writes anything.
CHECKPOINT_FIELDS = ("ckpt_path", "resume", "model.init_from")


class ConfigError(ValueError):
    """The run's configuration cannot work; the message names the config key and the fix."""


def is_multirun() -> bool:
    """Whether this job is one of a Hydra multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job_number() -> int | None:
    """The job's number within its multirun (0 for the first), None outside one."""
    return int(HydraConfig.get().job.num) if is_multirun() else None


def run_dir(cfg: DictConfig) -> Path:
    """Where the job writes: ``output_dir``, else Hydra's run dir."""
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    return Path(HydraConfig.get().runtime.output_dir)


def known_run_dir(cfg: DictConfig) -> Path | None:
    """:func:`run_dir`, or None outside a Hydra app when ``output_dir`` is Hydra's."""
    if not HydraConfig.initialized() and OmegaConf.is_interpolation(cfg, "output_dir"):
        return None
    return run_dir(cfg)


def recipe_name() -> str | None:
    """The recipe option chosen (``recipe=gmp``), when run through Hydra."""
    if not HydraConfig.initialized():
        return None
    name = HydraConfig.get().runtime.choices.get("recipe")
    return str(name) if name is not None else None


def check_threads(threads: Any) -> None:
    """Raise :class:`ConfigError` unless ``threads`` is an integer >= 1 or None."""
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(
            f"`threads`={threads!r} is not allowed; give an integer >= 1, or null for torch's "
            "default (one per core)."
        )


# The export's timed runs per model when a config does not say (one stored before the key existed).
LATENCY_RUNS = 50


def latency_runs(cfg: Any) -> int:
    """The job's ``latency_runs`` (checked; :data:`LATENCY_RUNS` when the config has none).

    Raises:
        ConfigError: it is not an integer >= 1.
    """
    runs = cfg.get("latency_runs", LATENCY_RUNS)
    check_latency_runs(runs)
    return int(runs)


def check_latency_runs(runs: Any) -> None:
    """Raise :class:`ConfigError` unless ``runs`` (timed ONNX Runtime runs per model) is >= 1."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(
            f"`latency_runs`={runs!r} is not allowed; give the number of timed ONNX Runtime runs "
            "per model in the export's latency measurement, an integer >= 1 (default 50)."
        )


def set_threads(threads: Any) -> int:
    """Set torch's intra-op thread count (None: leave torch's default); return the count in force.

    Raises:
        ConfigError: ``threads`` is not an integer >= 1 (or null).
    """
    check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_paths(cfg: DictConfig) -> None:
    """Check every path the config names before anything is written or built.

    Checkpoints (:data:`CHECKPOINT_FIELDS`; a recipe's teacher checkpoint is checked by its
    technique when the recipe is built) must open as checkpoints; ``data.root`` must exist unless
    the data module may download into it (``data.download: true``).

    Raises:
        FileNotFoundError: a path does not exist (the message names the field and the path).
        lightning_sparse.core.checkpoint.NotACheckpointError: a checkpoint is truncated or not a
            torch file.
    """
    for field in CHECKPOINT_FIELDS:
        value = OmegaConf.select(cfg, field, default=None)
        if value:
            readable_checkpoint(str(value), field=field)
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "root" in data and not OmegaConf.is_missing(data, "root"):
        root = data.get("root")
        if root is not None and not data.get("download", False) and not Path(root).exists():
            raise FileNotFoundError(
                f"`data.root`={str(root)!r}: not found; point it at the data's folder"
                f"{' (or set data.download=true)' if 'download' in data else ''}."
            )


def build_data(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.data``; a ``num_classes`` left out (``???``) is counted from the data.

    An image folder's class count is the number of its class folders: asking the user to count
    them would only add a way to get it wrong. The count is written into ``cfg.data.num_classes``
    so that the model (``${data.num_classes}``) and the stored config see it.

    Raises:
        ConfigError: ``data.num_classes`` is missing and the data module cannot count its classes.
    """
    if not OmegaConf.is_missing(cfg.data, "num_classes"):
        return instantiate(cfg.data)
    datamodule: pl.LightningDataModule = instantiate(cfg.data, num_classes=None)
    counted = getattr(datamodule, "num_classes", None)
    if not isinstance(counted, int):
        raise ConfigError(
            f"`data.num_classes` is required for {type(datamodule).__name__}: add "
            "data.num_classes=<number of classes> to the command line."
        )
    cfg.data.num_classes = counted
    log.info("data.num_classes=%d, counted from the data.", counted)
    return datamodule


def loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers of ``cfg.logger`` (a dict of ``_target_`` nodes; none when it is empty)."""
    nodes = cfg.get("logger") or {}
    return [instantiate(node) for node in nodes.values() if node and "_target_" in node]


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """Write ``summary.json`` with ``status: failed`` (rank zero); never raises over ``error``."""
    from lightning.pytorch.utilities import rank_zero_only

    from lightning_sparse.run import report

    # The launcher's rank, right even before the Trainer set up the process group.
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    try:
        seed = cfg.get("seed")
        summary = report.failure_summary(
            error,
            seed=int(seed) if isinstance(seed, int) else None,
            recipe_name=recipe_name(),
            run_dir=run_dir(cfg),
            environment=report.environment_info(),
        )
        report.write_summary(summary, run_dir(cfg))
    except Exception as record_error:
        log.error("Could not record the failure in summary.json: %s", record_error)
