"""Weights & Biases tracking: the one module of the package that imports ``wandb``.

``logger=wandb`` (or ``logger=[csv,wandb]``) builds a :class:`WandbTracker`, a Lightning
``WandbLogger`` that never prompts and decides for itself whether it may go online:

* ``mode`` (``logger.wandb.mode``) or else ``WANDB_MODE`` chooses ``online``, ``offline`` or
  ``disabled`` explicitly;
* with neither set, the run is online only when wandb is configured (``WANDB_API_KEY``, or a
  ``wandb login`` entry in ``~/.netrc``) and the server answers, and offline otherwise;
* online without an API key, or without a reachable server, falls back to offline with a message
  (a prompt would hang a sweep job; a dead network would stall it for minutes). Offline runs are
  written to ``<run dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync <that dir>``.

Metrics reach wandb the Lightning way (``pl_module.log``: sparsity per layer and overall, phase
flags, losses, learning rate). :func:`log_results` adds what only exists at the end of a run: the
summary, the plots as images and the run's files (checkpoint, summary, recipe, environment) as an
artifact. :func:`finish` closes the wandb run at the end of every job, failed or not, so the next
job of a sweep starts its own run (a leftover run would be silently reused by the next logger).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

__all__ = [
    "DEFAULT_BASE_URL",
    "MODES",
    "WandbTracker",
    "credentials_configured",
    "finish",
    "log_results",
    "resolve_mode",
    "unreachable_reason",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
MODES = ("online", "offline", "disabled")
# wandb's older spellings, accepted where a user may still set them.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# Long enough for a real server on a slow link, short enough not to stall a sweep job on a dead one.
PROBE_TIMEOUT_S = 3.0
# wandb limits group and run names to 128 characters.
_NAME_LIMIT = 128


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def credentials_configured(base_url: str | None = None) -> bool:
    """Whether wandb has an API key without asking: ``WANDB_API_KEY`` or a netrc entry.

    The netrc file is ``$NETRC`` or ``~/.netrc`` (where ``wandb login`` stores the key), looked up
    for the host of ``base_url``. The key itself is neither returned nor logged.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url or _base_url()).hostname
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    if not host or not Path(path).is_file():
        return False
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def unreachable_reason(base_url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the wandb server cannot be reached (a TCP connect to it), or None when it can."""
    url = urlparse(base_url or _base_url())
    if not url.hostname:
        return f"WANDB_BASE_URL={base_url!r} names no host"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{url.hostname}:{port}: {err.strerror or err}"


def resolve_mode(mode: str | None = None) -> tuple[str, str | None]:
    """The wandb mode to use, and a message to show when it differs from what was asked.

    Args:
        mode: ``online``, ``offline``, ``disabled`` or None (then ``WANDB_MODE``, else automatic:
            online when configured and reachable, offline otherwise).

    Returns:
        ``(mode, message)``; ``message`` explains a fall-back to offline, else None.

    Raises:
        ValueError: ``mode`` (or ``WANDB_MODE``) is not one of :data:`MODES`.
    """
    source = "logger.wandb.mode"
    if mode is None and os.environ.get("WANDB_MODE"):
        mode, source = os.environ["WANDB_MODE"], "WANDB_MODE"
    if mode is not None:
        mode = _MODE_ALIASES.get(str(mode), str(mode))
        if mode not in MODES:
            raise ValueError(f"{source}={mode!r} is not allowed; choose one of {MODES}.")
        if mode != "online":
            return mode, None
    requested = mode == "online"
    base_url = _base_url()
    if not credentials_configured(base_url):
        if not requested:
            return "offline", None  # nothing configured: offline is the documented default
        return "offline", (
            f"wandb: {source}=online, but no API key is configured (WANDB_API_KEY or "
            "`wandb login`); logging offline instead of prompting for one."
        )
    reason = unreachable_reason(base_url)
    if reason is not None:
        return "offline", (
            f"wandb: online was requested but {base_url} cannot be reached ({reason}); logging "
            "offline instead. Upload later with `wandb sync <run dir>/wandb/offline-run-*`."
        )
    return "online", None


def _clip_start(text: str) -> str:
    # For sweep dirs: the end (date/time) tells sweeps apart.
    return text if len(text) <= _NAME_LIMIT else "…" + text[-(_NAME_LIMIT - 1) :]


def _clip_end(text: str) -> str:
    # For run names: the start (the job number) tells the jobs of a sweep apart.
    return text if len(text) <= _NAME_LIMIT else text[: _NAME_LIMIT - 1] + "…"


def _sweep_group() -> str | None:
    """The sweep a job belongs to (Hydra's sweep dir), or None outside a multirun."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return _clip_start(str(hydra_cfg.sweep.dir))


def _job_name() -> str | None:
    """A readable run name: job number and overrides (``3:recipe.pruning.final_sparsity=0.9``)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    overrides = str(hydra_cfg.job.override_dirname or "")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _clip_end(
            f"{hydra_cfg.job.num}:{overrides}" if overrides else str(hydra_cfg.job.num)
        )
    return _clip_end(overrides) if overrides else None


class WandbTracker(WandbLogger):
    """Lightning's ``WandbLogger`` that picks its mode safely and names runs after the sweep.

    When it acts: like any Lightning logger (the wandb run starts at the first log call, on rank
    zero only); :func:`log_results` and :func:`finish` act at the end of the job.

    Args:
        save_dir: where ``wandb/`` goes (the run dir).
        project: wandb project.
        entity: wandb entity (team or user); None uses the account's default.
        mode: ``online``, ``offline``, ``disabled`` or None (see :func:`resolve_mode`).
        group: wandb group; None groups the jobs of a multirun by their sweep dir.
        name: run name; None names it after the job's overrides.
        job_type: wandb job type (the task name).
        tags: wandb tags.
        log_files: log the run's files (checkpoint, summary, recipe, environment) as an artifact.
        **kwargs: passed on to ``WandbLogger`` and from there to ``wandb.init``.

    Raises:
        ModuleNotFoundError: wandb is not installed (the message names the extra to install).
        ValueError: ``mode`` (or ``WANDB_MODE``) is not one of :data:`MODES`.

    Example::

        python -m lightning_sparse.train logger=[csv,wandb] logger.wandb.project=my_project
    """

    def __init__(
        self,
        save_dir: str = ".",
        project: str = "lightning_sparse",
        entity: str | None = None,
        mode: str | None = None,
        group: str | None = None,
        name: str | None = None,
        job_type: str | None = None,
        tags: Sequence[str] = (),
        log_files: bool = True,
        **kwargs: Any,
    ) -> None:
        try:
            import wandb  # noqa: F401  (checked here, so the error names the fix)
        except ImportError as err:
            raise ModuleNotFoundError(
                "logger=wandb needs the wandb package: pip install 'lightning_sparse[tracking]'."
            ) from err
        resolved, message = resolve_mode(mode)
        if message and getattr(rank_zero_only, "rank", 0) == 0:
            log.warning(message)
        super().__init__(
            name=name or _job_name(),
            save_dir=save_dir,
            project=project,
            entity=entity,
            group=group or _sweep_group(),
            job_type=job_type,
            tags=list(tags),
            mode=resolved,
            log_model=False,  # the files go up as one artifact in log_results, at the job's end
            **kwargs,
        )
        # Lightning passes `anonymous=None` to wandb.init, which wandb >= 0.19 answers with "The
        # anonymous setting has no effect and will be removed" on every run; None means unset.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.mode = resolved
        self.fallback_message = message
        self.log_files = bool(log_files)

    @property
    def started(self) -> bool:
        """Whether this process started a wandb run (never on ranks other than zero)."""
        return self._experiment is not None

    def log_results(
        self, summary: Mapping[str, Any], files: Iterable[Path], images: Iterable[Path]
    ) -> None:
        """Summary metrics, plots as images and the run's files as one artifact."""
        import wandb

        run = self.experiment
        run.summary.update(_summary_metrics(summary))
        images = [Path(path) for path in images]
        if images:
            run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in images})
        files = [Path(path) for path in files if Path(path).is_file()]
        if self.log_files and files:
            artifact = wandb.Artifact(
                name=f"run-files-{run.id}",
                type="model",
                description="Checkpoint, summary, recipe and environment of one run.",
                metadata=_summary_metrics(summary),
            )
            for path in files:
                artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact)

    def close(self, error: BaseException | None = None) -> None:
        """Finish the wandb run, marked failed (exit code 1) with the error when there is one.

        Then wandb's background service is torn down: ``finish`` returns before that service has
        flushed the run's files, and a sweep worker (joblib, SLURM) may be stopped right after its
        job; the next run starts a fresh service, at the cost of a fraction of a second.
        """
        if not self.started:
            return
        import wandb

        run = self.experiment
        if error is not None:
            run.summary.update({"status": "failed", "error": f"{type(error).__name__}: {error}"})
        try:
            run.finish(exit_code=1 if error is not None else 0)
        finally:
            self._experiment = None
            wandb.teardown()


def _summary_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar part of a summary (and per-layer sparsity), as wandb summary values."""
    keys = ("status", "test_acc", "val_acc", "sparsity", "params_nonzero", "params_total", "seed")
    metrics: dict[str, Any] = {key: summary[key] for key in keys if key in summary}
    if summary.get("sparsity_per_layer"):
        metrics["sparsity_per_layer"] = dict(summary["sparsity_per_layer"])
    recipe = summary.get("recipe") or {}
    if recipe.get("name"):
        metrics["recipe"] = recipe["name"]
    return metrics


def _trackers(loggers: Iterable[Logger]) -> list[WandbTracker]:
    return [logger for logger in loggers if isinstance(logger, WandbTracker)]


def log_results(
    loggers: Iterable[Logger],
    summary: Mapping[str, Any],
    files: Iterable[Path] = (),
    images: Iterable[Path] = (),
) -> None:
    """Send the end-of-run results to every wandb logger among ``loggers`` (call on rank zero)."""
    files, images = list(files), list(images)
    for tracker in _trackers(loggers):
        tracker.log_results(summary, files, images)


def finish(loggers: Iterable[Logger], error: BaseException | None = None) -> None:
    """Finish the wandb run of every wandb logger among ``loggers``, failed when ``error`` is set.

    Never raises: it runs while a job is already failing, and must not hide that error.
    """
    for tracker in _trackers(loggers):
        try:
            tracker.close(error)
        except Exception as err:  # the job's own outcome matters more than the tracker's
            log.warning("wandb: could not finish the run cleanly: %s", err)
