"""The package's layering, read from the source: imports point one way, techniques by interface.

Layers, lowest first: ``core`` (torch only) <- ``data``, ``models``, ``module`` <- ``callbacks`` <-
``deploy`` <- ``run`` <- ``posttrain`` <- the entry points (``train``, ``oneshot``, ``export``,
``compare``, ``recipe``, the package ``__init__``). A module may import its own layer and those
below; nothing imports an entry point. ``docs/decisions.md`` records why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_sparse"

LAYERS = {
    "core": 0,
    "data": 1,
    "models": 1,
    "module": 1,
    "callbacks": 2,
    "deploy": 3,
    "run": 4,
    "posttrain": 5,
}
ENTRY_POINTS = {"train", "oneshot", "export", "compare", "recipe", "__init__", "__main__"}
ENTRY_LAYER = 6
# Third-party packages that only some layers may import.
HYDRA = ("hydra", "omegaconf")
LIGHTNING = ("lightning", "torchmetrics")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts)


def _unit(path: Path) -> str:
    """The layer name of a file: its top-level folder, or its module name at the top."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _layer(unit: str) -> int:
    return ENTRY_LAYER if unit in ENTRY_POINTS else LAYERS[unit]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every imported module name with its line, at any depth (lazy imports count too)."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lightning_sparse":
                found.extend((f"lightning_sparse.{a.name}", node.lineno) for a in node.names)
            else:
                found.append((node.module, node.lineno))
    return found


def test_every_module_belongs_to_a_layer() -> None:
    units = {_unit(p) for p in _modules()}
    unknown = units - set(LAYERS) - ENTRY_POINTS
    assert not unknown, f"modules outside the layers of tests/test_layers.py: {sorted(unknown)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    unit = _unit(path)
    own = _layer(unit)
    for name, line in _imports(path):
        if not name.startswith("lightning_sparse."):
            continue
        target = name.split(".")[1]
        if target not in LAYERS and target not in ENTRY_POINTS:
            continue
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        # The package's __init__ re-exports the public `recipe` facade; nothing else imports an
        # entry point.
        facade = unit == "__init__" and target == "recipe"
        assert target not in ENTRY_POINTS or target == unit or facade, f"{where}: an entry point"
        assert _layer(target) <= own, f"{where}, a layer above {unit!r}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_run_and_entry_points_know_hydra(path: Path) -> None:
    unit = _unit(path)
    if unit == "run" or unit in ENTRY_POINTS:
        return
    for name, line in _imports(path):
        assert name.split(".")[0] not in HYDRA, f"{path.name}:{line} imports {name}"
    if unit == "core":
        for name, line in _imports(path):
            top = name.split(".")[0]
            assert top not in LIGHTNING, f"core/{path.name}:{line} imports {name}"


def _technique_classes() -> dict[str, Path]:
    """Each concrete technique class defined under callbacks/, with its module."""
    import lightning_sparse.callbacks as callbacks
    from lightning_sparse.callbacks.base import CompressionCallback

    found = {}
    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        if isinstance(cls, type) and issubclass(cls, CompressionCallback) and cls.changes:
            found[name] = Path(__import__(cls.__module__, fromlist=["_"]).__file__ or "")
    return found


def test_no_code_outside_a_technique_names_its_class() -> None:
    """Recipe checks, reports, plots, export and one-shot read the interface, not the class."""
    techniques = _technique_classes()
    assert {"MagnitudePruning", "QuantizationAwareTraining", "KnowledgeDistillation"} <= set(
        techniques
    )
    offenders = []
    for path in _modules():
        unit = _unit(path)
        if unit == "callbacks" and path.name in ("__init__.py", "base.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in techniques:
                name = node.id
            elif isinstance(node, ast.Attribute) and node.attr in techniques:
                name = node.attr
            else:
                continue
            if techniques[name].resolve() != path.resolve():
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    # One-shot builds its fine-tune's default hold (a ConstantPruning) by name: it constructs
    # the technique, it does not branch on it.
    allowed = {"lightning_sparse/posttrain/oneshot.py"}
    offenders = [o for o in offenders if o.split(":")[0] not in allowed]
    assert not offenders, "code outside a technique names its class:\n" + "\n".join(offenders)
