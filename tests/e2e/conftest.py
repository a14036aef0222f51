"""Fixtures for whole runs composed and run in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_sparse.run.recipe import compose_config


@pytest.fixture
def compose_run_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Compose ``conf/`` with overrides, as the app would, writing into ``tmp_path / 'run'``.

    ``HydraConfig`` is set as inside the app (so the summary knows the recipe's name) and cleared
    afterwards.
    """

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        output_dir = output_dir or tmp_path / "run"
        cfg = compose_config([*overrides, f"output_dir='{output_dir}'"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None  # type: ignore[assignment]
