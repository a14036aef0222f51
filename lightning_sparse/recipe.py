"""Recipes from Python, without a Hydra app: ``lightning_sparse.recipe.load("gmp", [...])``.

The public face of :mod:`lightning_sparse.run.recipe` (composition and validation live there).

Example::

    from lightning_sparse.recipe import load

    callbacks = load("gmp", ["recipe.pruning.final_sparsity=0.95"])
    Trainer(callbacks=list(callbacks.values()), max_epochs=30).fit(module, datamodule)
"""

from __future__ import annotations

from lightning_sparse.run.recipe import (
    RecipeError,
    RecipeRecord,
    check_against_model,
    check_recipe,
    check_target,
    compose_config,
    config_dir,
    instantiate_recipe,
    load,
    recipe_to_dict,
)

__all__ = [
    "RecipeError",
    "RecipeRecord",
    "check_against_model",
    "check_recipe",
    "check_target",
    "compose_config",
    "config_dir",
    "instantiate_recipe",
    "load",
    "recipe_to_dict",
]
