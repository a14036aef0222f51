"""``python -m lightning_sparse.train resume=<run dir or checkpoint>``: continue a run as it was.

``ckpt_path=`` restores weights and callback states but trains with the config composed *now*
(defaults plus this command line), so a run started with ``recipe=gmp model.lr=0.003`` and
resumed with a bare ``ckpt_path=`` would silently switch to the default recipe and learning rate.
``resume=`` instead takes the run's own config, stored inside every checkpoint ``train`` writes
(the ``recipe`` callback state) and, for older checkpoints, from ``.hydra/config.yaml`` of the run
dir the checkpoint sits in. Then it applies only what this command line says, so that a run can be
extended (``trainer.max_epochs=60``) or moved (``trainer.devices=4``):

- ``key=value``, ``++key=value``, ``~key``: applied to the stored config (Hydra composes the
  default config with them first, so a key the defaults lack needs ``++``);
- ``logger=...`` (and Hydra's own ``hydra/...`` groups): taken as composed now;
- any other group choice (``recipe=``, ``model=``, ``data=``, ``trainer=``) is refused: it would
  replace a whole part of the run it continues. Start a new run (``ckpt_path=`` or
  ``model.init_from=``) for that.

The resumed run writes into its own new run dir (nothing of the first run is overwritten), with
``resume.yaml`` recording the checkpoint and the config in force.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.core.checkpoint import readable_checkpoint

__all__ = ["CONFIG_STATE_KEY", "RESUME_FILE", "ResumeError", "resume_config", "stored_config"]

log = logging.getLogger(__name__)

RESUME_FILE = "resume.yaml"
# Where RecipeRecord keeps the run's (unresolved) config inside a checkpoint's callback states.
CONFIG_STATE_KEY = "config"
# Keys the resumed run sets itself; an override of them is not applied to the stored config.
_OWN_KEYS = ("resume", "ckpt_path", "output_dir")
# Config groups that may change on resume: they do not change what is trained.
_FREE_GROUPS = ("logger",)


class ResumeError(ValueError):
    """``resume`` cannot continue the run; the message names the field and what to do."""


def stored_config(checkpoint: Path) -> tuple[dict[str, Any], str | None]:
    """The config a checkpoint was trained with, and its recipe's name.

    Raises:
        ResumeError: the checkpoint holds no config and no ``.hydra/config.yaml`` is beside it.
    """
    # mmap: only the small callback states are read, not every weight.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    record = state.get("callbacks", {}).get("recipe") or {}
    name = record.get("name")
    config = record.get(CONFIG_STATE_KEY)
    if isinstance(config, dict):
        return config, name
    run_dir_config = checkpoint.parent.parent / ".hydra" / "config.yaml"
    if checkpoint.parent.name == "checkpoints" and run_dir_config.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(run_dir_config), resolve=False)
        assert isinstance(loaded, dict)
        return {str(k): v for k, v in loaded.items()}, name
    raise ResumeError(
        f"`resume`={str(checkpoint)!r} holds no run config (it was not written by "
        "`python -m lightning_sparse.train`) and no <run dir>/.hydra/config.yaml is beside it. "
        "Continue it with `ckpt_path=<checkpoint>` and the run's settings on the command line."
    )


def _command_line() -> tuple[list[str], dict[str, Any]]:
    """This job's command-line overrides and its config-group choices (none outside Hydra)."""
    if not HydraConfig.initialized():
        return [], {}
    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices)


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, DictConfig) and leaf in parent:
        del parent[leaf]


def resume_config(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """The config to continue ``cfg.resume`` with: its stored one plus this command line's values.

    Args:
        cfg: the config composed now; ``resume`` names a run dir or a checkpoint file.

    Returns:
        The config to run (``ckpt_path`` set to the checkpoint, ``output_dir`` to this job's run
        dir) and the stored recipe's name.

    Raises:
        FileNotFoundError: ``resume`` names nothing, or a run dir without
            ``checkpoints/last.ckpt``.
        NotACheckpointError: the file is truncated or not a torch checkpoint.
        ResumeError: ``ckpt_path`` is given too, the checkpoint holds no config, the command
            line chooses another option of a config group, or the run has no epochs left to train
            ("nothing to do").
    """
    if cfg.get("ckpt_path"):
        raise ResumeError(
            f"`resume`={cfg.resume!r} and `ckpt_path`={cfg.ckpt_path!r} both name a checkpoint; "
            "give `resume` to continue a run with its stored config, or `ckpt_path` to start "
            "from the checkpoint with the config composed now."
        )
    checkpoint = readable_checkpoint(str(cfg.resume), field="resume").resolve()
    stored, recipe_name = stored_config(checkpoint)
    resumed = OmegaConf.create(stored)
    overrides, choices = _command_line()
    applied: list[str] = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in _OWN_KEYS or key.startswith("hydra") or key.split(".")[0] == "hydra":
            continue
        if key in choices:
            if key.split("@")[0].lstrip("/") in _FREE_GROUPS:
                resumed[key] = cfg.get(key)
                applied.append(override.input_line or key)
                continue
            raise ResumeError(
                f"`resume`: `{override.input_line}` chooses another `{key}` config, but a resumed "
                f"run keeps the config it was trained with (stored: {key}="
                f"{_stored_choice(key, recipe_name)}). Override its values instead (e.g. "
                "trainer.max_epochs=60), or start a new run with `ckpt_path=` or "
                "`model.init_from=`."
            )
        if override.is_delete():
            _delete(resumed, key)
        else:
            OmegaConf.update(resumed, key, override.value(), merge=False, force_add=True)
        applied.append(override.input_line or key)
    _take_new_keys(resumed, cfg)
    resumed.output_dir = str(cfg.output_dir)
    resumed.ckpt_path = str(checkpoint)
    resumed.resume = str(cfg.resume)
    _check_work_left(checkpoint, resumed, cfg.resume)
    log.info(
        "Resuming %s with its stored config%s.",
        checkpoint,
        f", changed by {', '.join(applied)}" if applied else "",
    )
    return resumed, recipe_name


def _take_new_keys(resumed: DictConfig, current: DictConfig) -> None:
    """Keys the stored config lacks (added to the package since) come from the config composed now.

    A run trained before ``callbacks`` or ``threads`` existed then resumes with today's defaults
    for them, instead of failing on a missing key.
    """
    new = [str(key) for key in current if key != "hydra" and key not in resumed]
    if not new:
        return
    # Unresolved: an interpolation (`${output_dir}/checkpoints`) resolves in the resumed run.
    values = OmegaConf.to_container(OmegaConf.masked_copy(current, new), resolve=False)
    assert isinstance(values, dict)
    for key, value in values.items():
        resumed[str(key)] = value


def finished_epochs(checkpoint: Path) -> int | None:
    """How many epochs the checkpoint's training had processed (None: not a training checkpoint)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    processed = progress.get("current", {}).get("processed")
    return int(processed) if isinstance(processed, int) else None


def _check_work_left(checkpoint: Path, resumed: DictConfig, given: Any) -> None:
    """Refuse to resume a run that has trained all its epochs: it would train none and say nothing.

    Raises:
        ResumeError: the checkpoint's epochs reach ``trainer.max_epochs`` (with no ``max_steps``).
    """
    trainer = resumed.get("trainer") or {}
    max_epochs = trainer.get("max_epochs")
    max_steps = trainer.get("max_steps", -1)
    if not isinstance(max_epochs, int) or max_epochs < 0 or (max_steps not in (None, -1)):
        return
    done = finished_epochs(checkpoint)
    if done is not None and done >= max_epochs:
        raise ResumeError(
            f"`resume`={str(given)!r}: nothing to do: the run has trained all its {done} epochs "
            f"(trainer.max_epochs={max_epochs}). To train it further give a larger "
            f"trainer.max_epochs (e.g. trainer.max_epochs={done + max(1, done // 2)})."
        )


def _stored_choice(key: str, recipe_name: str | None) -> str:
    if key == "recipe" and recipe_name:
        return recipe_name
    return "as stored"
