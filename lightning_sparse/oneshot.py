"""One-shot (post-training) compression of a trained model: ``python -m lightning_sparse.oneshot``.

Flow of one run: load the trained checkpoint into the configured model (every key must match);
validate the one-shot steps, the optional fine-tune recipe and the calibration data (nothing is
computed or written before all of it passes, apart from Hydra's own ``.hydra/``); evaluate; apply
the steps in order (pruning by weight magnitude or by Wanda's data-aware score, using calibration
batches from the training data); evaluate; optionally fine-tune for ``finetune_epochs`` with the
recipe's callbacks (``ConstantPruning`` holding every zero); evaluate; write the model to
``checkpoints/last.ckpt`` (it loads into the plain model with ``strict=True``) and
``summary.json`` with the accuracy before and after, the sparsity and the criterion.

A step is a :class:`OneShotStep`: configured by its constructor, checked against the model before
any work, applied once. Steps run in the order of the recipe's ``oneshot:`` entries, before the
fine-tune; a step whose class sets ``after_finetune = True`` runs after it (where post-training
quantization will go, to calibrate the weights that are finally kept).

Examples::

    python -m lightning_sparse.oneshot ckpt_path=runs/train/2026-01-01/12-00-00
    python -m lightning_sparse.oneshot recipe=oneshot_wanda oneshot.pruning.sparsity=0.7 \\
        ckpt_path=runs/train/2026-01-01/12-00-00 finetune_epochs=3
    python -m lightning_sparse.oneshot -m recipe=oneshot_magnitude,oneshot_wanda \\
        oneshot.pruning.sparsity=0.5,0.7,0.9 ckpt_path=...

From Python::

    module = ClassificationModule(SmallCNN(), init_from="runs/train/...")
    summary = oneshot(module, DigitsDataModule(), [OneShotPruning(0.7, criterion="wanda")])
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lightning_sparse.core.checkpoint import checkpoint_path
from lightning_sparse.deploy.export import export_model
from lightning_sparse.module import load_weights
from lightning_sparse.posttrain.oneshot import RECIPE_FILE, OneShotStep, execute, prepare
from lightning_sparse.run import report
from lightning_sparse.run.recipe import (
    RecipeError,
    check_against_model,
    config_dir,
    instantiate_nodes,
    instantiate_recipe,
    recipe_to_dict,
)


def instantiate_steps(nodes: Mapping[str, Any] | DictConfig | None) -> dict[str, OneShotStep]:
    """Build the ``oneshot:`` entries of a config (:func:`instantiate_nodes`)."""
    return instantiate_nodes(nodes, "oneshot", OneShotStep, "a OneShotStep")


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    return Path(HydraConfig.get().runtime.output_dir)


def _recipe_name() -> str | None:
    if not HydraConfig.initialized():
        return None
    name = HydraConfig.get().runtime.choices.get("recipe")
    return str(name) if name is not None else None


def _loggers(cfg: DictConfig) -> list[Logger] | bool:
    nodes = cfg.get("logger") or {}
    loggers = [instantiate(node) for node in nodes.values() if node and "_target_" in node]
    return loggers or False


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one one-shot job from a composed config (``conf/oneshot.yaml``); return its summary.

    Everything is checked before any work or file of the run: the steps, the fine-tune recipe,
    the checkpoint (it must match the model key for key), the data, the calibration set.

    Raises:
        RecipeError: an invalid ``oneshot`` step or fine-tune ``recipe`` entry.
        FileNotFoundError: ``ckpt_path`` does not exist (or is a run dir without a checkpoint),
            or the data are missing.
        ValueError: the checkpoint does not match the model (the first mismatched key is
            named); see :func:`prepare` for the rest.
    """
    pl.seed_everything(int(cfg.seed), workers=True)
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    finetune_epochs = int(cfg.get("finetune_epochs") or 0)
    trainer_kwargs["max_epochs"] = finetune_epochs
    steps = instantiate_steps(cfg.get("oneshot"))
    if not steps:
        raise RecipeError(
            "oneshot: the recipe has no one-shot steps (no `oneshot:` entries); use "
            "recipe=oneshot_magnitude or recipe=oneshot_wanda."
        )
    finetune_recipe = recipe_to_dict(cfg.get("recipe"))
    finetune_callbacks = instantiate_recipe(finetune_recipe, trainer_kwargs)
    source = str(checkpoint_path(cfg.ckpt_path, field="ckpt_path"))

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module: pl.LightningModule = instantiate(cfg.model)
    # One-shot compresses the very model that was trained: no key, not even the head, may differ.
    load_weights(module, source, head=None, field="ckpt_path")
    check_against_model(finetune_callbacks, module)
    plan = prepare(
        module,
        datamodule,
        steps,
        finetune_epochs=finetune_epochs,
        finetune_callbacks=list(finetune_callbacks.values()),
        trainer_kwargs=trainer_kwargs,
    )

    run_dir = _run_dir(cfg)
    recipe_name = _recipe_name()
    recipe = {"oneshot": recipe_to_dict(cfg.get("oneshot")), "recipe": finetune_recipe}
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(recipe), run_dir / RECIPE_FILE)
    summary = execute(
        plan,
        run_dir,
        loggers=_loggers(cfg) if finetune_epochs > 0 else False,
        recipe_name=recipe_name,
        recipe=recipe,
        seed=int(cfg.seed),
        source=source,
    )
    if cfg.get("export", True):
        # ONNX fp32 (and int8 after PTQ) plus the compressed checkpoint, as `train` writes them.
        summary.update(export_model(plan.module, datamodule, run_dir / "export"))
    report.write_summary(summary, run_dir)
    report.print_summary(summary)
    Console().print(stages_table(summary))
    return summary


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def stages_table(summary: Mapping[str, Any]) -> Table:
    """Accuracy and sparsity before, right after the steps, and after the fine-tune."""
    table = Table(title=f"one-shot: {summary.get('criterion')}")
    for column in ("stage", "test accuracy", "val accuracy", "sparsity"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for label, key in (
        ("trained", "before"),
        ("one-shot", "after_oneshot"),
        ("fine-tuned", "after_finetune"),
    ):
        stage = summary.get(key)
        if stage:
            table.add_row(
                label,
                _percent(stage.get("test_acc")),
                _percent(stage.get("val_acc")),
                _percent(stage.get("sparsity")),
            )
    return table


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="oneshot")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns the final test accuracy for sweepers."""
    return run(cfg)["test_acc"]


if __name__ == "__main__":
    main()
