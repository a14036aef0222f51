"""Every shipped config composes, and every ``_target_`` in it binds to its signature.

Options are discovered from ``conf/``, so a new config file is covered without editing this test.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.run.recipe import (
    RecipeError,
    check_against_model,
    check_target,
    compose_config,
    config_dir,
    instantiate_recipe,
)


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def target_nodes(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``_target_`` node inside ``node``, with its dotted path."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for key, value in node.items():
            yield from target_nodes(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from target_nodes(value, f"{where}[{index}]")


# Values a user must give (`???` in the config), with stand-ins that let the config build here.
USER_SUPPLIED = {
    "data=image_folder": ["data.root=unused", "data.num_classes=3"],
    # A transfer starts from a checkpoint (model.init_from); here the model is built without one.
    "recipe=sparse_transfer": ["model.reset_head=false"],
}
# Recipes written for particular layer names, and the models they do not fit: composing them must
# fail with an error naming the recipe's `params`.
MISFITS = {
    ("gmp_2of4", "resnet18"): "`recipe.pruning.params` entry",
    ("gmp_2of4", "mobilenet_v3_small"): "`recipe.pruning.params` entry",
}


def compose_with_stand_ins(choices: list[str]) -> DictConfig:
    extra = [value for choice in choices for value in USER_SUPPLIED.get(choice, [])]
    return compose_config([*choices, *extra])


def resolved(cfg: DictConfig) -> dict[str, Any]:
    cfg = cfg.copy()
    cfg.output_dir = "unused"  # ${hydra:...} needs a running Hydra app
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return data


def test_the_groups_ship_what_the_readme_promises() -> None:
    assert options("data") == [
        "cifar10",
        "digits",
        "fashion_mnist",
        "image_folder",
        "mnist",
        "mnist5k",
        "synthetic",
    ]
    assert options("model") == ["cnn", "lenet5", "mlp", "mobilenet_v3_small", "resnet18"]
    assert options("trainer") == ["cpu", "ddp", "ddp_sim", "gpu"]
    assert options("logger") == ["csv", "wandb"]
    assert set(options("recipe")) >= {
        "dense",
        "distill",
        "gmp",
        "gmp_distill",
        "gmp_global",
        "gmp_2of4",
        "oneshot_magnitude",
        "oneshot_wanda",
        "gmp_qat",
        "gmp_qat_distill",
        "qat",
        "sparse_transfer",
    }
    assert set(options("compression/pruning")) >= {"gmp", "constant"}
    assert set(options("compression/quantization")) >= {"qat"}
    assert set(options("compression/distillation")) >= {"self"}
    assert set(options("compression/channel")) >= {"macs", "taylor"}
    assert set(options("recipe")) >= {"channel", "channel_qat", "oneshot_channel"}


def test_defaults() -> None:
    cfg = compose_config()
    assert cfg.seed == 0
    assert cfg.task_name == "train"
    assert cfg.ckpt_path is None
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.model._target_.endswith("SmallCNN")
    assert cfg.trainer.accelerator == "cpu"
    # The main job: prune with the dense self as teacher, then QAT.
    assert list(cfg.recipe) == ["pruning", "quantization", "distillation"]


def test_main_job_recipe() -> None:
    # recipe=gmp_qat_distill: prune with the dense self as teacher, then QAT; timing by
    # interpolation, so moving pruning moves the teacher's copy and QAT's start.
    cfg = compose_config(["recipe=gmp_qat_distill"])
    assert list(cfg.recipe) == ["pruning", "quantization", "distillation"]
    assert cfg.recipe.distillation.teacher == "self"
    assert cfg.recipe.distillation.start_epoch == cfg.recipe.pruning.start_epoch
    assert cfg.recipe.quantization.start_epoch == cfg.recipe.pruning.end_epoch
    assert cfg.recipe.pruning.final_sparsity == 0.9
    moved = compose_config(["recipe=gmp_qat_distill", "recipe.pruning.end_epoch=12"])
    assert moved.recipe.quantization.start_epoch == 12


def composes_binds_and_builds(recipe: str, model: str, data: str) -> None:
    cfg = compose_with_stand_ins([f"recipe={recipe}", f"model={model}", f"data={data}"])
    plain = resolved(cfg)
    nodes = list(target_nodes(plain, ""))
    assert {where for where, _ in nodes} >= {"data", "model", "model.model"}
    for where, node in nodes:
        check_target(node, where)
    # The pieces also fit together: the recipe's params match this model, its epochs this
    # trainer, and the model takes this data's samples.
    callbacks = instantiate_recipe(cfg.recipe, cfg.trainer)
    module: pl.LightningModule = instantiate(cfg.model)
    misfit = MISFITS.get((recipe, model))
    if misfit:
        with pytest.raises(RecipeError, match=misfit):
            check_against_model(callbacks, module)
    else:
        check_against_model(callbacks, module)
    shape = tuple(cfg.data.input_shape)
    assert module(torch.zeros(2, *shape)).shape == (2, cfg.data.num_classes)


# Recipe x model (on the default data) and model x data (with the default recipe) cover every pair
# that must fit, without the cost of the whole cross product.
@pytest.mark.parametrize(
    ("recipe", "model"), list(itertools.product(options("recipe"), options("model")))
)
def test_every_recipe_and_model_compose_bind_and_build(recipe: str, model: str) -> None:
    composes_binds_and_builds(recipe, model, "digits")


@pytest.mark.parametrize(
    ("model", "data"), list(itertools.product(options("model"), options("data")))
)
def test_every_model_and_data_compose_bind_and_build(model: str, data: str) -> None:
    composes_binds_and_builds("gmp", model, data)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_binds_to_the_trainer_signature(trainer: str) -> None:
    cfg = compose_config([f"trainer={trainer}"])
    accepted = inspect.signature(pl.Trainer).parameters
    kwargs = resolved(cfg)["trainer"]
    assert set(kwargs) <= set(accepted)
    inspect.signature(pl.Trainer).bind(**kwargs)
    # The shipped recipes fit in every trainer's epochs.
    for recipe in options("recipe"):
        instantiate_recipe(
            compose_config([f"trainer={trainer}", f"recipe={recipe}"]).recipe, cfg.trainer
        )


@pytest.mark.parametrize(
    ("group", "node"),
    [
        (group, node)
        for group in sorted(p.name for p in (config_dir() / "compression").iterdir() if p.is_dir())
        for node in options(f"compression/{group}")
    ],
)
def test_every_compression_node_binds(group: str, node: str) -> None:
    # Composed as a recipe entry would be, so a node that extends another (`defaults`) binds whole.
    cfg = compose_config([f"+compression/{group}@recipe.probe={node}"]).recipe.probe
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    check_target(plain, f"compression.{group}.{node}")


def test_every_logger_binds() -> None:
    for name in options("logger"):
        plain = resolved(compose_config([f"logger={name}"]))
        for where, node in target_nodes(plain["logger"], "logger"):
            check_target(node, where)


def test_cli_style_overrides_reach_the_recipe() -> None:
    cfg = compose_config(["recipe.pruning.final_sparsity=0.95", "recipe.pruning.end_epoch=5"])
    assert cfg.recipe.pruning.final_sparsity == 0.95
    assert cfg.recipe.pruning.end_epoch == 5
    assert "pruning" not in compose_config(["~recipe.pruning"]).recipe


def test_unknown_recipe_lists_the_options() -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_config(["recipe=nope"])
    message = str(info.value)
    assert "Could not find 'recipe/nope'" in message
    for option in options("recipe"):
        assert option in message


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["trainer.max_epoch=3"])
    assert "trainer.max_epoch" in str(info.value)
    assert "Key 'max_epoch' is not in struct" in str(info.value.__cause__)
