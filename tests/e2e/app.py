"""Helpers for whole runs: the real Hydra app in a subprocess, and quick overrides."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests import forkserver

REPO = Path(__file__).resolve().parents[2]

# Small and quick: synthetic data, 2 epochs, pruning done by the end of epoch 1.
QUICK = [
    # Pins the quick runs to pruning alone: the default recipe (gmp_qat_distill) starts QAT where
    # pruning ends, which a 1-epoch run cannot fit.
    "recipe=gmp",
    "data=synthetic",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=4",
    "trainer.enable_model_summary=false",
]
QUICK_PRUNING = ["recipe.pruning.start_epoch=0", "recipe.pruning.end_epoch=1"]


def _app_env() -> dict[str, str]:
    return {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}


def run_app(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_sparse.train *args`` as a user would run it; output captured."""
    return forkserver.run(["-m", "lightning_sparse.train", *args], REPO, _app_env(), timeout)


def run_app_ranks(*args: str, timeout: float = 240) -> list[subprocess.CompletedProcess[str]]:
    """``python -m lightning_sparse.train *args`` as two DDP ranks that a launcher (torchrun,
    srun) started: each knows its rank from the environment, and Lightning joins them."""
    argv = ["-m", "lightning_sparse.train", *args]
    return forkserver.run_ranks(argv, REPO, _app_env(), 2, timeout)
