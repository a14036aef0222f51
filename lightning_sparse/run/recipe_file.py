"""``recipe_file=path``: a SparseML recipe in place of the recipe group.

``python -m lightning_sparse.train recipe_file=recipes/bert-prune90.md model=bert_tiny ...``
composes the run as usual but without a recipe group (as ``recipe=dense``), reads the file with
:func:`lightning_sparse.run.sparseml.load_file` (``recipe_variables`` give its variables new
values), puts its ``recipe`` in place of ``recipe:``, merges its ``trainer`` and ``model`` settings
(the training length, the learning rate), and then applies the command line's ``recipe.*``,
``trainer.*`` and ``model.*`` overrides again, so that they still win, as they do over a recipe
group. Hydra checks the command line against the default recipe first, so an override of an entry
the default recipe lacks takes a ``+`` (``+recipe.pruning_1.final_sparsity=0.8``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sparse.run.recipe import RecipeError, compose_config
from lightning_sparse.run.sparseml import load_file

__all__ = ["RECIPE_FILE_KEYS", "apply_recipe_file"]

# What a recipe file sets, and so which command-line overrides are applied again after it.
RECIPE_FILE_KEYS = ("recipe", "trainer", "model")


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command line's overrides of this job (also of one job of a sweep)."""
    if "hydra" in cfg:
        return [str(o) for o in cfg.hydra.overrides.task]
    if HydraConfig.initialized():
        return [str(o) for o in HydraConfig.get().overrides.task]
    return []


def _reapply(cfg: DictConfig, overrides: list[str]) -> None:
    """Apply the overrides of ``recipe.*``, ``trainer.*`` and ``model.*`` keys to ``cfg`` again."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if "." not in key or key.split(".")[0] not in RECIPE_FILE_KEYS:
            continue
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent)
            if isinstance(node, DictConfig) and leaf in node:
                with open_dict(node):
                    del node[leaf]
            continue
        OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)


def apply_recipe_file(cfg: DictConfig) -> tuple[DictConfig, str]:
    """The job's config with the SparseML recipe at ``cfg.recipe_file`` as its recipe.

    Returns:
        The new config and the recipe's name for the summary (the file's stem).

    Raises:
        RecipeError: a recipe group was chosen on the command line too (``recipe=...``).
        lightning_sparse.run.sparseml.RecipeImportError: the file cannot be read or mapped; the
            message names the modifier and the field.
        FileNotFoundError: no file at ``recipe_file``.
    """
    path = Path(str(cfg.recipe_file)).expanduser()
    overrides = _task_overrides(cfg)
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "recipe"]
    if chosen:
        raise RecipeError(
            f"`recipe_file`={str(path)!r} and {chosen[0]!r} both name the recipe; give one of "
            "them (the file's recipe replaces the recipe group)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"`recipe_file`={str(path)!r} does not exist.")
    variables: dict[str, Any] = OmegaConf.to_container(  # type: ignore[assignment]
        cfg.get("recipe_variables") or OmegaConf.create({}), resolve=True
    )
    fragment = load_file(path, variables=variables or None)
    # Composed again without the recipe group, so none of its trainer/model settings remain; the
    # recipe.* overrides are for the file's entries, applied after it.
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] != "recipe"]
    base = compose_config([*kept, "recipe=dense"], return_hydra_config="hydra" in cfg)
    with open_dict(base):
        base.recipe = fragment["recipe"]
        for key in ("trainer", "model"):
            if fragment[key]:
                base[key] = OmegaConf.merge(base[key], fragment[key])
    _reapply(base, overrides)
    return base, path.stem
