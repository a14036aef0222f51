"""Compose and validate recipes before anything trains; use them with or without Hydra.

A recipe is a mapping ``{entry name: node}`` whose nodes are ``_target_`` configs of callbacks, as
``conf/recipe/<name>.yaml`` puts them under the ``recipe:`` key. Validation happens in layers, each
error naming the recipe entry (``recipe.pruning``), the field and what is allowed:

1. :func:`check_recipe` (config only): every node has a ``_target_`` that imports, every key binds
   to the target's signature, no ``*_epoch`` lies past ``trainer.max_epochs``.
2. :func:`instantiate_recipe`: builds the callbacks, so their constructors validate values.
3. :func:`check_against_model`: ``params`` match weights of the model, ``mask_type`` tiles them, and
   no two pruning entries hold the same weight at the same time.

Recipes are data: nothing in them is evaluated; cross-entry timing is written as interpolation.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from lightning_sparse.callbacks.base import MASKS, CompressionCallback, check_timing
from lightning_sparse.run.cli import compose_config, config_dir

__all__ = [
    "RecipeError",
    "RecipeRecord",
    "check_against_model",
    "check_recipe",
    "check_target",
    "compose_config",
    "config_dir",
    "instantiate_nodes",
    "instantiate_recipe",
    "load",
    "recipe_to_dict",
    "single_process",
]


class RecipeError(ValueError):
    """A recipe is invalid; the message names the recipe entry and the field."""


def recipe_to_dict(recipe: Mapping[str, Any] | DictConfig | None) -> dict[str, dict[str, Any]]:
    """The recipe as plain, resolved Python data (``{}`` for none)."""
    if recipe is None:
        return {}
    if isinstance(recipe, DictConfig):
        data = OmegaConf.to_container(recipe, resolve=True)
    else:
        data = OmegaConf.to_container(OmegaConf.create(dict(recipe)), resolve=True)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: expected a mapping of entry name -> node, got {data!r}.")
    return {str(name): node for name, node in data.items()}


def _is_hydra_key(key: str) -> bool:
    return key.startswith("_") and key.endswith("_")


def _import_target(where: str, node: Any) -> Any:
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise RecipeError(
            f"{where}: a recipe entry must be a node with a `_target_` (a callback class); "
            f"got {node!r}. Remove the entry with `~{where}` rather than setting it to null."
        )
    target = node["_target_"]
    try:
        return get_object(str(target))
    except Exception as err:
        raise RecipeError(f"{where}: `_target_`={target!r} cannot be imported: {err}") from err


def check_target(node: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check that ``node['_target_']`` imports and that the node's keys bind to its signature.

    Hydra's own keys (``_target_``, ``_recursive_``, ...) are skipped; ``_args_`` bind positionally.

    Args:
        node: a ``_target_`` node as plain data (nested nodes are not checked: walk them yourself).
        where: the node's place in the config, e.g. ``recipe.pruning``, used in messages.

    Returns:
        Every argument of the call, defaults included.

    Raises:
        RecipeError: no ``_target_``, it does not import, an unknown key (the accepted ones are
            listed, with the closest match), or a required argument is missing.
    """
    return _bind(where, _import_target(where, node), node)


def _bind(where: str, target: Any, node: Mapping[str, Any]) -> dict[str, Any]:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return {k: v for k, v in node.items() if not _is_hydra_key(k)}
    kwargs = {k: v for k, v in node.items() if not _is_hydra_key(k)}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    accepted = [
        name
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if not accepts_any:
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RecipeError(
                    f"{where}: unknown argument {key!r}{hint}; accepted: {', '.join(accepted)}."
                )
    try:
        bound = signature.bind(*node.get("_args_", []), **kwargs)
    except TypeError as err:
        raise RecipeError(f"{where}: {err} (target {node['_target_']}).") from err
    bound.apply_defaults()
    return dict(bound.arguments)


def _max_epochs(trainer: Mapping[str, Any] | None) -> int | None:
    """``max_epochs`` the schedules must fit in, or None when the run is not bounded by epochs."""
    if not trainer or trainer.get("fast_dev_run"):
        return None
    max_epochs = trainer.get("max_epochs")
    if max_epochs is None or int(max_epochs) < 0:
        return None
    return int(max_epochs)


def single_process(trainer: Mapping[str, Any]) -> bool:
    """Whether trainer settings ask for one process: one device (or ``auto``) on one node."""
    devices = trainer.get("devices", 1)
    one_device = devices in (1, "1", "auto") or (
        isinstance(devices, (list, tuple)) and len(devices) == 1
    )
    return one_device and int(trainer.get("num_nodes", 1)) == 1


def check_recipe(
    recipe: Mapping[str, Any] | DictConfig | None, trainer: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Check a recipe as configuration, without building anything.

    Args:
        recipe: ``{entry name: _target_ node}``, e.g. ``cfg.recipe``.
        trainer: the trainer's keyword arguments (``cfg.trainer``), for the ``max_epochs`` check.

    Returns:
        The resolved recipe as plain data.

    Raises:
        RecipeError: a node lacks a ``_target_`` or it does not import; a key is not an argument
            of the target (the accepted ones are listed); a required argument is missing; a
            ``*_epoch`` argument is past ``trainer.max_epochs``.
    """
    entries = recipe_to_dict(recipe)
    if isinstance(trainer, DictConfig):
        trainer = OmegaConf.to_container(trainer, resolve=True)  # type: ignore[assignment]
    max_epochs = _max_epochs(trainer)
    for name, node in entries.items():
        where = f"recipe.{name}"
        arguments = check_target(node, where)
        if max_epochs is None:
            continue
        for key, value in arguments.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key.endswith("_epoch") and is_number and value > max_epochs:
                raise RecipeError(
                    f"{where}.{key}={value:g} is past trainer.max_epochs={max_epochs}; the recipe "
                    f"must act within training: set {where}.{key} <= {max_epochs} or raise "
                    "trainer.max_epochs."
                )
    return entries


def instantiate_nodes(
    nodes: Mapping[str, Any] | DictConfig | None, section: str, kind: type, kind_name: str
) -> dict[str, Any]:
    """Build each ``_target_`` node of a config section, checked against its target's signature.

    Args:
        nodes: ``{entry name: _target_ node}`` (``cfg.recipe``, ``cfg.oneshot``).
        section: the config key, for messages (``recipe`` names ``recipe.<entry>``).
        kind: the class every node must build.
        kind_name: how messages call it (``a lightning Callback``).

    Raises:
        RecipeError: a node has no importable ``_target_``, an unknown or missing argument, a
            value its constructor rejects (the message names ``<section>.<entry>``), or it does
            not build a ``kind``.
    """
    built: dict[str, Any] = {}
    for name, node in recipe_to_dict(nodes).items():
        where = f"{section}.{name}"
        check_target(node, where)
        try:
            value = instantiate(node, _convert_="all")
        except InstantiationException as err:
            # Hydra wraps the constructor's error; the original names the offending field.
            cause = err.__cause__ if err.__cause__ is not None else err
            raise RecipeError(f"{where}: {cause}") from cause
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{where}: {err}") from err
        if not isinstance(value, kind):
            raise RecipeError(
                f"{where}: `_target_`={node['_target_']!r} built a {type(value).__name__}, not "
                f"{kind_name}."
            )
        built[name] = value
    return built


def instantiate_recipe(
    recipe: Mapping[str, Any] | DictConfig | None, trainer: Mapping[str, Any] | None = None
) -> dict[str, Callback]:
    """Check a recipe (:func:`check_recipe`), then build its callbacks, in recipe order.

    Raises:
        RecipeError: as :func:`check_recipe`; or a callback's constructor rejected a value (its
            message, prefixed with the recipe entry); or a target does not build a ``Callback``.
    """
    entries = check_recipe(recipe, trainer)
    return instantiate_nodes(entries, "recipe", Callback, "a lightning Callback")


def _in_recipe(message: str, where: str) -> str:
    """A technique's message about ```field``` as the recipe's, about ```where.field```."""
    if message.startswith("`") and "`" in message[1:]:
        return f"`{where}.{message[1:]}"
    return f"{where}: {message}"


def check_against_model(callbacks: Mapping[str, Callback], pl_module: pl.LightningModule) -> None:
    """Check built recipe callbacks against the model they will act on, before training.

    Reads only the technique interface (:class:`~lightning_sparse.callbacks.CompressionCallback`),
    so a new technique is checked without being named here.

    Raises:
        RecipeError: a technique's check of the model fails (``params`` that match no weight, a
            ``mask_type`` that does not tile a target, no layer to quantize, a layer that does not
            exist; the message names the entry); two entries hold masks on the same weight at
            overlapping epochs; one needs settled weights while another still changes them.
    """
    techniques = {name: cb for name, cb in callbacks.items() if isinstance(cb, CompressionCallback)}
    try:
        check_timing({f"recipe.{name}": cb for name, cb in techniques.items()})
    except ValueError as err:
        raise RecipeError(str(err)) from err
    for name, technique in techniques.items():
        try:
            technique.check_model(pl_module)
        except ValueError as err:
            raise RecipeError(_in_recipe(str(err), f"recipe.{name}")) from err
    holders: dict[str, tuple[str, tuple[float, float]]] = {}
    for name, technique in techniques.items():
        if MASKS not in technique.changes:
            continue
        window = (technique.start_epoch, technique.in_force_until)
        for param_name in technique.resolve_targets(pl_module):
            if param_name in holders:
                other, (start, end) = holders[param_name]
                if window[0] < end and start < window[1]:
                    raise RecipeError(
                        f"recipe.{name} and recipe.{other} both prune {param_name!r} at the same "
                        f"time (epochs from {max(start, window[0]):g}); give them disjoint "
                        "`params`."
                    )
            holders[param_name] = (name, window)


class RecipeRecord(Callback):
    """Stores the resolved recipe inside every checkpoint, so a checkpoint tells how it was made.

    The state is plain data (``torch.load(weights_only=True)`` reads it). On resume the recipe in
    force is the one configured now; the stored one is kept only as :attr:`restored`.

    Args:
        name: the recipe's name (``conf/recipe/<name>.yaml``), if known.
        recipe: the resolved recipe.
        config: the run's whole config (unresolved, as composed), which
            ``python -m lightning_sparse.train resume=<checkpoint>`` continues with; None to
            store none.
    """

    def __init__(
        self,
        name: str | None,
        recipe: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.recipe = recipe_to_dict(recipe)
        self.config = None if config is None else dict(config)
        self.restored: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RecipeRecord(name={self.name!r}, entries={list(self.recipe)})"

    @property
    @override
    def state_key(self) -> str:
        return "recipe"

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name, "recipe": self.recipe}
        if self.config is not None:
            state["config"] = self.config
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = dict(state_dict)


def load(name: str, overrides: Sequence[str] = ()) -> list[Callback]:
    """Build the callbacks of the shipped recipe ``name``, validated, for a plain-Python Trainer.

    The recipe is composed together with the default config so that it is checked against the
    trainer settings it was written for; pass ``trainer.max_epochs=...`` among ``overrides`` to
    check it against yours.

    Args:
        name: a recipe in ``conf/recipe/`` (``dense``, ``gmp``, ``gmp_global``, ``gmp_2of4``, ...).
        overrides: Hydra overrides, e.g. ``["recipe.pruning.final_sparsity=0.95"]``.

    Raises:
        hydra.errors.MissingConfigException: no recipe ``name`` (the message lists the options).
        RecipeError: the recipe is invalid.

    Example::

        trainer = Trainer(max_epochs=30, callbacks=load("gmp", ["recipe.pruning.end_epoch=20"]))
    """
    cfg = compose_config([f"recipe={name}", *overrides])
    return list(instantiate_recipe(cfg.get("recipe"), cfg.get("trainer")).values())
