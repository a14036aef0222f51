"""Every shipped config composes, and every ``_target_`` in it binds to its signature.

Entry configs (``conf/*.yaml``), config groups (every folder of ``conf/``) and their options are
discovered from ``conf/``, so a new config file or group is covered without editing this test.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import re
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_sparse.run.console import ConsoleFormatter
from lightning_sparse.run.recipe import (
    RecipeError,
    check_against_model,
    check_target,
    compose_config,
    config_dir,
    instantiate_nodes,
    instantiate_recipe,
)


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def entry_configs() -> list[str]:
    """The primary configs: ``conf/<name>.yaml``, one per entry point."""
    return sorted(path.stem for path in config_dir().glob("*.yaml"))


def config_groups() -> list[str]:
    """Every folder of ``conf/`` that holds options, as a group name (``compression/pruning``)."""
    return sorted(
        {path.parent.relative_to(config_dir()).as_posix() for path in config_dir().rglob("*.yaml")}
        - {"."}
    )


def defaults_groups(config: str) -> list[str]:
    """The groups a config's defaults list chooses from (``override hydra/x`` included)."""
    defaults = OmegaConf.load(config_dir() / f"{config}.yaml").get("defaults") or []
    found = []
    for entry in defaults:
        if isinstance(entry, DictConfig):
            for key in entry:
                key = str(key).removeprefix("override ").removeprefix("optional ")
                found.append(key.split("@")[0].lstrip("/"))
    return found


# What an entry config needs from the user (`???` in it), with stand-ins.
ENTRY_REQUIRED = {"oneshot": ["ckpt_path=unused"], "export": ["ckpt_path=unused"]}


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
    # Token models read their vocabulary and length from token data, and the other way round.
    "model=bert_tiny": ["data=synthetic_text"],
    "model=gpt2_tiny": ["data=synthetic_text"],
    "data=synthetic_text": ["model=bert_tiny"],
}
# Recipes written for particular layer names, and the models they do not fit: composing them must
# fail with an error naming the recipe's `params`.
MISFITS = {
    ("gmp_2of4", "resnet18"): "`recipe.pruning.params` entry",
    ("gmp_2of4", "mobilenet_v3_small"): "`recipe.pruning.params` entry",
    ("sparsity_reg", "mobilenet_v3_small"): "`recipe.regularization.params` entry",
    ("sparsity_reg", "bert_tiny"): "`recipe.regularization.params` entry",
    ("sparsity_reg", "gpt2_tiny"): "`recipe.regularization.params` entry",
    # Network Slimming penalises BatchNorm scales: models without BatchNorm are refused (the CNN
    # has them with model.model.batch_norm=true).
    **{
        ("slimming", model): "`recipe.regularization.params` entry '__ALL_PRUNABLE__' matches no"
        for model in ("cnn", "mlp", "lenet5", "bert_tiny", "gpt2_tiny")
    },
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


def test_a_sized_schedule_is_picked_by_model_data_and_recipe() -> None:
    sized = compose_config(["recipe=qat", "model=resnet18", "data=mnist5k"])
    assert sized.trainer.max_epochs == 4
    assert sized.recipe.quantization.start_epoch == 2.5
    assert sized.recipe.quantization.disable_quantization_observer_epoch == 3.5
    # Another data set keeps the recipe as written; the command line still wins.
    plain = compose_config(["recipe=qat", "model=resnet18", "data=digits"])
    assert plain.trainer.max_epochs == 30
    assert plain.recipe.quantization.start_epoch == 20.0
    chosen = compose_config(
        ["recipe=qat", "model=resnet18", "data=mnist5k", "trainer.max_epochs=6"]
    )
    assert chosen.trainer.max_epochs == 6
    assert chosen.recipe.quantization.start_epoch == 2.5
    slimming = compose_config(["recipe=slimming", "model=resnet18", "data=mnist5k"])
    assert slimming.trainer.max_epochs == 7
    assert slimming.model.lr_schedule == "cosine"
    # the penalty still ends where the channels go
    assert slimming.recipe.regularization.end_epoch == slimming.recipe.channel.start_epoch == 5.0
    # ... and Adam can move a scale by half its initial size in the phase (lr per step at most),
    # so SparsityRegularization's reach warning stays quiet: MNIST5k trains on 70% of 5000 images
    reg, data = slimming.recipe.regularization, slimming.data
    steps = math.ceil(5000 * (1 - data.val_fraction - data.test_fraction) / data.batch_size)
    epochs = reg.end_epoch - reg.start_epoch - reg.ramp_epochs / 2
    assert slimming.model.optimizer == "adam"
    assert slimming.model.lr * epochs * steps >= 0.5


def test_a_models_settings_for_a_data_set_are_picked_by_their_names() -> None:
    for config, required in (("train", []), ("oneshot", ["ckpt_path=x"])):
        assert compose_config([*required, "data=mnist5k"], config_name=config).model.lr == 0.003
        assert compose_config(required, config_name=config).model.lr == 0.01  # digits
        chosen = compose_config([*required, "data=mnist5k", "model.lr=0.02"], config_name=config)
        assert chosen.model.lr == 0.02
    assert compose_config(["data=mnist5k", "model=lenet5"]).model.lr == 0.001  # none for lenet5


def test_every_tuned_config_names_a_model_and_data() -> None:
    names = {f"{model}_{data}" for model in options("model") for data in options("data")}
    assert options("tuned")
    for option in options("tuned"):
        assert option in names, f"conf/tuned/{option}.yaml matches no <model>_<data>"


def test_every_sized_schedule_names_a_model_data_and_recipe() -> None:
    """A misspelt conf/sized file would never be picked: each must name existing options."""
    names = {
        f"{model}_{data}_{recipe}"
        for model in options("model")
        for data in options("data")
        for recipe in options("recipe")
    }
    assert options("sized")
    for option in options("sized"):
        assert option in names, f"conf/sized/{option}.yaml matches no <model>_<data>_<recipe>"


@pytest.mark.parametrize("option", options("sized"))
def test_every_sized_schedule_fits_its_trainer_and_model(option: str) -> None:
    (choice,) = [
        (model, data, recipe)
        for model in options("model")
        for data in options("data")
        for recipe in options("recipe")
        if f"{model}_{data}_{recipe}" == option
    ]
    model, data, recipe = choice
    cfg = compose_config([f"model={model}", f"data={data}", f"recipe={recipe}"])
    plain = compose_config([f"model={model}", f"data={data}", f"recipe={recipe}", "~sized"])
    assert cfg != plain, f"conf/sized/{option}.yaml changes nothing"
    callbacks = instantiate_recipe(cfg.recipe, cfg.trainer)  # every epoch within max_epochs
    check_against_model(callbacks, instantiate(cfg.model))


def test_every_group_is_chosen_somewhere() -> None:
    """A group no entry config, recipe or Hydra plugin chooses from would be dead config."""
    chosen = {group for config in entry_configs() for group in defaults_groups(config)}
    for recipe in options("recipe"):
        chosen.update(defaults_groups(f"recipe/{recipe}"))
    assert set(entry_configs()) == {"export", "oneshot", "train"}
    for group in config_groups():
        # hydra/launcher options are chosen on the command line (hydra/launcher=slurm); early exit
        # is added to any recipe there (+compression/early_exit@recipe.early_exit=default).
        opt_in = group.startswith("hydra/") or group == "compression/early_exit"
        assert group in chosen or opt_in, f"conf/{group} is used by nothing"


@pytest.mark.parametrize(
    ("config", "group", "option"),
    [
        (config, group, option)
        for config in entry_configs()
        for group in defaults_groups(config)
        if not group.startswith("hydra/")
        for option in options(group)
    ],
)
def test_every_option_of_every_entry_group_composes_and_binds(
    config: str, group: str, option: str
) -> None:
    extra = [*ENTRY_REQUIRED.get(config, []), *USER_SUPPLIED.get(f"{group}={option}", [])]
    cfg = compose_config([f"{group}={option}", *extra], config_name=config)
    plain = resolved(cfg)
    nodes = list(target_nodes(plain, ""))
    assert nodes
    for where, node in nodes:
        check_target(node, where)
    if group == "callbacks":
        built = instantiate_nodes(plain["callbacks"], "callbacks", Callback, "a Callback")
        assert set(built) == set(plain["callbacks"])


@pytest.mark.parametrize("config", entry_configs())
def test_every_entry_config_composes_with_hydra_and_binds(config: str) -> None:
    cfg = compose_config(
        ENTRY_REQUIRED.get(config, []), config_name=config, return_hydra_config=True
    )
    for where, node in target_nodes(
        resolved(compose_config(ENTRY_REQUIRED.get(config, []), config_name=config)), ""
    ):
        check_target(node, where)
    callbacks = OmegaConf.to_container(cfg.hydra.callbacks, resolve=True)
    for where, node in target_nodes(callbacks, "hydra.callbacks"):
        check_target(node, where)
    # Our job logging: a message alone on the console, the details in the job's log file.
    formatter = cfg.hydra.job_logging.formatters.console["()"]
    assert get_object(formatter) is ConsoleFormatter


@pytest.mark.parametrize("option", options("hydra/launcher"))
def test_every_launcher_composes(option: str) -> None:
    cfg = compose_config([f"hydra/launcher={option}"], return_hydra_config=True)
    assert get_object(cfg.hydra.launcher._target_)


def test_the_groups_ship_what_the_readme_promises() -> None:
    assert options("data") == [
        "cifar10",
        "digits",
        "fashion_mnist",
        "image_folder",
        "mnist",
        "mnist5k",
        "synthetic",
        "synthetic_text",
    ]
    assert options("model") == [
        "bert_tiny",
        "cnn",
        "gpt2_tiny",
        "lenet5",
        "mlp",
        "mobilenet_v3_small",
        "resnet18",
    ]
    assert options("trainer") == ["cpu", "ddp", "ddp_sim", "gpu"]
    assert options("logger") == ["csv", "wandb"]
    assert options("callbacks") == ["default", "early_stopping"]
    assert options("debug") == ["quick"]
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
    assert set(options("compression/low_rank")) >= {"default"}
    assert set(options("recipe")) >= {"low_rank", "low_rank_qat"}


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


# Token models read token ids; the image models read images.
TEXT_MODELS = {"bert_tiny", "gpt2_tiny"}
TEXT_DATA = {"synthetic_text"}


def data_for(model: str) -> str:
    return "synthetic_text" if model in TEXT_MODELS else "digits"


def fits(model: str, data: str) -> bool:
    return (model in TEXT_MODELS) == (data in TEXT_DATA)


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
    if data in TEXT_DATA:  # a class per token
        ids = torch.ones(2, *shape, dtype=torch.int64)
        logits = module({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert logits.shape == (2, *shape, cfg.data.num_classes)
    else:
        assert module(torch.zeros(2, *shape)).shape == (2, cfg.data.num_classes)


# Recipe x model (on the default data, text data for token models) and model x data (with the
# default recipe; image models with image data, token models with text data) cover every pair that
# must fit, without the cost of the whole cross product.
@pytest.mark.parametrize(
    ("recipe", "model"), list(itertools.product(options("recipe"), options("model")))
)
def test_every_recipe_and_model_compose_bind_and_build(recipe: str, model: str) -> None:
    composes_binds_and_builds(recipe, model, data_for(model))


@pytest.mark.parametrize(
    ("model", "data"),
    [pair for pair in itertools.product(options("model"), options("data")) if fits(*pair)],
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
    # The shipped recipes fit in every trainer's epochs (each recipe composed once for all
    # trainers: no recipe reads the trainer's settings).
    for recipe in options("recipe"):
        instantiate_recipe(recipe_node(recipe).copy(), cfg.trainer)


@functools.cache
def recipe_node(recipe: str) -> DictConfig:
    node = compose_config([f"recipe={recipe}"]).recipe
    reads = re.search(r"\$\{[^}]*\btrainer\.", OmegaConf.to_yaml(node))
    assert reads is None, f"recipe {recipe} reads trainer settings: {reads.group(0)}"
    return node


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


def _recipe_entries() -> list[tuple[str, str]]:
    pairs = []
    for recipe in options("recipe"):
        defaults = OmegaConf.load(config_dir() / "recipe" / f"{recipe}.yaml")
        entries = set((defaults.get("recipe") or {}).keys())
        for entry in defaults.get("defaults") or []:
            if isinstance(entry, DictConfig):
                for key in entry:
                    package = str(key).partition("@")[2]
                    if package.startswith("recipe."):
                        entries.add(package.removeprefix("recipe."))
        pairs += [(recipe, entry) for entry in sorted(entries)]
    return pairs


@pytest.mark.parametrize(("recipe", "entry"), _recipe_entries())
def test_every_technique_can_be_dropped_from_every_recipe(recipe: str, entry: str) -> None:
    """`~recipe.pruning` (README): the others' epochs must not depend on the dropped entry."""
    cfg = compose_config([f"recipe={recipe}", f"~recipe.{entry}"])
    callbacks = instantiate_recipe(cfg.recipe, cfg.trainer)
    assert entry not in callbacks


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
