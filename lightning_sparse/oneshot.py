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

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from lightning_sparse.run.cli import config_dir, precheck_command_line

if TYPE_CHECKING:
    from lightning_sparse.posttrain.oneshot import OneShotStep

log = logging.getLogger(__name__)


def instantiate_steps(nodes: Mapping[str, Any] | DictConfig | None) -> dict[str, OneShotStep]:
    """Build the ``oneshot:`` entries of a config (:func:`instantiate_nodes`)."""
    from lightning_sparse.posttrain.oneshot import OneShotStep
    from lightning_sparse.run.recipe import instantiate_nodes

    return instantiate_nodes(nodes, "oneshot", OneShotStep, "a OneShotStep")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one one-shot job from a composed config (``conf/oneshot.yaml``); return its summary.

    Everything is checked before any work or file of the run: the steps, the fine-tune recipe,
    the checkpoint (it must match the model key for key), the data, the calibration set.

    Raises:
        RecipeError: an invalid ``oneshot`` step or fine-tune ``recipe`` entry.
        FileNotFoundError: ``ckpt_path`` does not exist (or is a run dir without a checkpoint),
            or the data are missing.
        NotACheckpointError: ``ckpt_path`` is truncated or not a torch file.
        ValueError: the checkpoint does not match the model (the first mismatched key is
            named); see :func:`prepare` for the rest.
    """
    # Imported here: `--help` and a misspelled key answer without torch and Lightning.
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from lightning_sparse.core.checkpoint import quantized_layers_in, readable_checkpoint
    from lightning_sparse.deploy.export import export_model
    from lightning_sparse.module import load_weights
    from lightning_sparse.posttrain.oneshot import RECIPE_FILE, execute, prepare
    from lightning_sparse.run import job, report
    from lightning_sparse.run.console import show
    from lightning_sparse.run.recipe import (
        RecipeError,
        check_against_model,
        instantiate_recipe,
        recipe_to_dict,
    )

    job.set_threads(cfg.get("threads"))
    job.latency_runs(cfg)  # checked before any work
    pl.seed_everything(int(cfg.seed), workers=True)
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    finetune_epochs = int(cfg.get("finetune_epochs") or 0)
    trainer_kwargs["max_epochs"] = finetune_epochs
    steps = instantiate_steps(cfg.get("oneshot"))
    if not steps:
        raise RecipeError(
            "oneshot: the recipe has no one-shot steps (no `oneshot:` entries); use "
            "recipe=oneshot_magnitude, recipe=oneshot_wanda or recipe=ptq_int8."
        )
    finetune_recipe = recipe_to_dict(cfg.get("recipe"))
    finetune_callbacks = instantiate_recipe(finetune_recipe, trainer_kwargs)
    source = str(readable_checkpoint(cfg.ckpt_path, field="ckpt_path"))
    job.check_paths(cfg)

    datamodule = job.build_data(cfg)
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

    run_dir = job.run_dir(cfg)
    recipe_name = job.recipe_name()
    recipe = {"oneshot": recipe_to_dict(cfg.get("oneshot")), "recipe": finetune_recipe}
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(recipe), run_dir / RECIPE_FILE)
    summary = execute(
        plan,
        run_dir,
        loggers=(job.loggers(cfg) or False) if finetune_epochs > 0 else False,
        recipe_name=recipe_name,
        recipe=recipe,
        seed=int(cfg.seed),
        source=source,
    )
    summary["environment"] = report.environment_info()
    summary["quantization"] = _quantization_fate(quantized_layers_in(source), summary["steps"])
    if summary["quantization"]["note"]:
        log.warning(summary["quantization"]["note"])
        summary["notes"].append(summary["quantization"]["note"])
    if cfg.get("export", True):
        # ONNX fp32 (and int8 after PTQ) plus the compressed checkpoint, as `train` writes them.
        exported = export_model(
            plan.module,
            datamodule,
            run_dir / "export",
            threads=cfg.threads,
            latency_runs=job.latency_runs(cfg),
        )
        summary.update(exported)
    report.write_summary(summary, run_dir)
    show(stages_table(summary))
    report.print_summary(summary)
    return summary


def _quantization_fate(source_layers: list[str], steps: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the result is quantized, and a note when a quantized source lost its int8.

    A quantization-aware trained checkpoint keeps its scales in the training callbacks' state,
    which one-shot steps do not carry over: they change the weights the scales were fitted to.
    Quantizing again is post-training quantization (an `oneshot.quantization` step).
    """
    layers = sorted(
        {layer for report in steps.values() for layer in report.get("quantized_layers", [])}
    )
    if layers:
        result = "requantized" if source_layers else "quantized"
        note = None
    elif source_layers:
        result = "dropped"
        note = (
            f"The source checkpoint was quantized ({len(source_layers)} int8 layers, QAT or PTQ); "
            "one-shot steps change its weights, so its scales are not carried over and the "
            "result is float (no model_int8.onnx). To quantize it again add post-training "
            "quantization: +oneshot.quantization={_target_: "
            "lightning_sparse.posttrain.OneShotQuantization}."
        )
    else:
        result, note = "none", None
    return {"source_layers": source_layers, "layers": layers, "result": result, "note": note}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def stages_table(summary: Mapping[str, Any]) -> Table:
    """Accuracy and sparsity after each stage: trained, each kind of step, fine-tuned, int8."""
    recipe = (summary.get("recipe") or {}).get("name") or "recipe"
    criterion = summary.get("criterion")
    title = f"one-shot: {recipe}" + (f" ({criterion})" if isinstance(criterion, str) else "")
    table = Table(title=title)
    for column in ("stage", "test accuracy", "val accuracy", "sparsity"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in summary.get("stages") or []:
        table.add_row(
            str(stage["stage"]),
            _percent(stage.get("test_acc")),
            _percent(stage.get("val_acc")),
            _percent(stage.get("sparsity")),
        )
    if summary.get("onnx_int8_acc") is not None:
        last = (summary.get("stages") or [{}])[-1]
        table.add_row(
            "int8 (ONNX Runtime)",
            _percent(summary["onnx_int8_acc"]),
            "n/a",
            _percent(last.get("sparsity")),
        )
    return table


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="oneshot")
def app(cfg: DictConfig) -> float | None:
    """The Hydra app; returns the final test accuracy for sweepers."""
    from lightning_sparse.run import cli, job
    from lightning_sparse.run.console import setup_job_output

    setup_job_output()
    try:
        return run(cfg)["test_acc"]
    except Exception as err:
        job.record_failure(cfg, err)
        cli.exit_on_user_error(err)
        raise


def main() -> None:
    """Console entry point: check the command line, run the app."""
    precheck_command_line("oneshot")
    app()


if __name__ == "__main__":
    main()
