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

Run on a checkpoint: ``python -m lightning_sparse.export ckpt_path=runs/.../last.ckpt`` (Hydra
config ``conf/export.yaml``; ``data=`` and ``model=`` must match those of the run).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_sparse.core.checkpoint import load_checkpoint
from lightning_sparse.deploy.export import export_model
from lightning_sparse.run.recipe import config_dir

__all__ = ["main", "run"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Entry point


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export the checkpoint ``cfg.ckpt_path`` of the model ``cfg.model`` (``conf/export.yaml``).

    Nothing is written before the checkpoint is known to fit the model.

    Raises:
        FileNotFoundError: ``ckpt_path`` is not a file.
        CheckpointMismatchError: the checkpoint does not fit ``model=`` (names the first key).
    """
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    module: pl.LightningModule = instantiate(cfg.model)
    quantized = load_checkpoint(module, str(cfg.ckpt_path))
    out_dir = Path(str(cfg.out_dir)) if cfg.get("out_dir") else _run_dir(cfg) / "export"
    log.info("Exporting %s (%d quantized layers) to %s", cfg.ckpt_path, len(quantized), out_dir)
    summary = export_model(
        module,
        datamodule,
        out_dir,
        batch_size=int(cfg.batch_size),
        latency_runs=int(cfg.latency_runs),
        threads=cfg.get("threads"),
    )
    for key, value in summary.items():
        log.info("%s: %s", key, value)
    return summary


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    """``python -m lightning_sparse.export ckpt_path=...``."""
    run(cfg)


if __name__ == "__main__":
    main()
