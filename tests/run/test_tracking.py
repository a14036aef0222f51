"""wandb tracking with the real wandb, offline: mode choice, what a run holds, finishing.

No test reaches a network: "online" cases point ``WANDB_BASE_URL`` at a loopback port that is
closed (refused at once) or at a listening loopback socket, and wandb itself only ever runs
offline; what it wrote is read back from its transaction log (tests/wandb_offline.py).
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_sparse.run.recipe import compose_config
from lightning_sparse.run.tracking import (
    WandbTracker,
    credentials_configured,
    finish,
    log_results,
    resolve_mode,
    unreachable_reason,
)
from tests.helpers import TinyData, TinyModule
from tests.wandb_offline import offline_runs

# Variables through which a developer's own wandb set-up could leak into a test.
_WANDB_VARS = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_RUN_GROUP",
    "WANDB_NAME",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
)


@pytest.fixture(autouse=True)
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key, no netrc, wandb's settings and caches in tmp: nothing of this machine's set-up."""
    for name in _WANDB_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    return home


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        yield int(server.getsockname()[1])


def test_offline_when_nothing_is_configured() -> None:
    assert credentials_configured() is False
    assert resolve_mode(None) == ("offline", None)


@pytest.mark.parametrize(
    ("env_mode", "expected"),
    [("offline", "offline"), ("disabled", "disabled"), ("dryrun", "offline")],
)
def test_wandb_mode_env_is_respected(
    monkeypatch: pytest.MonkeyPatch, env_mode: str, expected: str
) -> None:
    monkeypatch.setenv("WANDB_MODE", env_mode)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # configured, yet the user asked for offline
    assert resolve_mode(None) == (expected, None)


def test_config_mode_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode("offline") == ("offline", None)


@pytest.mark.parametrize(("mode", "source"), [("bogus", "logger.wandb.mode"), (None, "WANDB_MODE")])
def test_unknown_mode_is_named(
    monkeypatch: pytest.MonkeyPatch, mode: str | None, source: str
) -> None:
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match=rf"{source}='bogus' is not allowed; choose one of"):
        resolve_mode(mode)


def test_online_without_a_key_falls_back_offline_instead_of_prompting() -> None:
    mode, message = resolve_mode("online")
    assert mode == "offline"
    assert "no API key is configured" in (message or "")
    assert "instead of prompting" in (message or "")


def test_online_without_network_falls_back_offline(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    assert unreachable_reason() is not None
    mode, message = resolve_mode(None)  # a key alone asks for online
    assert mode == "offline"
    assert f"http://127.0.0.1:{closed_port} cannot be reached" in (message or "")
    assert "wandb sync" in (message or "")


def test_online_when_configured_and_reachable(
    monkeypatch: pytest.MonkeyPatch, listening_port: int
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    assert resolve_mode(None) == ("online", None)


def test_a_netrc_entry_counts_as_configured(
    monkeypatch: pytest.MonkeyPatch, wandb_env: Path, listening_port: int
) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    wandb_env.mkdir(parents=True, exist_ok=True)
    netrc_file = wandb_env / "netrc"
    netrc_file.write_text("machine 127.0.0.1\n  login user\n  password not-a-real-key\n")
    netrc_file.chmod(0o600)
    assert credentials_configured()
    assert resolve_mode(None) == ("online", None)


def test_logger_groups_compose_alone_and_together() -> None:
    assert set(compose_config(["logger=wandb"]).logger) == {"wandb"}
    both = compose_config(["logger=[csv,wandb]"]).logger
    assert set(both) == {"csv", "wandb"}
    assert both.wandb._target_ == "lightning_sparse.run.tracking.WandbTracker"
    assert both.wandb.mode is None


def fit_tiny(tracker: WandbTracker, tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        logger=[tracker],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(TrackedModule(), TinyData())
    return trainer


class TrackedModule(TinyModule):
    def training_step(self, batch: object, batch_idx: int) -> object:
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


@pytest.mark.slow
def test_tracker_logs_metrics_summary_images_and_files(tmp_path: Path) -> None:
    tracker = WandbTracker(save_dir=str(tmp_path), project="tests", name="tiny", tags=["t"])
    assert tracker.mode == "offline"
    tracker.log_hyperparams({"recipe": {"pruning": {"final_sparsity": 0.9}}, "seed": 3})
    fit_tiny(tracker, tmp_path)
    png = tmp_path / "sparsity_per_layer.png"
    png.write_bytes(_tiny_png())
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"weights")
    summary = {"status": "ok", "test_acc": 0.75, "sparsity": 0.9, "recipe": {"name": "gmp"}}
    log_results([tracker], summary, files=[checkpoint, tmp_path / "missing.json"], images=[png])
    finish([tracker])
    assert not tracker.started
    finish([tracker])  # a second finish is a no-op

    (run,) = offline_runs(tmp_path)
    assert (run.project, run.name) == ("tests", "tiny")
    assert run.config["recipe"] == {"pruning": {"final_sparsity": 0.9}}
    assert run.config["seed"] == 3
    assert "train/loss" in run.history_keys()
    assert run.summary["test_acc"] == 0.75
    assert run.summary["status"] == "ok"
    assert run.summary["recipe"] == "gmp"
    assert any(f.startswith("media/images/plots/sparsity_per_layer") for f in run.files)
    (artifact,) = run.artifacts
    assert artifact["name"] == f"run-files-{run.run_id}"
    assert artifact["type"] == "model"
    assert artifact["files"] == ["last.ckpt"]  # files that do not exist are left out
    assert run.exit_code == 0


@pytest.mark.slow
def test_close_with_an_error_marks_the_run_failed(tmp_path: Path) -> None:
    tracker = WandbTracker(save_dir=str(tmp_path), project="tests")
    tracker.log_metrics({"x": 1.0})
    finish([tracker], error=RuntimeError("out of memory"))
    (run,) = offline_runs(tmp_path)
    assert run.exit_code == 1
    assert run.summary["status"] == "failed"
    assert run.summary["error"] == "RuntimeError: out of memory"


@pytest.mark.slow
def test_a_run_starts_without_wandbs_anonymous_setting_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    tracker = WandbTracker(save_dir=str(tmp_path), project="tests")
    tracker.log_metrics({"x": 1.0})
    finish([tracker])
    out, err = capfd.readouterr()
    assert "anonymous setting" not in out + err


def test_finish_without_a_started_run_writes_nothing(tmp_path: Path) -> None:
    tracker = WandbTracker(save_dir=str(tmp_path))
    finish([tracker], error=RuntimeError("before training"))
    assert not (tmp_path / "wandb").exists()


def test_tracker_warns_when_falling_back(
    monkeypatch: pytest.MonkeyPatch, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    with caplog.at_level(logging.WARNING, logger="lightning_sparse.run.tracking"):
        tracker = WandbTracker(save_dir=".")
    assert tracker.mode == "offline"
    assert "cannot be reached" in caplog.text
    assert tracker.fallback_message
    assert tracker.fallback_message in caplog.text


def _tiny_png() -> bytes:
    """A real 1x1 PNG, written by matplotlib."""
    from io import BytesIO

    from matplotlib.figure import Figure

    buffer = BytesIO()
    Figure(figsize=(0.1, 0.1), dpi=10).savefig(buffer, format="png")
    return buffer.getvalue()


def test_a_missing_wandb_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning_sparse\[tracking\]'"):
        WandbTracker(save_dir=".")
