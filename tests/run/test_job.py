"""Helpers every job shares: threads, paths checked before anything is written, data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_sparse.core.checkpoint import NotACheckpointError
from lightning_sparse.run.cli import compose_config
from lightning_sparse.run.job import (
    ConfigError,
    build_data,
    check_latency_runs,
    check_paths,
    set_threads,
)
from lightning_sparse.run.report import environment_info, write_json


@pytest.fixture
def restore_threads() -> object:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_threads_are_set_and_recorded() -> None:
    assert set_threads(2) == 2 == torch.get_num_threads()
    assert environment_info()["threads"] == 2
    assert set_threads(1) == 1
    assert environment_info()["threads"] == 1
    assert set_threads(None) == 1  # null leaves the count as it is


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_threads_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"`threads`=.* is not allowed; give an integer >= 1"):
        set_threads(bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "many", True, None])
def test_bad_latency_runs_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"`latency_runs`=.* is not allowed; give the number"):
        check_latency_runs(bad)


def test_the_jobs_time_50_runs_and_a_quick_run_3() -> None:
    assert compose_config([]).latency_runs == 50
    assert compose_config(["debug=quick"]).latency_runs == 3
    assert compose_config(["ckpt_path=x"], config_name="oneshot").latency_runs == 50


def test_every_entry_config_sets_one_thread_by_default() -> None:
    for config in ("train", "oneshot", "export"):
        required = [] if config == "train" else ["ckpt_path=x"]
        assert compose_config(required, config_name=config).threads == 1, config


def _truncated(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


@pytest.mark.parametrize("field", ["ckpt_path", "resume", "model.init_from"])
def test_checkpoint_paths_are_checked_with_their_field(tmp_path: Path, field: str) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=rf"`{field}`='{missing}': not found"):
        check_paths(compose_config([f"{field}='{missing}'"]))
    cut = _truncated(tmp_path / "cut.ckpt")
    with pytest.raises(
        NotACheckpointError, match=rf"`{field}`='{cut}': not a checkpoint: truncated or not a"
    ):
        check_paths(compose_config([f"{field}='{cut}'"]))


def test_data_root_is_checked_unless_the_data_may_be_downloaded(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"`data.root`='{nowhere}': not found"):
        check_paths(compose_config(["data=image_folder", f"data.root='{nowhere}'"]))
    check_paths(compose_config(["data=mnist", f"data.root='{nowhere}'"]))  # downloads into it
    with pytest.raises(FileNotFoundError, match=r"set data\.download=true"):
        check_paths(compose_config(["data=mnist", f"data.root='{nowhere}'", "data.download=false"]))


def _image_folder(root: Path, classes: int) -> Path:
    from PIL import Image

    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(6):
            Image.new("RGB", (8, 8), (40 * label, index, 0)).save(folder / f"{index}.png")
    return root


def test_an_image_folder_counts_its_classes_when_num_classes_is_left_out(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images", classes=3)
    cfg = compose_config(["data=image_folder", f"data.root='{root}'"])
    datamodule = build_data(cfg)
    assert datamodule.num_classes == 3  # type: ignore[attr-defined]
    assert cfg.data.num_classes == 3
    assert cfg.model.num_classes == 3  # the model's interpolation sees the count


def test_json_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_json({"a": 1}, tmp_path / "summary.json")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
