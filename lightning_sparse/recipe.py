"""Recipes from Python, without a Hydra app: ``lightning_sparse.recipe.load("gmp", [...])``.

The public face of :mod:`lightning_sparse.run.recipe` (composition and validation live there) and
of the SparseML importer (:mod:`lightning_sparse.run.sparseml`): :func:`load_file` reads a SparseML
1.x recipe, and ``python -m lightning_sparse.recipe convert in.yaml -o conf/recipe/mine.yaml``
writes it as a Hydra recipe (then ``recipe=mine``).

Example::

    from lightning_sparse.recipe import instantiate_recipe, load, load_file

    callbacks = load("gmp", ["recipe.pruning.final_sparsity=0.95"])
    Trainer(callbacks=list(callbacks.values()), max_epochs=30).fit(module, datamodule)

    fragment = load_file("bert-prune90.md", variables={"distill_hardness": 0.5})
    callbacks = instantiate_recipe(fragment["recipe"], fragment["trainer"])
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

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
from lightning_sparse.run.sparseml import RecipeImportError, convert, load_file

__all__ = [
    "RecipeError",
    "RecipeImportError",
    "RecipeRecord",
    "check_against_model",
    "check_recipe",
    "check_target",
    "compose_config",
    "config_dir",
    "convert",
    "instantiate_recipe",
    "load",
    "load_file",
    "main",
    "recipe_to_dict",
]


def _variables(entries: Sequence[str]) -> dict[str, Any]:
    variables: dict[str, Any] = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--var {entry!r}: write NAME=VALUE.")
        variables[name] = yaml.safe_load(value)
    return variables


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_sparse.recipe convert in.yaml [-o out.yaml]``.

    Writes the Hydra recipe equivalent to a SparseML recipe (to stdout without ``-o``); a recipe
    that cannot be mapped exits with status 2 and the importer's message, which names the modifier
    and the field.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_sparse.recipe",
        description="SparseML 1.x recipes for lightning_sparse.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser(
        "convert",
        help="write a SparseML recipe as a Hydra recipe (conf/recipe/<name>.yaml)",
        description="Write a SparseML recipe (YAML or markdown card) as a Hydra recipe; place it "
        "as conf/recipe/<name>.yaml and train with recipe=<name>.",
    )
    convert_parser.add_argument("recipe", type=Path, help="the SparseML recipe")
    convert_parser.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    convert_parser.add_argument(
        "--prefix",
        default="model.",
        help="put before the recipe's parameter names (default: 'model.', ClassificationModule's)",
    )
    convert_parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="give a recipe variable a new value (repeatable), e.g. --var num_epochs=10",
    )
    args = parser.parse_args(argv)
    try:
        text = convert(args.recipe, prefix=args.prefix, variables=_variables(args.var) or None)
    except (RecipeImportError, FileNotFoundError, argparse.ArgumentTypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
