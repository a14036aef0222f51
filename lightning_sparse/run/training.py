"""One training job from a composed config: check, fit, test, export, report."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
)
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)

# Lightning exports its launchers only under a private name; it is the one way to tell whether the
# trainer will start its other ranks itself by re-running the command line.
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.callbacks.base import CompressionCallback
from lightning_sparse.core.checkpoint import CHECKPOINT_IN_RUN_DIR
from lightning_sparse.deploy.export import export_model
from lightning_sparse.run import cli, job, report, tracking
from lightning_sparse.run.baseline import (
    BASELINES,
    DenseSnapshot,
    compression_start,
    dense_factory,
    dense_reference,
    evaluate_accuracy,
    quiet_kwargs,
)
from lightning_sparse.run.console import setup_job_output
from lightning_sparse.run.job import ConfigError
from lightning_sparse.run.recipe import (
    RecipeRecord,
    check_against_model,
    instantiate_nodes,
    instantiate_recipe,
    recipe_to_dict,
    single_process,
)
from lightning_sparse.run.recipe_file import apply_recipe_file
from lightning_sparse.run.resume import RESUME_FILE, resume_config

__all__ = [
    "OBJECTIVE_KEYS",
    "RANKS_DIR",
    "RECIPE_FILE",
    "ConfigError",
    "check_baseline",
    "check_job",
    "check_strategy",
    "objective_names",
    "objective_values",
    "run",
]

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
RANKS_DIR = "ranks"
# Summary keys a sweeper may optimise (`objectives: [...]` in the config). val_acc is the
# validation accuracy at the end of training (the last validation pass, not the best epoch's).
OBJECTIVE_KEYS = (
    "test_acc",
    "val_acc",
    "sparsity",
    "params_nonzero",
    "params_total",
    "macs",
    "ort_fp32_ms",
    "ort_int8_ms",
    "compressed_bytes",
)
# Those the export measures (deploy.export): with `export: false` the summary has none of them.
EXPORT_OBJECTIVES = ("macs", "ort_fp32_ms", "ort_int8_ms", "compressed_bytes")


def _is_rank_zero() -> bool:
    # Set from the launcher's environment at import, so it is right before the Trainer has set up
    # the process group (a DDP child process reports global rank 0 until then).
    return getattr(rank_zero_only, "rank", 0) == 0


def _supports_whole_parameters(strategy: type) -> bool:
    # DeepSpeed derives from DDPStrategy but shards parameters (ZeRO), so it is excluded by name.
    return issubclass(strategy, (DDPStrategy, SingleDeviceStrategy)) and not issubclass(
        strategy, DeepSpeedStrategy
    )


def check_strategy(trainer_kwargs: Mapping[str, Any]) -> None:
    """Refuse a ``trainer.strategy`` that shards parameters (FSDP, DeepSpeed), before any work.

    The compression callbacks refuse such strategies too, but only in ``setup``, after data and
    model are built and processes launched; this check names the config key at once.

    Raises:
        ConfigError: the strategy keeps parameters sharded across processes; the message lists the
            strategies that work.
    """
    strategy = trainer_kwargs.get("strategy", "auto")
    # Unknown names are left to Lightning, whose error lists its registry.
    if not isinstance(strategy, str) or strategy == "auto" or strategy not in StrategyRegistry:
        return
    strategy_class = StrategyRegistry[strategy]["strategy"]
    if _supports_whole_parameters(strategy_class):
        return
    supported = sorted(
        name
        for name in StrategyRegistry.available_strategies()
        if _supports_whole_parameters(StrategyRegistry[name]["strategy"])
        and not name.startswith(("single_tpu", "single_xla", "xla"))
    )
    raise ConfigError(
        f"trainer.strategy={strategy!r} ({strategy_class.__name__}) is not supported: compression "
        "needs every parameter whole on each process (masks, sparsity measurement), and this "
        "strategy shards them. Use trainer.strategy=ddp for several GPUs or nodes; supported: "
        f"auto, {', '.join(supported)}."
    )


def _check_launch(trainer: pl.Trainer) -> None:
    """Refuse a trainer that would start its own DDP processes inside a Hydra multirun.

    Lightning starts ranks 1.. of ``strategy=ddp`` by re-running the command line; inside a
    multirun that command is the whole sweep, so every rank would run every job.
    """
    if not job.is_multirun():
        return
    if isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher):
        raise ConfigError(
            "trainer.strategy=ddp with several local processes cannot run inside a Hydra "
            "multirun: Lightning starts the other ranks by re-running the command line, which "
            "would re-run the whole sweep in each of them. In a local sweep give each job one "
            "process (trainer=cpu or trainer=gpu; jobs in parallel with hydra/launcher=joblib); "
            "on a cluster use hydra/launcher=slurm (one task per device) or torchrun, which "
            "start every rank themselves."
        )


def objective_names(cfg: DictConfig) -> list[str]:
    """The summary keys ``main`` returns to a sweeper (``objectives`` in the config).

    Raises:
        ConfigError: ``objectives`` is empty or names a key that is not in :data:`OBJECTIVE_KEYS`.
    """
    raw = cfg.get("objectives") or ["test_acc"]
    names = [str(raw)] if isinstance(raw, str) else [str(name) for name in raw]
    for name in names:
        if name not in OBJECTIVE_KEYS:
            raise ConfigError(
                f"objectives: {name!r} is not a summary metric; choose from {OBJECTIVE_KEYS}."
            )
        if name in EXPORT_OBJECTIVES and not cfg.get("export", True):
            raise ConfigError(
                f"objectives: {name!r} is measured by the export, which `export`=false skips; "
                "set export=true or choose another objective."
            )
    return names


def objective_values(
    summary: Mapping[str, Any], names: Sequence[str]
) -> float | list[float] | None:
    """What a sweeper gets: one float, a list of floats (multi-objective), or None.

    None stands for "no result" (a failed or interrupted run, or a metric that was not measured):
    Hydra's Optuna sweeper records such a trial as failed and goes on, while a NaN in a
    multi-objective list would make Optuna raise and stop the search.
    """
    if summary.get("status", report.STATUS_OK) != report.STATUS_OK:
        return None
    values: list[float] = []
    for name in names:
        value = summary.get(name)
        if value is None or not math.isfinite(float(value)):
            return None
        values.append(float(value))
    return values[0] if len(values) == 1 else values


def check_baseline(cfg: DictConfig, trainer_kwargs: Mapping[str, Any]) -> str | None:
    """The ``baseline`` to report (:mod:`lightning_sparse.baseline`), checked before any work.

    Raises:
        ConfigError: an unknown value, or ``train`` with several processes.
    """
    baseline = cfg.get("baseline")
    if baseline is None:
        return None
    if baseline not in BASELINES:
        raise ConfigError(
            f"`baseline`={baseline!r} is not allowed; choose one of {BASELINES} or null."
        )
    if baseline == "train" and not single_process(trainer_kwargs):
        devices = trainer_kwargs.get("devices", 1)
        raise ConfigError(
            f"`baseline`=train trains the dense model in this job, on one process; with "
            f"trainer.devices={devices!r} and trainer.num_nodes="
            f"{trainer_kwargs.get('num_nodes', 1)} use baseline=snapshot, or run recipe=dense as "
            "a job of its own."
        )
    return str(baseline)


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _job_config(cfg: DictConfig, resolve: bool = True) -> dict[str, Any]:
    """The job's config as plain data (interpolations resolved or kept), without Hydra's node."""
    keys = [str(key) for key in cfg if key != "hydra"]
    data = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=resolve)
    assert isinstance(data, dict)
    return {str(key): value for key, value in data.items()}


def check_job(cfg: DictConfig) -> tuple[dict[str, Any], str | None, dict[str, Callback]]:
    """Every check of a job's config that needs no data and no model; nothing is written.

    Run by :func:`run` first, and for every job of a sweep before its first job trains
    (:class:`lightning_sparse.run.sweep.SweepCheck`).

    Returns:
        The trainer's keyword arguments, the ``baseline``, and the recipe's callbacks (built).

    Raises:
        ConfigError: ``threads``, ``latency_runs``, ``trainer.strategy``, ``objectives`` or
            ``baseline`` cannot work, or the recipe holds one-shot steps.
        lightning_sparse.recipe.RecipeError: the recipe is invalid.
        FileNotFoundError, NotACheckpointError: a path (``ckpt_path``, ``model.init_from``,
            ``data.root``, a teacher checkpoint) is missing or not a checkpoint.
    """
    job.check_threads(cfg.get("threads"))
    job.latency_runs(cfg)
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    check_strategy(trainer_kwargs)
    objective_names(cfg)
    baseline = check_baseline(cfg, trainer_kwargs)
    if cfg.get("oneshot"):
        raise ConfigError(
            f"`oneshot` holds one-shot steps ({', '.join(cfg.oneshot)}), which `train` does not "
            "run: use `python -m lightning_sparse.oneshot ckpt_path=<trained run> "
            "recipe=<the same recipe>`, or a training recipe here (recipe=gmp, ...)."
        )
    job.check_paths(cfg)
    recipe_callbacks = instantiate_recipe(recipe_to_dict(cfg.get("recipe")), trainer_kwargs)
    return trainer_kwargs, baseline, recipe_callbacks


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job from a composed config (``conf/train.yaml``); return its summary.

    Args:
        cfg: the composed config. ``output_dir`` (or Hydra's run dir) receives the outputs. With
            ``resume``, the run it names continues with its stored config
            (:mod:`lightning_sparse.resume`).

    Returns:
        The summary also written to ``<run dir>/summary.json`` (on rank zero).

    Raises:
        ConfigError: ``threads`` or ``trainer.strategy`` cannot work, ``objectives`` names an
            unknown metric, or local DDP processes were asked for inside a multirun; raised before
            any training and before any file of the run is written.
        lightning_sparse.recipe.RecipeError: the recipe is invalid; raised likewise.
        lightning_sparse.resume.ResumeError: ``resume`` cannot continue the run it names.
        FileNotFoundError: a path the config names does not exist; raised likewise.
    """
    recipe_name = job.recipe_name()
    if cfg.get("resume"):
        cfg, recipe_name = resume_config(cfg)
    elif cfg.get("recipe_file"):  # a SparseML recipe in place of the recipe group
        cfg, recipe_name = apply_recipe_file(cfg)
    job.set_threads(cfg.get("threads"))
    pl.seed_everything(int(cfg.seed), workers=True)
    trainer_kwargs, baseline, recipe_callbacks = check_job(cfg)
    recipe = recipe_to_dict(cfg.get("recipe"))

    datamodule = job.build_data(cfg)
    module: pl.LightningModule = instantiate(cfg.model)
    check_against_model(recipe_callbacks, module)
    _check_data_fits_model(datamodule, module)

    run_dir = job.run_dir(cfg)
    history = report.SparsityHistory()
    loggers = job.loggers(cfg)
    start = compression_start(recipe_callbacks.values())
    snapshot = DenseSnapshot(start) if baseline == "snapshot" and start > 0 else None
    callbacks: list[Callback] = [
        *([snapshot] if snapshot else []),  # first: it keeps the weights before any technique acts
        *recipe_callbacks.values(),
        history,  # after the techniques, so it measures what they applied
        # The recipe, and the whole config that `resume=` continues with, in every checkpoint.
        RecipeRecord(recipe_name, recipe, config=_job_config(cfg, resolve=False)),
        *trainer_callbacks(cfg, run_dir, trainer_kwargs, has_logger=bool(loggers)),
    ]
    trainer = pl.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False)
    _check_launch(trainer)

    try:
        summary = _fit_test_report(
            cfg,
            trainer,
            module,
            datamodule,
            recipe_name,
            recipe,
            recipe_callbacks,
            history,
            loggers,
            baseline=lambda: _baseline(
                cfg, baseline, snapshot, trainer, module, datamodule, trainer_kwargs
            ),
            snapshot=snapshot,
        )
    except BaseException as err:
        tracking.finish(loggers, error=err)
        raise
    tracking.finish(loggers)
    return summary


def trainer_callbacks(
    cfg: DictConfig, run_dir: Path, trainer_kwargs: dict[str, Any], *, has_logger: bool
) -> list[Callback]:
    """The ``callbacks`` group's callbacks, fitted to this run; sets the trainer's switches.

    The checkpoint callback must keep ``<run dir>/checkpoints/last.ckpt`` (``resume=``,
    ``oneshot``, ``export`` and ``model.init_from`` read it); without one the run saves none. The
    learning-rate monitor needs a logger and is left out without one. The model summary prints
    when ``trainer.enable_model_summary`` is true, in the first job of a sweep only. A progress
    bar shows unless ``trainer.enable_progress_bar`` is false.

    Raises:
        lightning_sparse.recipe.RecipeError: a node does not build (names ``callbacks.<entry>``).
        ConfigError: no configured ``ModelCheckpoint`` keeps ``last.ckpt`` in the run dir.
    """
    built = instantiate_nodes(cfg.get("callbacks"), "callbacks", Callback, "a lightning Callback")
    checkpoints = {n: c for n, c in built.items() if isinstance(c, ModelCheckpoint)}
    expected = run_dir / CHECKPOINT_IN_RUN_DIR.parent
    keeps_last = [
        c for c in checkpoints.values() if c.dirpath and Path(c.dirpath) == expected and c.save_last
    ]
    if checkpoints and not keeps_last:
        names = ", ".join(f"callbacks.{name}" for name in checkpoints)
        raise ConfigError(
            f"{names}: no checkpoint callback keeps {CHECKPOINT_IN_RUN_DIR} in the run dir, which "
            "resume=, oneshot, export and model.init_from read; keep dirpath: "
            "${output_dir}/checkpoints and save_last: true (add another ModelCheckpoint for "
            "other checkpoints)."
        )
    if not checkpoints:
        trainer_kwargs["enable_checkpointing"] = False
    show_summary = bool(trainer_kwargs.pop("enable_model_summary", True))
    show_summary = show_summary and (job.sweep_job_number() or 0) == 0
    # Ours prints the summary; Lightning would add its own (and say so) unless told not to.
    trainer_kwargs["enable_model_summary"] = False
    wanted_bar = trainer_kwargs.pop("enable_progress_bar", None)
    kept: list[Callback] = []
    for callback in built.values():
        if isinstance(callback, LearningRateMonitor) and not has_logger:
            continue
        if isinstance(callback, ModelSummary) and not show_summary:
            continue
        if isinstance(callback, ProgressBar) and wanted_bar is False:
            continue
        kept.append(callback)
    has_bar = any(isinstance(c, ProgressBar) for c in kept)
    trainer_kwargs["enable_progress_bar"] = has_bar or bool(wanted_bar)
    return kept


def _check_data_fits_model(datamodule: pl.LightningDataModule, module: pl.LightningModule) -> None:
    """Have the data in place and its class count matching the model's, before anything is written.

    Lightning would find both out itself, but only after the run dir holds a recipe and a config.
    """
    if _is_rank_zero():
        datamodule.prepare_data()  # a missing data set fails here, naming its path and the fix
    data_classes = getattr(datamodule, "num_classes", None)
    model_classes = getattr(module, "num_classes", None)
    if data_classes is not None and model_classes is not None and data_classes != model_classes:
        raise ConfigError(
            f"`data.num_classes`={data_classes} but the model predicts `model.num_classes`="
            f"{model_classes} classes; make them equal (model configs interpolate "
            "${data.num_classes} unless overridden)."
        )


def export_batches(limit_test_batches: Any) -> int | None:
    """The test batches the export evaluates on: as many as the run's test pass when
    ``trainer.limit_test_batches`` is a count (e.g. ``debug=quick``'s 1), else all of them."""
    if isinstance(limit_test_batches, int) and not isinstance(limit_test_batches, bool):
        return limit_test_batches if limit_test_batches >= 1 else None
    return None


def _fit_test_report(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    recipe_name: str | None,
    recipe: dict[str, dict[str, Any]],
    recipe_callbacks: Mapping[str, Callback],
    history: report.SparsityHistory,
    loggers: Sequence[Logger],
    baseline: Callable[[], dict[str, Any]],
    snapshot: DenseSnapshot | None = None,
) -> dict[str, Any]:
    """Write recipe and environment, fit, test, then summary, plots, trackers and rank report.

    ``baseline`` gives the dense accuracy's summary entries (every rank, after a complete run);
    ``snapshot`` the run's dense snapshot, if it keeps one (the export times the dense model).
    """
    run_dir = job.run_dir(cfg)
    last = run_dir / CHECKPOINT_IN_RUN_DIR
    environment = report.environment_info()
    wrote: list[str] = []  # what this rank wrote into the run dir: rank zero only, checked by tests
    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(recipe), run_dir / RECIPE_FILE)
        report.write_json(environment, run_dir / report.ENVIRONMENT_FILE)
        wrote += [RECIPE_FILE, report.ENVIRONMENT_FILE]
        if cfg.get("resume"):
            resumed = {"checkpoint": cfg.ckpt_path, "config": _job_config(cfg, resolve=False)}
            OmegaConf.save(OmegaConf.create(resumed), run_dir / RESUME_FILE)
            wrote.append(RESUME_FILE)
        config = _job_config(cfg)
        for logger in loggers:  # the whole resolved config, recipe included, to every logger
            logger.log_hyperparams(config)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    val_acc = _metric(trainer.callback_metrics, "val/acc")
    test_acc: float | None = None
    status = report.STATUS_OK
    if trainer.interrupted:
        status = report.STATUS_INTERRUPTED
        log.warning("Training was interrupted; skipping the test and reporting what was trained.")
    else:
        # The module, not a checkpoint: test the final (fully pruned) weights, not a "best" epoch
        # that may predate the last pruning step.
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        test_acc = _metric(results[0] if results else {}, "test/acc")

    summary = report.build_summary(
        module,
        trainer.callbacks,  # type: ignore[attr-defined]
        test_acc=test_acc,
        val_acc=val_acc,
        seed=int(cfg.seed),
        epochs=trainer.current_epoch,
        recipe_name=recipe_name,
        recipe=recipe,
        checkpoint=str(last) if last.is_file() else None,
        run_dir=run_dir,
        status=status,
        environment=environment,
    )
    if cfg.get("resume"):
        summary["resumed_from"] = str(cfg.ckpt_path)
    if status == report.STATUS_OK:
        summary.update(baseline())
    if trainer.is_global_zero:
        if cfg.get("export", True) and status == report.STATUS_OK:
            # ONNX fp32 (and int8 after QAT) and the compressed checkpoint, measured with ONNX
            # Runtime next to the run's dense model; rank zero only, with no collectives, so
            # other ranks need not wait.
            dense = dense_reference(snapshot, module, dense_factory(cfg.model))
            summary.update(
                export_model(
                    module,
                    datamodule,
                    run_dir / "export",
                    threads=cfg.get("threads"),
                    latency_runs=job.latency_runs(cfg),
                    dense=dense,
                    eval_batches=export_batches(trainer.limit_test_batches),
                    deployments=[
                        form
                        for cb in recipe_callbacks.values()
                        if isinstance(cb, CompressionCallback) and (form := cb.deployment())
                    ],
                )
            )
            wrote.append("export")
        report.write_summary(summary, run_dir)
        wrote.append(report.SUMMARY_FILE)
        images = _plots(summary, recipe_callbacks, history, trainer, run_dir)
        files = [
            Path(summary["checkpoint"]) if summary["checkpoint"] else None,
            run_dir / report.SUMMARY_FILE,
            run_dir / RECIPE_FILE,
            run_dir / report.ENVIRONMENT_FILE,
            run_dir / ".hydra" / "config.yaml",
            *sorted((run_dir / "export").glob("*")),  # exported models, when a run exports
        ]
        tracking.log_results(loggers, summary, [f for f in files if f is not None], images)
        report.print_summary(summary)
    if cfg.get("debug", {}).get("rank_report"):
        _write_rank_report(trainer, module, recipe_callbacks, run_dir, val_acc, wrote)
    return summary


def _baseline(
    cfg: DictConfig,
    baseline: str | None,
    snapshot: DenseSnapshot | None,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    trainer_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """``dense_test_acc`` and how it was measured (``dense_baseline``), or nothing."""
    if baseline == "snapshot":
        dense = snapshot.model(module, dense_factory(cfg.model)) if snapshot is not None else None
        if dense is None:
            log.info("baseline=snapshot: the recipe compresses from epoch 0, so no dense snapshot.")
            return {"dense_test_acc": None, "dense_baseline": {"kind": "snapshot", "epoch": None}}
        assert snapshot is not None
        return {
            "dense_test_acc": evaluate_accuracy(trainer, dense, datamodule),
            "dense_baseline": {"kind": "snapshot", "epoch": snapshot.taken_at},
        }
    if baseline == "train":
        # Built in the order `run` builds them after the same seed: a `recipe=dense` run's model.
        pl.seed_everything(int(cfg.seed), workers=True)
        dense_data: pl.LightningDataModule = instantiate(cfg.data)
        dense_model: pl.LightningModule = instantiate(cfg.model)
        log.info("baseline=train: training the dense model with the same settings.")
        dense_trainer = pl.Trainer(**quiet_kwargs(trainer_kwargs))
        dense_trainer.fit(dense_model, datamodule=dense_data)
        return {
            "dense_test_acc": evaluate_accuracy(dense_trainer, dense_model, dense_data),
            "dense_baseline": {"kind": "train", "epochs": dense_trainer.current_epoch},
        }
    return {}


def _plots(
    summary: Mapping[str, Any],
    recipe_callbacks: Mapping[str, Callback],
    history: report.SparsityHistory,
    trainer: pl.Trainer,
    run_dir: Path,
) -> list[Path]:
    """Per-layer sparsity and the sparsity schedule as PNGs in ``<run dir>/plots`` (rank zero)."""
    if not report.plots_available():
        log.info("matplotlib is not installed (extra `plots`): no plots.")
        return []
    plots = run_dir / report.PLOTS_DIR
    images = [
        report.plot_sparsity_per_layer(
            summary["sparsity_per_layer"], plots / "sparsity_per_layer.png"
        )
    ]
    # Any technique that declares a target curve gets one.
    schedules = {
        name: functools.partial(_target_sparsity, technique)
        for name, technique in recipe_callbacks.items()
        if isinstance(technique, CompressionCallback) and technique.target_curve([0.0]) is not None
    }
    if schedules or history.history:
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 0
        images.append(
            report.plot_sparsity_schedule(
                history.history, schedules, max_epochs, plots / "sparsity_schedule.png"
            )
        )
    return images


def _target_sparsity(technique: CompressionCallback, epochs: list[float]) -> list[float]:
    curve = technique.target_curve(epochs) or {}
    return next(iter(curve.values()), [0.0] * len(epochs))


def _write_rank_report(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    recipe_callbacks: Mapping[str, Callback],
    run_dir: Path,
    val_acc: float | None,
    wrote: list[str],
) -> None:
    """``<run dir>/ranks/rank<r>.json``: what this rank holds, to compare across DDP ranks.

    Written by every rank when ``debug.rank_report=true``: digests of each technique's masks and
    of the module's state, the metrics as this rank sees them, and the files it wrote.
    """
    masks: dict[str, str] = {}
    for entry, callback in recipe_callbacks.items():
        technique_masks = callback.masks if isinstance(callback, CompressionCallback) else {}
        for name, mask in technique_masks.items():
            masks[f"{entry}/{name}"] = report.tensor_digest(mask)
    # Each technique's whole resumable state (quantization scales, a distillation teacher, ...).
    states = {
        entry: report.weights_digest(_flatten_state(callback.state_dict()))
        for entry, callback in recipe_callbacks.items()
    }
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    report.write_json(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "masks": masks,
            "states": states,
            "state_dict": report.weights_digest(module.state_dict()),
            "val_acc": val_acc,
            "metrics": metrics,
            "wrote": wrote,
        },
        run_dir / RANKS_DIR / f"rank{trainer.global_rank}.json",
    )


def _flatten_state(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested callback state by path; other leaves as the bytes of their repr."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items: Any = None
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    if items is None:
        return {prefix: torch.tensor(list(repr(state).encode()), dtype=torch.uint8)}
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        flat.update(_flatten_state(value, f"{prefix}/{key}"))
    return flat


def _close_process_group() -> None:
    """Destroy the DDP process group at the end of a successful run (a no-op without one).

    Lightning leaves it open; torch then tears gloo down during interpreter exit, where its worker
    threads can abort the process ("terminate called without an active exception") after all the
    work was done and written. Only after success: a collective cleanup while another rank is
    failing could hang.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_job(cfg: DictConfig) -> float | list[float] | None:
    """One job as the entry point runs it: :func:`run`, a failure recorded, the objectives returned.

    An error in the user's input (a config value, a path: see
    :func:`lightning_sparse.run.cli.user_message`) ends a single run with its message alone and
    exit code 1, its traceback in the run's log file; in a sweep the job's message is logged and
    the sweep goes on.

    Returns:
        ``objectives`` from the summary: a float for one, a list for several (multi-objective
        Optuna search), None for a failed job in a multirun.

    Raises:
        Exception: an unexpected error, in a single run (after recording it in summary.json).
    """
    setup_job_output()
    try:
        summary = run(cfg)
        _close_process_group()
    except Exception as err:
        job.record_failure(cfg, err)
        if not job.is_multirun():
            cli.exit_on_user_error(err)
            raise
        # One failed job must not stop a sweep: Hydra would re-raise it after the batch (and the
        # Optuna sweeper stop the search); SweepReport reports it at the end instead.
        message = cli.user_message(err)
        if message is None:
            log.error("Job failed; recorded in summary.json, the sweep goes on.", exc_info=True)
        else:
            cli.log_traceback(err)
            log.error("Job failed: %s (recorded in summary.json; the sweep goes on).", message)
        return None
    return objective_values(summary, objective_names(cfg))
