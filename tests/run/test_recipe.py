from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from lightning_sparse import ConstantPruning, MagnitudePruning
from lightning_sparse.models import MLP, SmallCNN
from lightning_sparse.module import ClassificationModule
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

GMP = "lightning_sparse.callbacks.MagnitudePruning"
CONSTANT = "lightning_sparse.callbacks.ConstantPruning"


def gmp(**kwargs: Any) -> dict[str, Any]:
    return {"_target_": GMP, "final_sparsity": 0.9, "start_epoch": 0, "end_epoch": 2, **kwargs}


def cnn() -> ClassificationModule:
    return ClassificationModule(SmallCNN())


def test_config_dir_is_the_repository_conf() -> None:
    assert (config_dir() / "train.yaml").is_file()


def test_valid_recipe_builds_callbacks_in_order() -> None:
    recipe = {"pruning": gmp(), "hold": {"_target_": CONSTANT, "params": ["model.fc2.weight"]}}
    callbacks = instantiate_recipe(recipe, {"max_epochs": 3})
    assert list(callbacks) == ["pruning", "hold"]
    assert isinstance(callbacks["pruning"], MagnitudePruning)
    assert callbacks["pruning"].final_sparsity == 0.9
    assert isinstance(callbacks["hold"], ConstantPruning)


def test_empty_recipe() -> None:
    assert instantiate_recipe({}) == {}
    assert instantiate_recipe(None) == {}


def test_interpolations_are_resolved() -> None:
    cfg = OmegaConf.create({"end": 4, "recipe": {"pruning": gmp(end_epoch="${end}")}})
    assert recipe_to_dict(cfg.recipe)["pruning"]["end_epoch"] == 4


# One test per error message.


def test_node_without_target() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.pruning: a recipe entry must be a node"):
        check_recipe({"pruning": {"final_sparsity": 0.9}})


def test_target_that_does_not_import() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.pruning: `_target_`='nope\.Pruner' cannot"):
        check_recipe({"pruning": {"_target_": "nope.Pruner"}})


def test_unknown_argument_names_entry_key_and_accepted_keys() -> None:
    with pytest.raises(RecipeError) as info:
        check_recipe({"pruning": gmp(final_sparsty=0.9)})
    message = str(info.value)
    assert message.startswith("recipe.pruning: unknown argument 'final_sparsty'")
    assert "did you mean 'final_sparsity'" in message
    assert "accepted: final_sparsity, init_sparsity, start_epoch, end_epoch" in message


def test_missing_required_argument() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.pruning: missing a required argument"):
        check_recipe({"pruning": {"_target_": GMP}})


@pytest.mark.parametrize("key", ["end_epoch", "start_epoch"])
def test_epoch_past_max_epochs(key: str) -> None:
    node = gmp(start_epoch=0, end_epoch=2)
    node[key] = 7
    if key == "start_epoch":
        node["end_epoch"] = 7
    with pytest.raises(RecipeError) as info:
        check_recipe({"pruning": node}, {"max_epochs": 5})
    assert f"recipe.pruning.{key}=7 is past trainer.max_epochs=5" in str(info.value)


def test_default_end_epoch_counts_against_max_epochs() -> None:
    # MagnitudePruning's default end_epoch is 10: a recipe that leaves it out must fit too.
    with pytest.raises(RecipeError, match=r"recipe\.pruning\.end_epoch=10 is past"):
        check_recipe({"pruning": {"_target_": GMP, "final_sparsity": 0.5}}, {"max_epochs": 4})


@pytest.mark.parametrize(
    "trainer", [None, {"max_epochs": None}, {"max_epochs": -1}, {"fast_dev_run": True}]
)
def test_epoch_check_skipped_when_not_bounded_by_epochs(trainer: dict | None) -> None:
    check_recipe({"pruning": gmp(end_epoch=50)}, trainer)


def test_constructor_error_is_prefixed_with_the_entry() -> None:
    with pytest.raises(RecipeError) as info:
        instantiate_recipe({"pruning": gmp(final_sparsity=1.5)})
    assert str(info.value) == (
        "recipe.pruning: `final_sparsity`=1.5 is not allowed; it must be in [0, 1)."
    )
    assert isinstance(info.value, ValueError)


def test_target_that_is_not_a_callback() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.model: .* built a SmallCNN, not a lightning"):
        instantiate_recipe({"model": {"_target_": "lightning_sparse.models.SmallCNN"}})


def test_params_matching_nothing_lists_candidates() -> None:
    callbacks = instantiate_recipe({"pruning": gmp(params=["re:model\\.conv9\\.weight"])})
    with pytest.raises(RecipeError, match=r"`recipe\.pruning\.params` entry .* Candidates: model"):
        check_against_model(callbacks, cnn())


def test_nm_mask_that_does_not_tile_a_weight() -> None:
    callbacks = instantiate_recipe({"pruning": gmp(final_sparsity=0.5, mask_type="2:4")})
    with pytest.raises(
        RecipeError, match=r"`recipe\.pruning\.mask_type`.*`model\.conv1\.weight` has input"
    ):
        check_against_model(callbacks, cnn())


def test_two_entries_pruning_one_weight_at_once() -> None:
    recipe = {"a": gmp(), "b": {"_target_": CONSTANT, "params": ["model.fc1.weight"]}}
    with pytest.raises(
        RecipeError, match=r"recipe\.b and recipe\.a both prune 'model\.fc1\.weight'"
    ):
        check_against_model(instantiate_recipe(recipe), cnn())


def test_disjoint_entries_are_fine() -> None:
    recipe = {
        "convs": gmp(params=["re:model\\.conv"], name="convs"),
        "fcs": gmp(params=["re:model\\.fc"], name="fcs"),
    }
    check_against_model(instantiate_recipe(recipe), cnn())


def test_sequential_entries_on_one_weight_are_fine() -> None:
    recipe = {
        "early": gmp(params=["model.conv1.weight"], end_epoch=1, leave_enabled=False, name="e"),
        "late": gmp(params=["model.conv1.weight"], start_epoch=1, end_epoch=2, name="l"),
    }
    check_against_model(instantiate_recipe(recipe), cnn())


def test_gmp_2of4_params_fit_both_models() -> None:
    for backbone in (SmallCNN(), MLP()):
        callbacks = {str(i): callback for i, callback in enumerate(load("gmp_2of4"))}
        check_against_model(callbacks, ClassificationModule(backbone))


def test_check_target_returns_defaults() -> None:
    arguments = check_target(gmp(), "recipe.pruning")
    assert arguments["inter_func"] == "cubic"
    assert arguments["end_epoch"] == 2


def test_load_shipped_recipe_with_overrides() -> None:
    (pruning,) = load("gmp", ["recipe.pruning.final_sparsity=0.95"])
    assert isinstance(pruning, MagnitudePruning)
    assert pruning.final_sparsity == 0.95
    assert load("dense") == []


def test_load_validates_against_the_trainer() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.pruning\.end_epoch=15 is past"):
        load("gmp", ["trainer.max_epochs=3"])


def test_load_unknown_recipe_lists_options() -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)recipe/nope.*gmp_global"):
        load("nope")


def test_compose_inside_another_hydra_app_restores_it() -> None:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        outer = GlobalHydra.instance().hydra
        assert load("gmp")
        assert GlobalHydra.instance().hydra is outer
        assert compose("train").seed == 0
    assert not GlobalHydra.instance().is_initialized()


def test_compose_config_overrides() -> None:
    cfg = compose_config(["seed=3", "recipe=dense"])
    assert cfg.seed == 3
    assert OmegaConf.to_container(cfg.recipe) == {}


def test_recipe_record_round_trip() -> None:
    record = RecipeRecord("gmp", {"pruning": gmp()})
    state = record.state_dict()
    assert record.state_key == "recipe"
    assert state == {"name": "gmp", "recipe": {"pruning": gmp()}}
    restored = RecipeRecord(None, {})
    restored.load_state_dict(state)
    assert restored.restored == state
    # Plain data: survives torch.save / torch.load(weights_only=True).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state


def test_masks_of_leave_enabled_are_in_force_to_the_end() -> None:
    assert MagnitudePruning(0.5, end_epoch=2).in_force_until == math.inf
    assert MagnitudePruning(0.5, end_epoch=2, leave_enabled=False).in_force_until == 2.0


QAT = "lightning_sparse.callbacks.QuantizationAwareTraining"


def test_quantization_freezing_observers_during_pruning_names_both_entries() -> None:
    recipe = {
        "pruning": gmp(end_epoch=3),
        "quantization": {
            "_target_": QAT,
            "start_epoch": 1,
            "disable_quantization_observer_epoch": 2,
        },
    }
    with pytest.raises(
        RecipeError,
        match=r"recipe\.quantization\.disable_quantization_observer_epoch=2 comes before "
        r"recipe\.pruning\.end_epoch=3",
    ):
        check_against_model(instantiate_recipe(recipe), cnn())


def test_quantization_ignore_matching_nothing_names_the_entry() -> None:
    recipe = {"quantization": {"_target_": QAT, "start_epoch": 0, "ignore": ["model.fc9"]}}
    with pytest.raises(
        RecipeError, match=r"`recipe\.quantization\.ignore` entry 'model\.fc9' matches no"
    ):
        check_against_model(instantiate_recipe(recipe), cnn())
