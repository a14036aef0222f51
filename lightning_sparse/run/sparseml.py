"""Run SparseML 1.x recipes as they are: read one, map it to our callbacks and settings.

:func:`load_file` reads a SparseML recipe (YAML, or a markdown recipe card with the recipe as
``---`` front matter) and returns a Hydra-style config fragment::

    {"recipe": {entry: {"_target_": "lightning_sparse.callbacks.MagnitudePruning", ...}, ...},
     "trainer": {"max_epochs": 30},
     "model": {"lr": 0.008, "lr_schedule": "cosine", "min_lr_ratio": 0.0}}

:func:`convert` gives the same as the text of a ``conf/recipe/<name>.yaml``. Nothing is built here:
the nodes are plain data, validated later like any recipe (``instantiate_recipe``).

Both SparseML styles are read:

- the tag style: lists of ``!GMPruningModifier``-tagged mappings under top-level keys that contain
  ``modifiers`` (``training_modifiers``, ``pruning_modifiers``, ...), with variables as top-level
  keys (``num_epochs: 10.0``) used through YAML anchors (``*num_epochs``), ``eval(num_epochs - 2)``
  or the plain name as a value;
- the staged style: ``<name>_stage:`` mappings, each with its own variables and
  ``<group>_modifiers`` (tag lists, or ``ModifierName: {fields}`` mappings as SparseML 1.6+
  writes them, whose renamed fields ``start``/``end``/``update``/``targets``/``mask_structure``/
  ``apply_globally``/``update_scheduler`` are read as ``start_epoch``/``end_epoch``/
  ``update_frequency``/``params``/``mask_type``/``global_sparsity``/``inter_func``). Stage
  variables override top-level ones.

Stages run one after another, as SparseML ran them when it composed stages
(``ScheduledModifierManager.compose_staged``; the 1.6+ session shifts each stage by the end of the
ones before): a stage's epochs count from the end of the stages before it (the largest start or end
epoch among their modifiers, rounded up to a whole epoch, as SparseML's ``max_epochs``), and an
earlier stage's ``end_epoch: -1`` ("to the end") ends where that stage ends. A start of ``-1``
("immediately") is the stage's first epoch.

``eval(...)`` is computed by :func:`evaluate_expression`, a small arithmetic evaluator (numbers,
variables, ``+ - * / // ** %``, unary ``-``/``+``, parentheses, ``abs min max round int float``);
Python is never run. What cannot be expressed is refused with a :class:`RecipeImportError` that
names the modifier (its place in the recipe) and the field. Where our callbacks mean something else
by the same word the value is converted, and :func:`convert` writes down how:

- ``DistillationModifier.hardness``: SparseML mixes ``(1 - h) * task + h * distillation``; our
  :class:`~lightning_sparse.callbacks.KnowledgeDistillation` adds ``hardness * distillation`` to the
  task loss at full weight, so ``h`` becomes ``h / (1 - h)`` (the same loss, scaled by
  ``1 / (1 - h)``). ``h = 1`` (the task loss dropped) has no equivalent and is refused.
- ``mask_type``: SparseML's ``filter`` (whole output channels) is our ``channel``; its ``[1, B]``
  blocks and ``block4`` are our ``blockB``; ``tensorrt`` is ``2:4``. Its ``channel`` (whole *input*
  channels) and blocks across output channels are refused.
- ``params`` are names inside the model SparseML was given; ``prefix`` (``model.``, where
  ``ClassificationModule`` keeps its backbone) is put before names and ``re:`` patterns so they
  name the LightningModule's parameters. ``__ALL__`` is ``__ALL_PRUNABLE__``: we prune Conv/Linear
  weights only.
- ``QuantizationModifier.submodules`` (quantize only these) becomes one ``ignore`` pattern that
  matches every other layer; ``ignore``/``exclude_module_types`` entries that name types our QAT
  never quantizes (``LayerNorm``, ``ReLU``, ...) are left out. Our QAT keeps its own scheme
  (per-channel int8 weights, uint8 inputs); fusing, calibration and activation-placement switches
  are not ours to set and are read but not used.
- ``ConstantPruningModifier`` holds the zeros from the start of training; one that starts later,
  after a ``leave_enabled`` pruning schedule ended, is left out (that schedule already holds its
  zeros), otherwise it is refused. Its ``end_epoch`` is not used: we hold to the end.
- Learning rate: a rate set at the start (``SetLearningRateModifier``, ``init_lr``) is
  ``model.lr``; one cosine over the whole run (``LearningRateFunctionModifier lr_func: cosine``,
  or a single-cycle ``CosineAnnealingWarmRestarts``) is ``model.lr_schedule: cosine`` with
  ``min_lr_ratio = final_lr / init_lr``. Anything else is ``model.lr_phases``, one phase per
  ``SetLearningRateModifier`` (constant from its start), ``LearningRateFunctionModifier``
  (``linear`` or ``cosine`` from ``init_lr`` to ``final_lr`` over its epochs, then held),
  ``CosineAnnealingWarmRestarts`` cycle, ``StepLR`` step or ``MultiStepLR`` milestone (epochs of
  the recipe, moved with the stage); overlapping phases, rising curves and other schedulers are
  refused (``_LR_SUPPORTED``). ``SetWeightDecayModifier`` at the start is
  ``model.weight_decay``.

Supported modifiers are the keys of ``_MODIFIERS``, one row each: add a row to support another.

Example::

    fragment = load_file("recipes/bert-base-12layers_prune90.md", teacher="runs/train/dense")
    callbacks = instantiate_recipe(fragment["recipe"], fragment["trainer"])
    Path("conf/recipe/bert90.yaml").write_text(convert("recipes/bert-base-12layers_prune90.md"))
"""

from __future__ import annotations

import ast
import difflib
import itertools
import logging
import math
import operator
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SUPPORTED_MODIFIERS",
    "RecipeImportError",
    "convert",
    "evaluate_expression",
    "load_file",
]

log = logging.getLogger(__name__)

MAGNITUDE_PRUNING = "lightning_sparse.callbacks.MagnitudePruning"
CONSTANT_PRUNING = "lightning_sparse.callbacks.ConstantPruning"
QUANTIZATION = "lightning_sparse.callbacks.QuantizationAwareTraining"
DISTILLATION = "lightning_sparse.callbacks.KnowledgeDistillation"
ALL_PRUNABLE = "__ALL_PRUNABLE__"

# Tolerance for comparing epochs: far below one optimizer step.
_EPS = 1e-9


class RecipeImportError(ValueError):
    """A SparseML recipe cannot be read or mapped; the message names the modifier and field."""


# --------------------------------------------------------------------------------------------
# eval(): arithmetic only
# --------------------------------------------------------------------------------------------

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "min": min,
    "max": max,
    "round": round,
    "int": int,
    "float": float,
}
_ALLOWED = "numbers, variables, + - * / // ** %, unary - and +, parentheses, and calls to " + (
    "/".join(_FUNCTIONS)
)
# Larger powers are no epoch or rate; refusing them keeps `eval(10 ** 10 ** 10)` from hanging.
_MAX_EXPONENT = 1024


class _UnknownVariableError(RecipeImportError):
    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def evaluate_expression(expression: str, variables: Mapping[str, float], field: str) -> float:
    """Compute the arithmetic ``expression`` (the inside of a recipe's ``eval(...)``).

    Args:
        expression: e.g. ``num_epochs - 2``.
        variables: the numbers it may name.
        field: where it stands in the recipe, for messages (``pruning_modifiers[0]
            (GMPruningModifier).end_epoch``).

    Returns:
        The value, an int or a float.

    Raises:
        RecipeImportError: the expression is not arithmetic (attribute access, other calls,
            subscripts, lambdas, strings, ...), names an unknown variable, divides by zero, or
            raises to a power above 1024; the message names ``field`` and the expression.
    """
    text = expression.strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise RecipeImportError(
            f"{field}: eval({text}) is not an arithmetic expression ({err.msg}); allowed: "
            f"{_ALLOWED}."
        ) from None
    return _evaluate_node(tree.body, variables, field, text)


def _evaluate_node(node: ast.expr, variables: Mapping[str, float], field: str, text: str) -> Any:
    def refuse(what: str) -> RecipeImportError:
        return RecipeImportError(
            f"{field}: eval({text}) contains {what} `{ast.unparse(node)}`, which a recipe may not "
            f"use: recipes are data, eval() only computes arithmetic ({_ALLOWED})."
        )

    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        raise refuse(f"the {type(node.value).__name__} constant")
    if isinstance(node, ast.Name):
        if node.id in variables:
            return variables[node.id]
        close = difflib.get_close_matches(node.id, list(variables), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(sorted(variables)) or "none"
        raise _UnknownVariableError(
            f"{field}: eval({text}) names {node.id!r}, which is not a numeric recipe variable"
            f"{hint}; variables: {known}.",
            node.id,
        )
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate_node(node.left, variables, field, text)
        right = _evaluate_node(node.right, variables, field, text)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise RecipeImportError(
                f"{field}: eval({text}) raises to the power {right}; exponents above "
                f"{_MAX_EXPONENT} are refused."
            )
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise RecipeImportError(f"{field}: eval({text}) divides by zero.") from None
        if isinstance(result, complex):
            raise RecipeImportError(f"{field}: eval({text}) is not a real number.")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate_node(node.operand, variables, field, text))
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS or node.keywords:
            raise refuse("the call")
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            raise refuse("the starred argument in")
        args = [_evaluate_node(arg, variables, field, text) for arg in node.args]
        try:
            return _FUNCTIONS[name](*args)
        except (TypeError, ValueError, OverflowError) as err:
            raise RecipeImportError(f"{field}: eval({text}): {err}.") from None
    kinds = {
        ast.Attribute: "the attribute access",
        ast.Subscript: "the subscript",
        ast.Lambda: "the lambda",
        ast.BinOp: "the operator",
        ast.UnaryOp: "the operator",
    }
    raise refuse(kinds.get(type(node), f"the {type(node).__name__} expression"))


def _eval_inner(value: Any) -> str | None:
    """The expression of an ``eval(...)`` string, None for any other value."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("eval(") and text.endswith(")"):
            return text[5:-1]
    return None


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


@dataclass
class _Tagged:
    """A ``!ModifierName`` node: its name and fields, as read (nothing is constructed)."""

    name: str
    args: dict[str, Any]


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``!Modifier`` tags as data and ``1e-5`` as a number."""


def _construct_tagged(loader: _RecipeLoader, suffix: str, node: yaml.Node) -> _Tagged:
    name = suffix.rsplit(".", 1)[-1]  # `!pytorch.GMPruningModifier` names the framework too
    if isinstance(node, yaml.MappingNode):
        return _Tagged(name, dict(loader.construct_mapping(node, deep=True)))
    if isinstance(node, yaml.ScalarNode) and not node.value:
        return _Tagged(name, {})
    raise RecipeImportError(f"`!{suffix}` must be followed by a mapping of its fields.")


_RecipeLoader.add_multi_constructor("!", _construct_tagged)
# YAML 1.1 reads `1e-5` (no dot) as a string; SparseML turned those into numbers later on.
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_FRONT_MATTER = re.compile(r"^(?:---|\+\+\+)[ \t]*\r?\n(.*?)^(?:---|\+\+\+)[ \t]*$", re.S | re.M)


def _recipe_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    is_markdown = path.suffix.lower() in (".md", ".markdown")
    starts_with_marker = text.lstrip().startswith(("---", "+++"))
    if is_markdown or starts_with_marker:
        match = _FRONT_MATTER.search(text)
        if match:
            return match.group(1)
        if is_markdown:
            raise RecipeImportError(
                "a markdown recipe card must hold the recipe as YAML front matter between two "
                "`---` lines; none found."
            )
    return text


def _override(node: yaml.Node | None, overrides: Mapping[str, Any]) -> None:
    """Set recipe variables in the YAML node tree, before anything is constructed.

    A variable's value node is shared with every ``*alias`` of its ``&anchor``, so the new value
    reaches those uses too (SparseML's own overrides missed them). Variables of that name at the
    top, in every stage and in their ``args`` are set (never a modifier's field); a name that is
    no variable is an error.
    """
    found: set[str] = set()

    def visit(mapping: yaml.Node, depth: int) -> None:
        if not isinstance(mapping, yaml.MappingNode) or depth > 2:
            return
        for key_node, value_node in mapping.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else ""
            if key in overrides and isinstance(value_node, yaml.ScalarNode):
                value = overrides[key]
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise RecipeImportError(
                        f"variable {key!r}: an override must be a number or a string; "
                        f"got {value!r}."
                    )
                kind = "int" if isinstance(value, int) else "float"
                value_node.tag = f"tag:yaml.org,2002:{'str' if isinstance(value, str) else kind}"
                value_node.value = str(value)
                found.add(key)
            elif isinstance(value_node, yaml.MappingNode) and not _is_group(key):
                visit(value_node, depth + 1)

    if node is not None:
        visit(node, 0)
    missing = sorted(set(overrides) - found)
    if missing:
        raise RecipeImportError(
            f"variables {missing} are not set in the recipe (as a number or string at the top or "
            "in a stage), so they cannot be overridden."
        )


def _parse(text: str, overrides: Mapping[str, Any]) -> Any:
    loader = _RecipeLoader(text)  # a SafeLoader subclass: no object is ever built
    try:
        node = loader.get_single_node()
        if overrides:
            _override(node, overrides)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as err:
        raise RecipeImportError(f"not valid YAML: {err}") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------
# Structure: stages, modifier groups, variables
# --------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    name: str | None
    variables: dict[str, Any]
    groups: list[tuple[str, Any]]


def _is_group(key: Any) -> bool:
    return isinstance(key, str) and "modifiers" in key


def _is_stage(value: Any) -> bool:
    return isinstance(value, dict) and any(_is_group(key) for key in value)


def _split(container: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """A mapping's variables and its modifier groups, in file order."""
    variables: dict[str, Any] = {}
    groups: list[tuple[str, Any]] = []
    for key, value in container.items():
        if _is_group(key):
            groups.append((str(key), value))
        elif key == "args" and isinstance(value, dict):  # SparseML 1.6+ keeps variables here
            variables.update({str(k): v for k, v in value.items()})
        elif key in ("stages", "metadata", "version") or _is_stage(value):
            continue
        elif not isinstance(value, dict):
            variables[str(key)] = value
    return variables, groups


def _stages(container: Any) -> tuple[dict[str, Any], list[_Stage]]:
    """Top-level variables and the stages (one unnamed stage for a recipe without stages)."""
    if isinstance(container, (_Tagged, list)):
        return {}, [_Stage(None, {}, [("modifiers", container)])]
    if not isinstance(container, dict):
        raise RecipeImportError(
            "a recipe is a mapping of variables and modifier lists; got "
            f"{type(container).__name__}."
        )
    variables, groups = _split(container)
    stages = [_Stage(None, {}, groups)] if groups else []
    staged: list[tuple[str, Any]] = [(k, v) for k, v in container.items() if _is_stage(v)]
    if isinstance(container.get("stages"), dict):
        staged += [(str(k), v) for k, v in container["stages"].items() if isinstance(v, dict)]
    for name, body in staged:
        stage_variables, stage_groups = _split(body)
        stages.append(_Stage(str(name), stage_variables, stage_groups))
    if not stages:
        raise RecipeImportError(
            "found no modifiers: list them under keys that contain `modifiers` (e.g. "
            "`pruning_modifiers:`), at the top or inside `<name>_stage:` mappings."
        )
    return variables, stages


def _as_number(value: Any) -> Any:
    """``value`` as an int/float when it is one or a numeric string; else unchanged."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


@dataclass
class _Scope:
    """Resolved variables: numbers (usable in eval) and the rest (usable by name)."""

    numbers: dict[str, Any]
    others: dict[str, Any]

    def child(self, raw: Mapping[str, Any], where: str) -> _Scope:
        """The scope of ``raw`` variables on top of this one (``raw`` wins), evaluated."""
        numbers = dict(self.numbers)
        others = dict(self.others)
        pending: dict[str, str] = {}
        for name, value in raw.items():
            numbers.pop(name, None)
            others.pop(name, None)
            value = _as_number(value)
            inner = _eval_inner(value)
            if inner is not None:
                pending[name] = inner
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[name] = value
            else:
                others[name] = value
        # Variables may name each other in any order: evaluate until nothing more resolves.
        unknown: dict[str, _UnknownVariableError] = {}
        while pending:
            progress = False
            for name, inner in list(pending.items()):
                if inner.strip() in others:
                    others[name] = others[inner.strip()]
                else:
                    try:
                        numbers[name] = evaluate_expression(
                            inner, numbers, f"{where}variable `{name}`"
                        )
                    except _UnknownVariableError as err:
                        unknown[name] = err
                        continue
                del pending[name]
                unknown.pop(name, None)
                progress = True
            if not progress:
                name = next(iter(pending))
                raise RecipeImportError(
                    f"{unknown[name]} (Variables that name each other in a cycle never resolve.)"
                )
        return _Scope(numbers, others)

    def value(self, value: Any, where: str) -> Any:
        """A modifier's field with ``eval(...)`` and plain variable names replaced."""
        inner = _eval_inner(value)
        if inner is not None:
            if inner.strip() in self.others:
                return self.others[inner.strip()]
            return evaluate_expression(inner, self.numbers, where)
        if isinstance(value, str) and value in self.numbers:
            return self.numbers[value]
        if isinstance(value, list):
            return [self.value(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.value(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, _Tagged):
            raise RecipeImportError(f"{where}: a modifier (`!{value.name}`) inside a field.")
        return value


# --------------------------------------------------------------------------------------------
# Modifiers: the table of what each one maps to
# --------------------------------------------------------------------------------------------


@dataclass
class _Modifier:
    kind: str
    where: str
    args: dict[str, Any]
    start: float
    end: float
    # end_epoch as written, before stages move it (QuantizationModifier insists on -1).
    written_end: float
    # Other epochs that move with the stage (quantization's observer/BN freezes).
    epochs: dict[str, float | None] = field(default_factory=dict)


@dataclass
class _Context:
    prefix: str
    teacher: str | None
    run_end: float | None
    modifiers: list[_Modifier]
    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    model_sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lr_pieces: list[_LrPiece] = field(default_factory=list)

    def set_model(self, key: str, value: Any, where: str) -> None:
        if key in self.model and self.model[key] != value:
            raise RecipeImportError(
                f"{where} sets model.{key}={value!r}, but {self.model_sources[key]} already set "
                f"it to {self.model[key]!r}; one run has one {key}."
            )
        self.model[key] = value
        self.model_sources[key] = where


@dataclass(frozen=True)
class _Spec:
    """How one SparseML modifier maps: the fields it takes and the function that maps it."""

    build: Callable[[_Modifier, _Context], None]
    fields: tuple[str, ...]
    aliases: Mapping[str, str]
    required: tuple[str, ...] = ()
    # Fields holding epochs that move with the stage, besides start_epoch and end_epoch.
    epoch_fields: tuple[str, ...] = ()


_SCHEDULE_ALIASES = {"start": "start_epoch", "end": "end_epoch", "update": "update_frequency"}
_PRUNING_ALIASES = {
    **_SCHEDULE_ALIASES,
    "targets": "params",
    "mask_structure": "mask_type",
    "apply_globally": "global_sparsity",
    "update_scheduler": "inter_func",
}


def _number(value: Any, where: str) -> float:
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeImportError(f"{where}={value!r} is not a number.")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RecipeImportError(f"{where}={value!r} is not true or false.")


def _names(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise RecipeImportError(f"{where}={value!r} must be a name or a list of names.")
    return list(items)


def _prefixed(entry: str, prefix: str) -> str:
    """A SparseML parameter/module name or ``re:`` pattern, as a name in the LightningModule."""
    if not prefix or entry == ALL_PRUNABLE:
        return entry
    if entry.startswith("re:"):
        pattern = entry[3:].removeprefix("^")
        return f"re:{re.escape(prefix)}(?:{pattern})"
    return prefix + entry


def _params(value: Any, where: str, prefix: str) -> list[str]:
    entries = _names(value, where)
    if not entries:
        raise RecipeImportError(f"{where} is empty; name the weights to prune.")
    # SparseML's __ALL__ is every parameter; we only ever prune Conv/Linear weights.
    return [
        ALL_PRUNABLE if e in ("__ALL__", ALL_PRUNABLE) else _prefixed(e, prefix) for e in entries
    ]


def _refuse_unless(condition: bool, where: str, value: Any, why: str) -> None:
    if not condition:
        raise RecipeImportError(f"{where}={value!r}: {why}")


def _mask_type(value: Any, where: str) -> str:
    """SparseML's ``mask_type`` as ours (see the module docstring for the correspondence)."""
    supported = (
        "supported: 'unstructured', 'N:M' (e.g. '2:4'), 'tensorrt' (2:4), 'block4'/'block' or "
        "[1, B] (B consecutive input weights), 'filter' (whole output channels)"
    )
    shape = re.fullmatch(r"\s*[\[(]\s*(-?\d+)\s*,\s*(-?\d+)\s*[\])]\s*", str(value))
    if shape:  # SparseML also read block shapes written as strings, "[1, 4]"
        value = [int(shape.group(1)), int(shape.group(2))]
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if value == [1, 1]:
                return "unstructured"
            if value[0] == 1 and value[1] >= 2:
                return f"block{value[1]}"
        raise RecipeImportError(
            f"{where}={value!r}: a block shape [out, in] is supported as [1, B] (B consecutive "
            "weights along the input dimension); blocks across output channels are not. "
            f"{supported}."
        )
    text = str(value).strip()
    if text in ("unstructured", "0:0"):
        return "unstructured"
    if text in ("block", "block4"):
        return "block4"
    if re.fullmatch(r"block\d+", text):
        return text
    if text == "tensorrt":
        return "2:4"
    if re.fullmatch(r"\d+:\d+", text):
        return text
    if text == "filter":
        return "channel"
    if text == "channel":
        raise RecipeImportError(
            f"{where}='channel': SparseML's 'channel' removes whole input channels; we prune whole "
            "output channels only (SparseML's 'filter', our 'channel'). "
            f"{supported}."
        )
    raise RecipeImportError(f"{where}={value!r} is not a mask type we can express; {supported}.")


def _build_magnitude(mod: _Modifier, ctx: _Context, global_default: bool = False) -> None:
    a, where = mod.args, mod.where
    init = a.get("init_sparsity", 0.0)
    _refuse_unless(
        init != "__FROM_PARAM__",
        f"{where}.init_sparsity",
        init,
        "starting from each weight's present sparsity is not supported; give a number.",
    )
    _refuse_unless(
        not _flag(a.get("phased", False), f"{where}.phased"),
        f"{where}.phased",
        a.get("phased"),
        "AC/DC phases are not supported.",
    )
    score = a.get("score_type", "magnitude")
    _refuse_unless(score == "magnitude", f"{where}.score_type", score, "only 'magnitude'.")
    _refuse_unless(
        not a.get("scheduler_args"),
        f"{where}.scheduler_args",
        a.get("scheduler_args"),
        "scheduler arguments are not supported; the interpolation is `inter_func`.",
    )
    if mod.end < 0:
        raise RecipeImportError(
            f"{where}.end_epoch={mod.end:g}: a pruning schedule that never ends has no epoch to "
            "reach final_sparsity at; give an end_epoch."
        )
    inter_func = a.get("inter_func", "cubic")
    _refuse_unless(
        inter_func in ("linear", "cubic", "inverse_cubic"),
        f"{where}.inter_func",
        inter_func,
        "supported: linear, cubic, inverse_cubic.",
    )
    final = a["final_sparsity"]
    if isinstance(final, dict):
        # SparseML's {sparsity: [params]} form: one schedule per sparsity.
        if _names(a.get("params"), f"{where}.params"):
            raise RecipeImportError(
                f"{where}: with final_sparsity as a {{sparsity: [params]}} mapping, params must be "
                "empty ([]), as in SparseML."
            )
        targets = [
            (
                _number(k, f"{where}.final_sparsity key"),
                _params(v, f"{where}.final_sparsity[{k}]", ctx.prefix),
            )
            for k, v in final.items()
        ]
    else:
        targets = [
            (
                _number(final, f"{where}.final_sparsity"),
                _params(a["params"], f"{where}.params", ctx.prefix),
            )
        ]
    for final_sparsity, params in targets:
        node = {
            "_target_": MAGNITUDE_PRUNING,
            "init_sparsity": _number(init, f"{where}.init_sparsity"),
            "final_sparsity": final_sparsity,
            "start_epoch": max(0.0, mod.start),
            "end_epoch": mod.end,
            "update_frequency": _number(a["update_frequency"], f"{where}.update_frequency"),
            "inter_func": inter_func,
            "params": params,
            "global_sparsity": _flag(
                a.get("global_sparsity", global_default), f"{where}.global_sparsity"
            ),
            "mask_type": _mask_type(a.get("mask_type", "unstructured"), f"{where}.mask_type"),
            "leave_enabled": _flag(a.get("leave_enabled", True), f"{where}.leave_enabled"),
        }
        ctx.entries.append(("pruning", node))


def _build_global_magnitude(mod: _Modifier, ctx: _Context) -> None:
    _build_magnitude(mod, ctx, global_default=True)


def _build_constant(mod: _Modifier, ctx: _Context) -> None:
    params = _params(mod.args["params"], f"{mod.where}.params", ctx.prefix)
    if mod.start > _EPS:
        # Our ConstantPruning holds the zeros there are when training starts. Later on, the only
        # new zeros in a run are a pruning schedule's, and one with leave_enabled holds its own.
        holders = [
            m
            for m in ctx.modifiers
            if m.kind in _PRUNING_SCHEDULES
            and 0 <= m.end <= mod.start + _EPS
            and _flag(m.args.get("leave_enabled", True), f"{m.where}.leave_enabled")
        ]
        if not holders:
            raise RecipeImportError(
                f"{mod.where}.start_epoch={mod.start:g}: holding zeros from a later epoch is not "
                "supported; our ConstantPruning holds the zeros the model has when training starts "
                "(start_epoch 0), or a pruning schedule with leave_enabled holds its own."
            )
        ctx.notes.append(
            f"{mod.where} (from epoch {mod.start:g}) is left out: {holders[-1].where} keeps its "
            "zeros after it ends (leave_enabled)."
        )
        return
    ctx.entries.append(("constant_pruning", {"_target_": CONSTANT_PRUNING, "params": params}))


# Types our QAT never quantizes (it quantizes Conv/Linear): ignoring them changes nothing.
_NOT_QUANTIZED = frozenset(
    (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm2d",
        "ReLU",
        "ReLU6",
        "GELU",
        "SiLU",
        "Tanh",
        "Sigmoid",
        "Softmax",
        "Hardswish",
        "Hardsigmoid",
        "LeakyReLU",
        "Dropout",
        "Identity",
        "Flatten",
        "Embedding",
        "MaxPool1d",
        "MaxPool2d",
        "MaxPool3d",
        "AvgPool1d",
        "AvgPool2d",
        "AvgPool3d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "AdaptiveAvgPool3d",
        "QuantStub",
        "DeQuantStub",
        "Add",
        "MatMul",
    )
)


def _ignore_entries(value: Any, where: str, prefix: str, notes: list[str]) -> list[str]:
    entries: list[str] = []
    for entry in _names(value, where):
        if re.fullmatch(r"[A-Z][A-Za-z0-9_]*", entry):  # a type name, not a module path
            if entry in _NOT_QUANTIZED:
                notes.append(f"{where}: {entry} is left out; our QAT quantizes only Conv/Linear.")
            else:
                entries.append(entry)
        else:
            entries.append(_prefixed(entry, prefix))
    return entries


def _build_quantization(mod: _Modifier, ctx: _Context) -> None:
    a, where = mod.args, mod.where
    _refuse_unless(
        mod.written_end == -1,
        f"{where}.end_epoch",
        mod.written_end,
        "quantization cannot end; SparseML only allows -1.",
    )
    checks: list[tuple[str, bool, str]] = [
        ("reduce_range", not _flag(a.get("reduce_range", False), where), "not supported."),
        (
            "tensorrt",
            not _flag(a.get("tensorrt", False), where),
            "TensorRT's scheme is not supported.",
        ),
        ("activation_bits", _number(a.get("activation_bits", 8), where) == 8, "inputs are 8-bit."),
        ("weight_bits", _number(a.get("weight_bits", 8), where) in (4, 8), "supported: 8, 4."),
        ("scheme", a.get("scheme") in (None, "default", "deepsparse"), "only the default scheme."),
        ("scheme_overrides", not a.get("scheme_overrides"), "not supported."),
        (
            "custom_quantizable_module_types",
            not a.get("custom_quantizable_module_types"),
            "we quantize Conv/Linear.",
        ),
        ("activation_qconfig_kwargs", not a.get("activation_qconfig_kwargs"), "not supported."),
        ("weight_qconfig_kwargs", not a.get("weight_qconfig_kwargs"), "not supported."),
        (
            "post_oneshot_calibration",
            not _flag(a.get("post_oneshot_calibration", False), where),
            "not supported.",
        ),
    ]
    for name, ok, why in checks:
        _refuse_unless(ok, f"{where}.{name}", a.get(name), why)
    _note_unused(
        mod,
        ctx,
        _QAT_UNUSED,
        "our QAT fuses nothing, needs no calibration and places "
        "its own fake-quantization (int8 weights per channel, uint8 layer inputs)",
    )
    ignore = _ignore_entries(a.get("ignore"), f"{where}.ignore", ctx.prefix, ctx.notes)
    ignore += _ignore_entries(
        a.get("exclude_module_types"), f"{where}.exclude_module_types", ctx.prefix, ctx.notes
    )
    if a.get("submodules") is not None:
        submodules = _names(a["submodules"], f"{where}.submodules")
        if not submodules:
            raise RecipeImportError(f"{where}.submodules is empty: there is nothing to quantize.")
        alternatives = "|".join(re.escape(ctx.prefix + s) for s in submodules)
        # Every layer outside the submodules stays in float (`re:` matches from the start).
        ignore.append(f"re:(?!(?:{alternatives})(?:\\.|$))")
    node = {
        "_target_": QUANTIZATION,
        "start_epoch": max(0.0, mod.start),
        "freeze_bn_stats_epoch": mod.epochs.get("freeze_bn_stats_epoch"),
        "disable_quantization_observer_epoch": mod.epochs.get(
            "disable_quantization_observer_epoch"
        ),
        "num_bits": int(_number(a.get("weight_bits", 8), where)),
        "ignore": ignore,
    }
    ctx.entries.append(("quantization", node))


def _note_unused(mod: _Modifier, ctx: _Context, fields: tuple[str, ...], why: str) -> None:
    given = {f: mod.args[f] for f in fields if mod.args.get(f) is not None}
    if given:
        listed = ", ".join(f"{k}={v!r}" for k, v in given.items())
        ctx.notes.append(f"{mod.where}: {listed} not used: {why}.")


def _build_distillation(mod: _Modifier, ctx: _Context) -> None:
    a, where = mod.args, mod.where
    hardness = _number(a.get("hardness", 0.5), f"{where}.hardness")
    if not 0 < hardness < 1:
        raise RecipeImportError(
            f"{where}.hardness={hardness:g}: SparseML trains on (1 - hardness) * task loss + "
            "hardness * distillation loss; our KnowledgeDistillation keeps the task loss at weight "
            "1 and adds hardness * distillation loss, so SparseML's h is our h / (1 - h) for "
            "0 < h < 1 "
            "(e.g. 0.5 -> 1.0, 0.9 -> 9.0). hardness 1 (the task loss dropped) has no equivalent; "
            "set it below 1."
        )
    _note_unused(
        mod,
        ctx,
        ("distill_output_keys", "teacher_input_keys"),
        "our distillation takes the logits the module passes to compression_loss",
    )
    ours = hardness / (1.0 - hardness)
    ctx.notes.append(
        f"{where}.hardness={hardness:g} ((1-h)*task + h*distillation) is hardness={ours:g} here "
        "(task + hardness*distillation: the same loss up to a constant factor)."
    )
    node = {
        "_target_": DISTILLATION,
        "teacher": ctx.teacher,
        "hardness": ours,
        "temperature": _number(a.get("temperature", 2.0), f"{where}.temperature"),
        "start_epoch": max(0.0, mod.start),
        "end_epoch": None if mod.end < 0 else mod.end,
    }
    ctx.entries.append(("distillation", node))


def _build_epochs(mod: _Modifier, ctx: _Context) -> None:
    # Training runs from epoch 0 to the last range's end; a later stage's range starts where the
    # stages before it end, so start_epoch says nothing of its own.
    if mod.end <= 0:
        raise RecipeImportError(f"{mod.where}.end_epoch={mod.end:g}: give the last epoch (> 0).")
    max_epochs = math.ceil(mod.end - _EPS)
    ctx.trainer["max_epochs"] = max(max_epochs, ctx.trainer.get("max_epochs", 0))


_LR_SUPPORTED = (
    "supported: SetLearningRateModifier, LearningRateFunctionModifier with lr_func linear or "
    "cosine (decaying: final_lr <= init_lr), and LearningRateModifier with lr_class "
    "CosineAnnealingWarmRestarts, StepLR or MultiStepLR and an init_lr, for all parameters; a "
    "rate set at the start and one cosine over the whole run are model.lr and "
    "model.lr_schedule, anything per phase is model.lr_phases"
)


@dataclass
class _LrPiece:
    """One phase of the learning rate a modifier asks for (an entry of ``model.lr_phases``)."""

    where: str
    start: float
    end: float | None  # None: until the next phase or the end of training
    lr: float
    schedule: str = "constant"
    min_lr_ratio: float = 0.0

    def phase(self) -> dict[str, Any]:
        phase: dict[str, Any] = {"start_epoch": self.start, "lr": self.lr}
        if self.schedule != "constant":
            phase |= {"schedule": self.schedule, "min_lr_ratio": self.min_lr_ratio}
        if self.end is not None:
            phase["end_epoch"] = self.end
        return phase


def _whole_run(mod: _Modifier, ctx: _Context) -> bool:
    reaches_end = mod.end < 0 or ctx.run_end is None or mod.end >= ctx.run_end - _EPS
    return mod.start <= _EPS and reaches_end


def _no_param_groups(mod: _Modifier) -> None:
    groups = mod.args.get("param_groups")
    _refuse_unless(
        not groups, f"{mod.where}.param_groups", groups, "one learning rate for all parameters."
    )


def _lr_end(mod: _Modifier) -> float | None:
    return None if mod.end < 0 else mod.end


def _decay(mod: _Modifier, init: float, final: float, what: str) -> float:
    """``final / init`` for a curve that decays from ``init`` to ``final``."""
    if init <= 0 or not 0 <= final <= init:
        raise RecipeImportError(
            f"{mod.where}: {what} from {init:g} to {final:g} cannot be expressed; a phase decays "
            f"from lr > 0 to lr * min_lr_ratio with min_lr_ratio in [0, 1]; {_LR_SUPPORTED}."
        )
    return final / init


def _build_set_lr(mod: _Modifier, ctx: _Context) -> None:
    _no_param_groups(mod)
    rate = mod.args.get("learning_rate")
    if rate is None:
        return
    value = _number(rate, f"{mod.where}.learning_rate")
    ctx.lr_pieces.append(_LrPiece(mod.where, max(0.0, mod.start), None, value))


def _build_lr_function(mod: _Modifier, ctx: _Context) -> None:
    _no_param_groups(mod)
    a = mod.args
    func = a.get("lr_func")
    if func not in ("linear", "cosine"):
        span = f"epochs {max(0.0, mod.start):g} to {'the end' if mod.end < 0 else f'{mod.end:g}'}"
        raise RecipeImportError(
            f"{mod.where}: lr_func={func!r} over {span} cannot be expressed; {_LR_SUPPORTED}."
        )
    init = _number(a["init_lr"], f"{mod.where}.init_lr")
    final = _number(a["final_lr"], f"{mod.where}.final_lr")
    ratio = _decay(mod, init, final, f"lr_func={func!r}")
    ctx.lr_pieces.append(
        _LrPiece(mod.where, max(0.0, mod.start), _lr_end(mod), init, func, ratio),
    )


def _build_lr(mod: _Modifier, ctx: _Context) -> None:
    _no_param_groups(mod)
    a = mod.args
    kwargs = a.get("lr_kwargs") or {}
    lr_class = a.get("lr_class")
    start = max(0.0, mod.start)
    if (
        not isinstance(kwargs, dict)
        or a.get("init_lr") is None
        or lr_class
        not in (
            "CosineAnnealingWarmRestarts",
            "StepLR",
            "MultiStepLR",
        )
    ):
        raise RecipeImportError(
            f"{mod.where}: lr_class={lr_class!r} with lr_kwargs={kwargs!r} from epoch "
            f"{start:g} cannot be expressed; {_LR_SUPPORTED}."
        )
    init = _number(a["init_lr"], f"{mod.where}.init_lr")
    end = _lr_end(mod)
    if end is None and ctx.run_end is None and lr_class != "MultiStepLR":
        raise RecipeImportError(
            f"{mod.where}: lr_class={lr_class!r} repeats until the end of training, which the "
            "recipe does not give (add an EpochRangeModifier or an end_epoch)."
        )
    stop = end if end is not None else ctx.run_end
    pieces: list[_LrPiece] = []
    if lr_class == "CosineAnnealingWarmRestarts":
        cycle = _number(kwargs.get("cycle_epochs", kwargs.get("T_0")), f"{mod.where}.cycle_epochs")
        growth = _number(kwargs.get("T_mult", 1), f"{mod.where}.lr_kwargs.T_mult")
        floor = _number(
            kwargs.get("lr_min", kwargs.get("eta_min", 0.0)), f"{mod.where}.lr_kwargs.lr_min"
        )
        ratio = _decay(mod, init, floor, "a cosine")
        _refuse_unless(
            cycle > 0 and growth >= 1,
            f"{mod.where}.lr_kwargs",
            kwargs,
            "cycle_epochs > 0, T_mult >= 1.",
        )
        at = start
        assert stop is not None
        while at < stop - _EPS:
            pieces.append(_LrPiece(mod.where, at, min(at + cycle, stop), init, "cosine", ratio))
            at, cycle = at + cycle, cycle * growth
    else:
        gamma = _number(kwargs.get("gamma", 0.1), f"{mod.where}.lr_kwargs.gamma")
        _refuse_unless(0 < gamma <= 1, f"{mod.where}.lr_kwargs.gamma", gamma, "in (0, 1].")
        if lr_class == "StepLR":
            step = _number(kwargs.get("step_size"), f"{mod.where}.lr_kwargs.step_size")
            _refuse_unless(step > 0, f"{mod.where}.lr_kwargs.step_size", step, "> 0 epochs.")
            assert stop is not None
            count = max(1, math.ceil((stop - start) / step - _EPS))
            epochs = [start + i * step for i in range(count)]
        else:
            milestones = kwargs.get("milestones") or []
            # Milestones are epochs of the recipe as written: a stage moves them with its start.
            shift = mod.start - max(0.0, _number(a.get("start_epoch", -1), mod.where))
            written = sorted(_number(m, f"{mod.where}.lr_kwargs.milestones") for m in milestones)
            epochs = [start] + [m + shift for m in written if m + shift > start + _EPS]
        for i, epoch in enumerate(epochs):
            pieces.append(_LrPiece(mod.where, epoch, None, init * gamma**i))
        if end is not None:  # after its end the rate stays where it was
            pieces[-1].end = None
    ctx.lr_pieces.extend(pieces)


def _finish_learning_rate(ctx: _Context) -> None:
    """Learning-rate pieces as model.lr (+ a whole-run cosine), or as model.lr_phases."""
    pieces = ctx.lr_pieces
    if not pieces:
        return
    whole_run_cosine = [
        p
        for p in pieces
        if p.schedule == "cosine"
        and p.start <= _EPS
        and (p.end is None or ctx.run_end is None or p.end >= ctx.run_end - _EPS)
    ]
    at_start = [p for p in pieces if p.start <= _EPS and p.schedule == "constant"]
    if len(whole_run_cosine) + len(at_start) == len(pieces) and len(whole_run_cosine) <= 1:
        for piece in pieces:  # as before phases existed: one rate and at most one cosine
            ctx.set_model("lr", piece.lr, piece.where)
        for piece in whole_run_cosine:
            ctx.set_model("lr_schedule", "cosine", piece.where)
            ctx.set_model("min_lr_ratio", piece.min_lr_ratio, piece.where)
        return
    ordered = sorted(pieces, key=lambda p: p.start)
    for before, after in itertools.pairwise(ordered):
        if after.start <= before.start + _EPS:
            raise RecipeImportError(
                f"{after.where} sets the learning rate from epoch {after.start:g}, as "
                f"{before.where} does; one rate at a time."
            )
        if before.end is not None and before.end > after.start + _EPS:
            raise RecipeImportError(
                f"{before.where} sets the learning rate until epoch {before.end:g}, past "
                f"{after.where}'s start at epoch {after.start:g}; phases must not overlap."
            )
        if before.end is None and before.schedule != "constant" and before.where != after.where:
            raise RecipeImportError(
                f"{before.where} sets the learning rate to the end of training (end_epoch -1), "
                f"past {after.where}'s start at epoch {after.start:g}; phases must not overlap."
            )
    ctx.set_model("lr_phases", [p.phase() for p in ordered], ordered[0].where)
    ctx.notes.append(
        "learning-rate modifiers are model.lr_phases ("
        + ", ".join(f"{p.where} from epoch {p.start:g}" for p in ordered)
        + ")."
    )


def _build_weight_decay(mod: _Modifier, ctx: _Context) -> None:
    _no_param_groups(mod)
    if mod.start > _EPS:
        raise RecipeImportError(
            f"{mod.where} sets the weight decay at start_epoch={mod.start:g}; supported: a weight "
            "decay set at the start (model.weight_decay), not per phase."
        )
    decay = _number(mod.args["weight_decay"], f"{mod.where}.weight_decay")
    ctx.set_model("weight_decay", decay, mod.where)


_GM_FIELDS = (
    "init_sparsity",
    "final_sparsity",
    "start_epoch",
    "end_epoch",
    "update_frequency",
    "params",
    "leave_enabled",
    "inter_func",
    "mask_type",
    "global_sparsity",
    "phased",
    "score_type",
    "scheduler_args",
    "log_types",
)
_GM_REQUIRED = ("final_sparsity", "params", "end_epoch", "update_frequency")
_QAT_FIELDS = (
    "start_epoch",
    "end_epoch",
    "submodules",
    "ignore",
    "exclude_module_types",
    "disable_quantization_observer_epoch",
    "freeze_bn_stats_epoch",
    "weight_bits",
    "activation_bits",
    "reduce_range",
    "tensorrt",
    "scheme",
    "scheme_overrides",
    "custom_quantizable_module_types",
    "activation_qconfig_kwargs",
    "weight_qconfig_kwargs",
    "post_oneshot_calibration",
    # Read but not used: our QAT fuses nothing, calibrates nothing and places its own fake-quant.
    "model_fuse_fn_name",
    "model_fuse_fn_kwargs",
    "num_calibration_steps",
    "quantize_embeddings",
    "quantize_linear_activations",
    "quantize_conv_activations",
    "quantize_embedding_activations",
    "exclude_batchnorm",
    "strict",
    "log_types",
)
_QAT_UNUSED = (
    "model_fuse_fn_name",
    "model_fuse_fn_kwargs",
    "num_calibration_steps",
    "quantize_embeddings",
    "quantize_linear_activations",
    "quantize_conv_activations",
    "quantize_embedding_activations",
    "exclude_batchnorm",
)
_QAT_EPOCHS = ("disable_quantization_observer_epoch", "freeze_bn_stats_epoch")

# The mapping, one row per SparseML modifier.
_MODIFIERS: dict[str, _Spec] = {
    "GMPruningModifier": _Spec(_build_magnitude, _GM_FIELDS, _PRUNING_ALIASES, _GM_REQUIRED),
    "MagnitudePruningModifier": _Spec(_build_magnitude, _GM_FIELDS, _PRUNING_ALIASES, _GM_REQUIRED),
    "GlobalMagnitudePruningModifier": _Spec(
        _build_global_magnitude, _GM_FIELDS, _PRUNING_ALIASES, _GM_REQUIRED
    ),
    "ConstantPruningModifier": _Spec(
        _build_constant,
        ("params", "start_epoch", "end_epoch", "update_frequency", "log_types"),
        _PRUNING_ALIASES,
        ("params",),
    ),
    "QuantizationModifier": _Spec(
        _build_quantization, _QAT_FIELDS, _SCHEDULE_ALIASES, epoch_fields=_QAT_EPOCHS
    ),
    "DistillationModifier": _Spec(
        _build_distillation,
        (
            "start_epoch",
            "end_epoch",
            "hardness",
            "temperature",
            "update_frequency",
            # Read but not used: our distillation takes the logits the module passes.
            "distill_output_keys",
            "teacher_input_keys",
            "log_types",
        ),
        _SCHEDULE_ALIASES,
    ),
    "EpochRangeModifier": _Spec(
        _build_epochs, ("start_epoch", "end_epoch"), _SCHEDULE_ALIASES, ("end_epoch",)
    ),
    "SetLearningRateModifier": _Spec(
        _build_set_lr,
        (
            "learning_rate",
            "start_epoch",
            "end_epoch",
            "param_groups",
            "constant_logging",
            "log_types",
        ),
        _SCHEDULE_ALIASES,
    ),
    "LearningRateFunctionModifier": _Spec(
        _build_lr_function,
        (
            "lr_func",
            "init_lr",
            "final_lr",
            "start_epoch",
            "end_epoch",
            "cycle_epochs",
            "param_groups",
            "update_frequency",
            "log_types",
        ),
        _SCHEDULE_ALIASES,
        ("lr_func", "init_lr", "final_lr"),
    ),
    "LearningRateModifier": _Spec(
        _build_lr,
        (
            "lr_class",
            "lr_kwargs",
            "init_lr",
            "start_epoch",
            "end_epoch",
            "update_frequency",
            "param_groups",
            "constant_logging",
            "log_types",
        ),
        _SCHEDULE_ALIASES,
        ("lr_class",),
    ),
    "SetWeightDecayModifier": _Spec(
        _build_weight_decay,
        (
            "weight_decay",
            "start_epoch",
            "end_epoch",
            "param_groups",
            "constant_logging",
            "log_types",
        ),
        _SCHEDULE_ALIASES,
        ("weight_decay",),
    ),
}
SUPPORTED_MODIFIERS: tuple[str, ...] = tuple(_MODIFIERS)
_PRUNING_SCHEDULES = (
    "GMPruningModifier",
    "MagnitudePruningModifier",
    "GlobalMagnitudePruningModifier",
)
# Entry names, in the order the entries appear in the recipe (recipe order within one).
_ENTRY_NAMES = ("pruning", "constant_pruning", "quantization", "distillation")


def _modifier(name: str, raw: Any, where: str, scope: _Scope) -> _Modifier:
    spec = _MODIFIERS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, SUPPORTED_MODIFIERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeImportError(
            f"{where}: unknown modifier {name!r}{hint}; supported: "
            f"{', '.join(SUPPORTED_MODIFIERS)}."
        )
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeImportError(f"{where}: the fields must be a mapping; got {raw!r}.")
    args: dict[str, Any] = {}
    accepted = list(spec.fields) + [a for a, f in spec.aliases.items() if f in spec.fields]
    for key, value in raw.items():
        canonical = spec.aliases.get(str(key), str(key))
        if canonical not in spec.fields:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeImportError(
                f"{where}: unknown field {key!r}{hint} for {name}; accepted: {', '.join(accepted)}."
            )
        if canonical in args:
            raise RecipeImportError(f"{where}: gives {canonical!r} twice (as {key!r} too).")
        args[canonical] = scope.value(value, f"{where}.{key}")
    for required in spec.required:
        if required not in args:
            aliases = [a for a, f in spec.aliases.items() if f == required]
            also = f" (or {aliases[0]!r})" if aliases else ""
            raise RecipeImportError(f"{where}: {name} needs the field {required!r}{also}.")

    def epoch(key: str) -> float:
        value = args.get(key)
        return -1.0 if value is None else _number(value, f"{where}.{key}")

    epochs = {
        key: None if args.get(key) is None else _number(args[key], f"{where}.{key}")
        for key in spec.epoch_fields
    }
    end = epoch("end_epoch")
    return _Modifier(name, where, args, epoch("start_epoch"), end, end, epochs)


def _max_epochs(modifiers: list[_Modifier]) -> float:
    """SparseML's ``max_epochs``: the largest start or end (not -1), rounded up; -1 for none."""
    values = [math.ceil(v) for m in modifiers for v in (m.start, m.end) if v > -1]
    return float(max(values)) if values else -1.0


def _run_in_sequence(stages: list[list[_Modifier]]) -> list[_Modifier]:
    """All modifiers with each stage moved behind the ones before it (see the module docstring)."""
    composed: list[_Modifier] = []
    for index, stage in enumerate(stages):
        if index:
            offset = max(0.0, _max_epochs(composed))
            for mod in composed:
                if mod.end == -1:  # "to the end" of an earlier stage is that stage's end
                    mod.end = offset
            for mod in stage:
                mod.start = max(0.0, mod.start) + offset
                if mod.end != -1:
                    mod.end += offset
                mod.epochs = {
                    k: None if v is None else max(0.0, v) + offset for k, v in mod.epochs.items()
                }
        composed.extend(stage)
    return composed


def _modifiers_of(stage: _Stage, scope: _Scope) -> list[_Modifier]:
    prefix = f"{stage.name}." if stage.name else ""
    found: list[_Modifier] = []
    for group, value in stage.groups:
        items: list[tuple[str, str, Any]] = []  # (where, modifier name, fields)
        if isinstance(value, _Tagged):
            items.append((f"{prefix}{group}", value.name, value.args))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                where = f"{prefix}{group}[{i}]"
                if isinstance(item, _Tagged):
                    items.append((where, item.name, item.args))
                elif isinstance(item, dict) and len(item) == 1:  # `- ModifierName: {fields}`
                    name, fields = next(iter(item.items()))
                    items.append((where, str(name), fields))
                else:
                    raise RecipeImportError(
                        f"{where}: not a modifier: expected a `!ModifierName` tag or a "
                        f"`ModifierName: {{fields}}` mapping; got {item!r}."
                    )
        elif isinstance(value, dict):  # SparseML 1.6+: `ModifierName: {fields}` per modifier
            items += [(f"{prefix}{group}.{n}", str(n), f) for n, f in value.items()]
        elif value is not None:
            raise RecipeImportError(
                f"{prefix}{group}: expected a list of modifiers; got {value!r}."
            )
        found += [
            _modifier(name, fields, f"{where} ({name})", scope) for where, name, fields in items
        ]
    return found


@dataclass
class _Imported:
    config: dict[str, Any]
    notes: list[str]


def _import(
    path: Path, prefix: str, teacher: str | None, overrides: Mapping[str, Any] | None
) -> _Imported:
    variables, stages = _stages(_parse(_recipe_text(path), overrides or {}))
    top = _Scope({}, {}).child(variables, "")
    per_stage = [
        _modifiers_of(stage, top.child(stage.variables, f"{stage.name}: " if stage.name else ""))
        for stage in stages
    ]
    modifiers = _run_in_sequence(per_stage)
    ranges = [m.end for m in modifiers if m.kind == "EpochRangeModifier" and m.end > 0]
    run_end = max(ranges) if ranges else (_max_epochs(modifiers) if modifiers else -1.0)
    ctx = _Context(prefix, teacher, run_end if run_end > 0 else None, modifiers)
    for mod in modifiers:
        _MODIFIERS[mod.kind].build(mod, ctx)
    _finish_learning_rate(ctx)
    counts = {base: sum(1 for b, _ in ctx.entries if b == base) for base in _ENTRY_NAMES}
    seen: dict[str, int] = {}
    recipe: dict[str, dict[str, Any]] = {}
    for base in _ENTRY_NAMES:  # entries grouped by technique, in recipe order within one
        for entry_base, node in ctx.entries:
            if entry_base != base:
                continue
            index = seen.get(base, 0)
            seen[base] = index + 1
            key = base if index == 0 else f"{base}_{index}"
            if counts[base] > 1:  # two instances of one callback need their own state keys
                node["name"] = key
            recipe[key] = node
    for note in ctx.notes:
        log.info("SparseML recipe %s: %s", path.name, note)
    config = {"recipe": recipe, "trainer": ctx.trainer, "model": ctx.model}
    return _Imported(config, ctx.notes)


def load_file(
    path: str | Path,
    prefix: str = "model.",
    teacher: str | None = "self",
    variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a SparseML 1.x recipe and map it to our recipe, trainer and module settings.

    Args:
        path: a recipe ``.yaml`` or a markdown recipe card (``.md``, the recipe as front matter).
        prefix: put before the recipe's parameter and module names (and into its ``re:``
            patterns), which SparseML took inside the model it was given: ``model.`` for
            ``ClassificationModule`` (and any LightningModule that keeps the network as
            ``self.model``); ``""`` when the recipe's names already are the LightningModule's.
        teacher: the ``teacher`` of a ``DistillationModifier``: ``"self"`` (the dense model at
            ``start_epoch``), a run dir or checkpoint, or None with a ``teacher_model`` set later.
        variables: new values for recipe variables (SparseML's ``recipe_variables``), e.g.
            ``{"num_epochs": 10}``; uses through YAML anchors follow as well as ``eval()``s.

    Returns:
        ``{"recipe": {entry: _target_ node}, "trainer": {...}, "model": {...}}`` as plain data;
        ``trainer`` and ``model`` are empty when the recipe sets nothing there. Entries are named
        ``pruning``, ``pruning_1``, ..., ``constant_pruning``, ``quantization``, ``distillation``.

    Raises:
        RecipeImportError: the file is no recipe; an unknown modifier (the supported ones are
            listed) or field (the accepted ones are listed, with the closest match); Python code
            in ``eval()``; a value we cannot express. The message names the file, the modifier's
            place (``pruning_modifiers[1] (GMPruningModifier)``) and the field.
        FileNotFoundError: ``path`` does not exist.

    Example::

        fragment = load_file("resnet50-pruned_quant.md")
        trainer = Trainer(
            max_epochs=fragment["trainer"]["max_epochs"],
            callbacks=list(instantiate_recipe(fragment["recipe"], fragment["trainer"]).values()),
        )
    """
    path = Path(path)
    try:
        return _import(path, prefix, teacher, variables).config
    except RecipeImportError as err:
        raise RecipeImportError(f"{path}: {err}") from None


def convert(
    path: str | Path,
    prefix: str = "model.",
    teacher: str | None = "self",
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The text of a ``conf/recipe/<name>.yaml`` equivalent to the SparseML recipe at ``path``.

    It holds the full nodes (no ``defaults``), ``trainer``/``model`` settings where the recipe
    sets them, and comments saying where values were converted or modifiers left out. Arguments
    and errors as :func:`load_file`.

    Example::

        Path("conf/recipe/resnet50_pq.yaml").write_text(convert("resnet50-pruned_quant.md"))
        # python -m lightning_sparse.train recipe=resnet50_pq
    """
    path = Path(path)
    try:
        imported = _import(path, prefix, teacher, variables)
    except RecipeImportError as err:
        raise RecipeImportError(f"{path}: {err}") from None
    lines = [
        "# @package _global_",
        f"# Converted from the SparseML recipe {path.name} (lightning_sparse.run.sparseml).",
    ]
    for note in imported.notes:
        lines += textwrap.wrap(
            note,
            98,
            initial_indent="# Note: ",
            subsequent_indent="#   ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    body = {k: v for k, v in imported.config.items() if v}
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(lines) + "\n" + text
