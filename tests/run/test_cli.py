"""Command-line prechecks that answer before Hydra composes a run."""

from __future__ import annotations

import pytest

from lightning_sparse.run.cli import null_group


@pytest.mark.parametrize("override", ["recipe=null", "+recipe=NULL", "model=null"])
def test_a_null_group_gets_its_options(override: str) -> None:
    message = null_group(override)
    assert message is not None
    group = override.lstrip("+").split("=")[0]
    assert message.startswith(f"`{override}`: {group} is a config group; choose one of")
    assert ("recipe=dense" in message) == (group == "recipe")


@pytest.mark.parametrize(
    "override",
    [
        "recipe=gmp",  # a real option
        "ckpt_path=null",  # a value, not a group
        "recipe.quantization=null",  # a node inside the recipe
        "hydra/launcher=null",  # Hydra's own groups are left to Hydra
    ],
)
def test_other_overrides_are_left_alone(override: str) -> None:
    assert null_group(override) is None
