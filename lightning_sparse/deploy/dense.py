"""The compressed model next to the dense one: MACs, parameters and latency, measured alike.

A speed-up is only meaningful against the dense model of the same run, timed in the same process
on the same batches: :func:`dense_session` exports the dense model to ONNX for the exporter's
interleaved latency measurement, and :func:`size_fields` / :func:`speed_fields` give the summary
its ``macs``, ``macs_dense``, ``params``, ``params_dense``, ``ort_dense_fp32_ms`` and
``speedup_vs_dense``. MACs are the Conv and Linear layers' multiply-accumulates on one sample of
the export's input shape (``core.structure.count_macs``), so a model whose channels were removed
shows fewer and a model with zeros in its weights the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from lightning_sparse.core.structure import count_macs
from lightning_sparse.deploy.onnx_int8 import export_onnx
from lightning_sparse.deploy.ort import OrtModel

__all__ = ["DENSE_SESSION", "dense_session", "size_fields", "speed_fields"]

# The dense model's key among the exporter's timed sessions.
DENSE_SESSION = "dense_fp32"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def size_fields(
    module: nn.Module, dense: nn.Module | None, example: torch.Tensor
) -> dict[str, int | None]:
    """``macs``, ``params`` of ``module`` and ``macs_dense``, ``params_dense`` (None without one).

    ``example`` is one input batch; MACs are per sample.
    """
    return {
        "macs": count_macs(module, example),
        "macs_dense": None if dense is None else count_macs(dense, example),
        "params": _params(module),
        "params_dense": None if dense is None else _params(dense),
    }


@torch.no_grad()
def dense_session(
    dense: nn.Module, example: torch.Tensor, directory: Path, threads: int | None
) -> OrtModel:
    """An ONNX Runtime session of ``dense`` (exported in fp32 to ``directory``, on the CPU)."""
    dense = dense.cpu().eval()
    proto, _ = export_onnx(dense, example)
    path = directory / "dense.onnx"
    onnx.save(proto, str(path))
    return OrtModel(path, threads)


def speed_fields(latency: Mapping[str, float]) -> dict[str, Any]:
    """``ort_dense_fp32_ms`` and ``speedup_vs_dense``: dense fp32 over the deployed model's time.

    The deployed model is the int8 one when there is one, else the fp32 one.
    """
    dense = latency.get(DENSE_SESSION)
    deployed = latency.get("int8", latency.get("fp32"))
    return {
        "ort_dense_fp32_ms": dense,
        "speedup_vs_dense": dense / deployed if dense is not None and deployed else None,
    }
