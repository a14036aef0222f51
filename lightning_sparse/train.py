"""The main job: ``python -m lightning_sparse.train [overrides]`` trains, compresses and reports.

Flow of one run (see DESIGN.md): seed; validate the recipe (nothing is trained or written before it
passes, apart from Hydra's own ``.hydra/``); build data, model, callbacks and loggers; save the
resolved recipe; fit; test; write ``summary.json`` and print it as a table. Everything lands in the
Hydra run dir (``runs/<task_name>/<date>/<time>/``, see ``runs/README.md``).

Examples::

    python -m lightning_sparse.train recipe=gmp recipe.pruning.final_sparsity=0.95 seed=1
    python -m lightning_sparse.train -m recipe.pruning.final_sparsity=0.8,0.9,0.95
    python -m lightning_sparse.train trainer=ddp_sim
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_sparse import report
from lightning_sparse.recipe import (
    RecipeRecord,
    check_against_model,
    config_dir,
    instantiate_recipe,
    recipe_to_dict,
)

__all__ = ["RECIPE_FILE", "main", "run"]

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"


def _is_rank_zero() -> bool:
    # Set from the launcher's environment at import, so it is right before the Trainer has set up
    # the process group (a DDP child process reports global rank 0 until then).
    return getattr(rank_zero_only, "rank", 0) == 0


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    return Path(HydraConfig.get().runtime.output_dir)


def _recipe_name(cfg: DictConfig) -> str | None:
    """The recipe option chosen on the command line (``recipe=gmp``), when run through Hydra."""
    if not HydraConfig.initialized():
        return None
    name = HydraConfig.get().runtime.choices.get("recipe")
    return str(name) if name is not None else None


def _loggers(cfg: DictConfig) -> list[Logger] | bool:
    nodes = cfg.get("logger") or {}
    loggers = [instantiate(node) for node in nodes.values() if node and "_target_" in node]
    return loggers or False


def _progress_bar(trainer_kwargs: dict[str, Any]) -> list[Callback]:
    """A rich bar in a terminal; no bar in logs and pipes unless the trainer config asks for one."""
    interactive = sys.stdout.isatty()
    wanted = trainer_kwargs.pop("enable_progress_bar", None)
    show = interactive if wanted is None else bool(wanted)
    trainer_kwargs["enable_progress_bar"] = show
    return [RichProgressBar()] if show and interactive else []


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job from a composed config (``conf/train.yaml``); return its summary.

    Args:
        cfg: the composed config. ``output_dir`` (or Hydra's run dir) receives the outputs.

    Returns:
        The summary also written to ``<run dir>/summary.json`` (on rank zero).

    Raises:
        lightning_sparse.recipe.RecipeError: the recipe is invalid; raised before any training and
            before any file of the run (checkpoint, recipe, summary) is written.
    """
    pl.seed_everything(int(cfg.seed), workers=True)
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    recipe = recipe_to_dict(cfg.get("recipe"))
    recipe_callbacks = instantiate_recipe(recipe, trainer_kwargs)

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module: pl.LightningModule = instantiate(cfg.model)
    check_against_model(recipe_callbacks, module)

    run_dir = _run_dir(cfg)
    recipe_name = _recipe_name(cfg)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)
    callbacks: list[Callback] = [
        *recipe_callbacks.values(),
        RecipeRecord(recipe_name, recipe),
        checkpoint,
        *_progress_bar(trainer_kwargs),
    ]
    trainer = pl.Trainer(**trainer_kwargs, callbacks=callbacks, logger=_loggers(cfg))

    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(recipe), run_dir / RECIPE_FILE)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    val_acc = _metric(trainer.callback_metrics, "val/acc")
    test_acc: float | None = None
    if trainer.interrupted:
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
        checkpoint=checkpoint.last_model_path or None,
        run_dir=run_dir,
    )
    if trainer.is_global_zero:
        report.write_summary(summary, run_dir)
        report.print_summary(summary)
    return summary


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point (``lightning-sparse-train``); returns test accuracy for sweepers."""
    return run(cfg)["test_acc"]


if __name__ == "__main__":
    main()
