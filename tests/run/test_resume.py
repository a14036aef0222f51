"""``resume=``: which config a resumed run gets, and the errors that stop it before training."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.run.recipe import compose_config
from lightning_sparse.run.resume import ResumeError, resume_config, stored_config

STORED: dict[str, Any] = {
    "seed": 3,
    "data": {"_target_": "lightning_sparse.data.SyntheticDataModule", "batch_size": 16},
    "model": {"lr": 0.003, "num_classes": "${data.num_classes}"},
    "trainer": {"max_epochs": 4, "accelerator": "cpu"},
    "recipe": {"pruning": {"final_sparsity": 0.8, "end_epoch": 3.0}},
    "logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger"}},
    "output_dir": "${hydra:runtime.output_dir}",
}


def _fake_run(tmp_path: Path, with_config: bool = True) -> Path:
    """A run dir whose checkpoint holds only what `resume` reads (no weights needed for that)."""
    run_dir = tmp_path / "first"
    (run_dir / "checkpoints").mkdir(parents=True)
    record: dict[str, Any] = {"name": "gmp", "recipe": {}}
    if with_config:
        record["config"] = STORED
    torch.save({"callbacks": {"recipe": record}}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir


@pytest.fixture
def composed(tmp_path: Path) -> Iterator[Any]:
    def make(*overrides: str) -> DictConfig:
        cfg = compose_config(
            [*overrides, f"output_dir='{tmp_path / 'second'}'"], return_hydra_config=True
        )
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def test_stored_config_plus_the_values_given_now(tmp_path: Path, composed: Any) -> None:
    run_dir = _fake_run(tmp_path)
    cfg, name = resume_config(
        composed(
            f"resume='{run_dir}'",
            "trainer.max_epochs=9",
            "recipe.pruning.final_sparsity=0.95",
            "~recipe.distillation",  # not in the stored config: nothing to delete, no error
            "++model.weight_decay=0.01",  # not in the stored model node: added
            "logger=wandb",  # loggers do not change what is trained: taken as composed now
        )
    )
    assert name == "gmp"
    assert cfg.trainer.max_epochs == 9
    assert cfg.recipe.pruning == {"final_sparsity": 0.95, "end_epoch": 3.0}
    assert "quantization" not in cfg.recipe  # the default recipe's parts are not mixed in
    assert cfg.model.lr == 0.003
    assert cfg.model.weight_decay == 0.01
    assert cfg.seed == 3
    assert cfg.data.batch_size == 16
    assert list(cfg.logger) == ["wandb"]
    assert cfg.ckpt_path == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    assert cfg.output_dir == str(tmp_path / "second")  # its own run dir, not the first one's


def test_a_run_dir_config_serves_checkpoints_without_one(tmp_path: Path, composed: Any) -> None:
    run_dir = _fake_run(tmp_path, with_config=False)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(STORED), run_dir / ".hydra" / "config.yaml")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    config, name = stored_config(checkpoint)
    assert config["model"]["lr"] == 0.003
    assert name == "gmp"
    cfg, _ = resume_config(composed(f"resume='{checkpoint}'"))
    assert cfg.trainer.max_epochs == 4


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            ["recipe=dense"],
            ResumeError,
            r"`recipe=dense` chooses another `recipe` config, but a "
            r"resumed run keeps the config it was trained with \(stored: recipe=gmp\)",
        ),
        (["model=mlp"], ResumeError, r"`model=mlp` chooses another `model` config"),
        (["ckpt_path=x.ckpt"], ResumeError, r"both name a checkpoint"),
    ],
)
def test_resume_refuses_what_would_change_the_run(
    tmp_path: Path, composed: Any, overrides: list[str], error: type, message: str
) -> None:
    run_dir = _fake_run(tmp_path)
    with pytest.raises(error, match=message):
        resume_config(composed(f"resume='{run_dir}'", *overrides))


def test_resume_errors_name_the_field(tmp_path: Path, composed: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"`resume`=.*nowhere': not found"):
        resume_config(composed(f"resume='{tmp_path / 'nowhere'}'"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"`resume`=.*empty': not a checkpoint: the dir"):
        resume_config(composed(f"resume='{tmp_path / 'empty'}'"))
    cut = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"`resume`=.*cut\.ckpt': not a checkpoint: truncated"):
        resume_config(composed(f"resume='{cut}'"))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ResumeError, match=r"`resume`=.*plain\.ckpt.* holds no run config"):
        resume_config(composed(f"resume='{plain}'"))
