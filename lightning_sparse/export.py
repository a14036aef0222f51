"""Export a trained model: ONNX fp32 and int8, a compressed checkpoint, and what each measures.

:func:`export_model` writes, into one directory, atomically (everything goes to a temporary
directory beside it first, which then takes its place, so a failed export leaves nothing
half-written):

- ``model.onnx``: the float model (fake quantization off), checked against PyTorch's logits;
- ``model_int8.onnx``: when QAT or PTQ quantized the model, a QuantizeLinear/DequantizeLinear graph
  with the learned scales, which ONNX Runtime runs with integer kernels;
- ``compressed.safetensors``: the model in compact form (see below), which :func:`load_compressed`
  turns back into the same model;
- ``export.json``: the summary :func:`export_model` returns.

Both ONNX models are evaluated on the test split with ONNX Runtime, and timed side by side at a
fixed batch size (median of interleaved runs).

``compressed.safetensors`` layout: a few pooled tensors, ``u8`` (packed bitmasks of pruned
tensors, and 4-bit values two per byte), ``i8`` (int8 weights and zero points), ``f32`` (float
values, weight scales, input ranges), plus any non-float tensor under its own name; the metadata
key ``index`` (JSON) says for each ``state_dict`` entry how it is stored and where. A tensor whose
zeros make it smaller is stored as a bitmask plus its non-zeros; a quantized weight as integers plus
a scale per output channel. Pooling keeps the header small: with per-tensor entries the header
would be a tenth of a 95%-sparse small CNN's file.

Run on a run dir or checkpoint (Hydra config ``conf/export.yaml``)::

    python -m lightning_sparse.export ckpt_path=runs/train/<date>/<time>

 The model and the data are the run's own, from the config
stored in the checkpoint (or in ``.hydra/config.yaml`` of its run dir); ``data=``/``model=`` and
their keys on the command line change them. It prints the same table as ``train``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.run.cli import config_dir, precheck_command_line

__all__ = ["app", "main", "run"]

log = logging.getLogger(__name__)

# Config groups whose nodes the export takes from the run that wrote the checkpoint.
_FROM_RUN = ("data", "model")


def run_config(cfg: DictConfig, checkpoint: Path) -> tuple[str | None, dict[str, Any], int | None]:
    """Put the checkpoint's own ``data`` and ``model`` into ``cfg``; return its recipe and seed.

    The command line wins: ``data=``/``model=`` keep the composed node, and ``data.<key>=`` or
    ``model.<key>=`` change the stored one. A checkpoint without a stored config (not written by
    ``train``) leaves ``cfg`` as composed.

    Returns:
        The stored recipe's name, the recipe itself (``{}`` when unknown) and the seed the run
        was trained with (None when the checkpoint does not say).
    """
    import torch
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lightning_sparse.run.resume import ResumeError, stored_config

    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    record = (state.get("callbacks") or {}).get("recipe") or {}
    recipe: dict[str, Any] = record["recipe"] if isinstance(record.get("recipe"), dict) else {}
    name = str(record["name"]) if record.get("name") else None
    try:
        stored, _ = stored_config(checkpoint)
    except ResumeError:
        log.info("%s holds no run config: data and model as composed.", checkpoint)
        return name, recipe, None
    seed = stored.get("seed")
    trained_seed = int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None
    parsed = OverridesParser.create().parse_overrides(_command_line())
    chosen = {o.key_or_group for o in parsed if o.key_or_group in _FROM_RUN}
    for group in _FROM_RUN:
        if group in stored and group not in chosen:
            cfg[group] = stored[group]
    for override in parsed:
        group, _, rest = override.key_or_group.partition(".")
        if group in _FROM_RUN and rest and group not in chosen and not override.is_delete():
            OmegaConf.update(
                cfg, override.key_or_group, override.value(), merge=False, force_add=True
            )
    if OmegaConf.select(cfg, "model.init_from", default=None) is not None:
        cfg.model.init_from = None  # the checkpoint gives the weights; its init source may be gone
    return name, recipe, trained_seed


def _command_line() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export the run dir or checkpoint ``cfg.ckpt_path`` (``conf/export.yaml``); return a summary.

    Nothing is written before the checkpoint is known to fit the model.

    Raises:
        FileNotFoundError: ``ckpt_path`` names nothing (or a directory without a checkpoint).
        NotACheckpointError: ``ckpt_path`` is truncated or not a torch file.
        CheckpointMismatchError: the checkpoint does not fit the model (names the first key).
    """
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from lightning_sparse.core.checkpoint import load_checkpoint, readable_checkpoint
    from lightning_sparse.deploy.export import export_model
    from lightning_sparse.run import job, report
    from lightning_sparse.run.baseline import evaluate_accuracy
    from lightning_sparse.run.resume import finished_epochs

    job.set_threads(cfg.get("threads"))
    pl.seed_everything(int(cfg.seed), workers=True)
    checkpoint = readable_checkpoint(str(cfg.ckpt_path), field="ckpt_path")
    recipe_name, recipe, trained_seed = run_config(cfg, checkpoint)
    job.check_paths(cfg)
    datamodule = job.build_data(cfg)
    module: pl.LightningModule = instantiate(cfg.model)
    quantized = load_checkpoint(module, checkpoint)
    run_dir = job.known_run_dir(cfg)
    if run_dir is None and not cfg.get("out_dir"):
        raise job.ConfigError("`out_dir` is needed outside a Hydra app (there is no run dir).")
    out_dir = Path(str(cfg.out_dir)) if cfg.get("out_dir") else Path(str(run_dir)) / "export"
    log.info("Exporting %s (%d quantized layers) to %s", checkpoint, len(quantized), out_dir)
    tester = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    test_acc = evaluate_accuracy(tester, module, datamodule)
    exported = export_model(
        module,
        datamodule,
        out_dir,
        batch_size=int(cfg.batch_size),
        latency_runs=int(cfg.latency_runs),
        threads=cfg.get("threads"),
    )
    summary = report.build_summary(
        module,
        [],
        test_acc=test_acc,
        val_acc=None,
        # The summary describes the trained model: its run's seed (the export's own seeds only
        # its calibration order), the export's when the checkpoint does not say.
        seed=trained_seed if trained_seed is not None else int(cfg.seed),
        epochs=finished_epochs(checkpoint) or 0,
        recipe_name=recipe_name,
        recipe=recipe,
        checkpoint=str(checkpoint),
        run_dir=run_dir or out_dir,
        environment=report.environment_info(),
    )
    summary.update(exported, stage="export", source_checkpoint=str(checkpoint))
    if run_dir is not None:
        report.write_summary(summary, run_dir)
    report.print_summary(summary)
    return summary


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def app(cfg: DictConfig) -> None:
    """The Hydra app: ``python -m lightning_sparse.export ckpt_path=<run dir or checkpoint>``."""
    from lightning_sparse.run import cli, job
    from lightning_sparse.run.console import setup_job_output

    setup_job_output()
    try:
        run(cfg)
    except Exception as err:
        job.record_failure(cfg, err)
        cli.exit_on_user_error(err)
        raise


def main() -> None:
    """Console entry point: check the command line, run the app."""
    precheck_command_line("export")
    app()


if __name__ == "__main__":
    main()
