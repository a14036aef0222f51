"""Small, fast pieces shared by the tests: a tiny classifier and deterministic data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.data.resumable import train_sampler
from tests import forkserver

REPO_ROOT = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """Conv + two Linear layers: every mask structure has something to act on."""

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, width, 3, padding=1)
        self.fc1 = nn.Linear(width * 16, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class TinyModule(pl.LightningModule):
    """Classifier over ``TinyNet`` with momentum SGD and weight decay, both able to regrow zeros."""

    def __init__(self, lr: float = 0.05, weight_decay: float = 1e-3) -> None:
        super().__init__()
        self.model = TinyNet()
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
        )


class TinyData(pl.LightningDataModule):
    """Random 4x4x4 inputs with 4 classes; shuffled with the resumable sampler."""

    def __init__(self, num_samples: int = 80, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        x = torch.randn(num_samples, 4, 4, 4, generator=generator)
        y = torch.randint(0, 4, (num_samples,), generator=generator)
        self.dataset = TensorDataset(x, y)
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        sampler = train_sampler(self.dataset, self.trainer, self.batch_size, True, self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU trainer that prints and writes nothing unless asked."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


class Crash(pl.Callback):
    """Raises once training reaches ``at_step``: an interrupted run, to resume from a checkpoint."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("crash on purpose")


def fit_resumable(
    module: pl.LightningModule,
    callbacks: list[pl.Callback],
    checkpoints: Path,
    crash_at: int | None,
    ckpt_path: str | None,
    max_epochs: int = 3,
) -> pl.Trainer:
    """Fit on ``TinyData`` with a checkpoint every 5 steps in ``checkpoints`` (``step=<n>.ckpt``).

    ``crash_at`` stops the run with :class:`Crash` at that step; ``ckpt_path`` resumes one.
    """
    every_five = ModelCheckpoint(
        dirpath=checkpoints, every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    crash = [Crash(crash_at)] if crash_at is not None else []
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        callbacks=[*callbacks, every_five, *crash],
        enable_checkpointing=True,
    )
    trainer.fit(module, TinyData(), ckpt_path=ckpt_path)
    return trainer


def end_ddp() -> None:
    """Destroy the process group at the end of a DDP script, as a real training script should.

    Left to interpreter exit, gloo's teardown can abort the process after the work is done.
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_ddp_script(module: str, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``python -m <module> <out_dir>`` (a 2-rank DDP script); return both ranks' records.

    The two ranks start as ``torchrun`` would start them (:func:`tests.forkserver.run_ranks`):
    real processes in a gloo group, each told its rank by the environment, so Lightning's DDP
    strategy joins them instead of re-running the command for rank 1 (that launcher is the
    app's: tests/e2e/test_ddp.py and the README's ``trainer=ddp_sim``). Each script saves
    ``<out_dir>/rank<r>.pt``.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    results = forkserver.run_ranks(["-m", module, str(out_dir)], REPO_ROOT, env, timeout=300)
    codes = [result.returncode for result in results]
    # the rank that failed first (the others were ended: -9)
    failed = next((r for r in results if r.returncode not in (0, -9)), results[0])
    assert codes == [0, 0], f"exit codes {codes}:\n{failed.stderr[-3000:]}"
    rank0 = torch.load(out_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(out_dir / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2
    return rank0, rank1
