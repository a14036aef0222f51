"""The trainer's own callbacks come from the `callbacks` config group, fitted to the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.callbacks import EpochLine, ModelSummary
from lightning_sparse.run.cli import compose_config
from lightning_sparse.run.job import ConfigError
from lightning_sparse.run.training import trainer_callbacks


def _compose(tmp_path: Path, *overrides: str) -> tuple[DictConfig, dict[str, Any]]:
    cfg = compose_config([*overrides, f"output_dir='{tmp_path}'"])
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    return cfg, trainer_kwargs


def test_the_default_callbacks(tmp_path: Path) -> None:
    cfg, kwargs = _compose(tmp_path)
    callbacks = trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
    assert [type(c) for c in callbacks] == [
        ModelCheckpoint,
        LearningRateMonitor,
        ModelSummary,
        EpochLine,  # stdout is no terminal under pytest: one line per epoch
    ]
    checkpoint = callbacks[0]
    assert isinstance(checkpoint, ModelCheckpoint)
    assert Path(str(checkpoint.dirpath)) == tmp_path / "checkpoints"
    assert checkpoint.save_last
    # Ours prints the summary, and the line is the progress bar Lightning uses.
    assert kwargs["enable_model_summary"] is False
    assert kwargs["enable_progress_bar"] is True


def test_no_lr_monitor_without_a_logger(tmp_path: Path) -> None:
    cfg, kwargs = _compose(tmp_path)
    callbacks = trainer_callbacks(cfg, tmp_path, kwargs, has_logger=False)
    assert not any(isinstance(c, LearningRateMonitor) for c in callbacks)


def test_the_trainer_switches_turn_the_summary_and_the_bar_off(tmp_path: Path) -> None:
    cfg, kwargs = _compose(
        tmp_path, "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false"
    )
    callbacks = trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
    assert [type(c) for c in callbacks] == [ModelCheckpoint, LearningRateMonitor]
    assert kwargs["enable_progress_bar"] is False


def test_a_sweep_prints_the_model_summary_in_its_first_job_only(tmp_path: Path) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    def summaries(job: int) -> int:
        cfg = compose_config([f"output_dir='{tmp_path}'"], return_hydra_config=True)
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = job
        HydraConfig.instance().set_config(cfg)
        try:
            kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
            assert isinstance(kwargs, dict)
            callbacks = trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
        finally:
            HydraConfig.instance().cfg = None  # type: ignore[assignment]
        return sum(isinstance(c, ModelSummary) for c in callbacks)

    assert summaries(0) == 1
    assert summaries(1) == 0


def test_early_stopping_is_opt_in(tmp_path: Path) -> None:
    cfg, kwargs = _compose(tmp_path, "callbacks=[default,early_stopping]")
    callbacks = trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
    stopping = [c for c in callbacks if isinstance(c, EarlyStopping)]
    assert len(stopping) == 1
    assert stopping[0].monitor == "val/acc"
    cfg, kwargs = _compose(tmp_path)
    assert not any(
        isinstance(c, EarlyStopping)
        for c in trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
    )


def test_a_removed_checkpoint_turns_checkpointing_off(tmp_path: Path) -> None:
    cfg, kwargs = _compose(tmp_path, "~callbacks.model_checkpoint")
    callbacks = trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
    assert not any(isinstance(c, ModelCheckpoint) for c in callbacks)
    assert kwargs["enable_checkpointing"] is False


def test_the_checkpoint_must_stay_where_resume_looks(tmp_path: Path) -> None:
    cfg, kwargs = _compose(tmp_path, f"callbacks.model_checkpoint.dirpath='{tmp_path / 'x'}'")
    with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint: no checkpoint callback"):
        trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
    cfg, kwargs = _compose(tmp_path, "callbacks.model_checkpoint.save_last=false")
    with pytest.raises(ConfigError, match=r"keep dirpath: \$\{output_dir\}/checkpoints"):
        trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)


def test_a_terminal_gets_the_rich_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    cfg, kwargs = _compose(tmp_path)
    callbacks = trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True)
    assert isinstance(callbacks[-1], RichProgressBar)


def test_every_callback_of_a_run_prints_its_settings(tmp_path: Path) -> None:
    from lightning_sparse.posttrain.oneshot import OneShotRecord
    from lightning_sparse.run.baseline import DenseSnapshot
    from lightning_sparse.run.recipe import RecipeRecord, instantiate_recipe
    from lightning_sparse.run.report import SparsityHistory

    cfg, kwargs = _compose(tmp_path, "callbacks=[default,early_stopping]")
    ours = [
        *instantiate_recipe(cfg.recipe, cfg.trainer).values(),
        RecipeRecord("gmp_qat_distill", {}),
        SparsityHistory(),
        DenseSnapshot(20.0),
        OneShotRecord("ptq_int8", {"quantization": {}}),
        *trainer_callbacks(cfg, tmp_path, kwargs, has_logger=True),
    ]
    for callback in ours:
        if type(callback).__module__.startswith("lightning_sparse"):
            assert " object at 0x" not in repr(callback), type(callback)
    pruning = repr(ours[0])
    assert pruning.startswith("MagnitudePruning(start_epoch=20.0, end_epoch=45.0,")
    assert "final_sparsity=0.9" in pruning
    assert "schedule=" not in pruning  # derived from the settings shown
