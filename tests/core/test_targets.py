from __future__ import annotations

import pytest
from torch import nn

from lightning_sparse.core.targets import (
    ALL_PRUNABLE,
    output_layer,
    output_weight_excluded,
    prunable_parameters,
    resolve_params,
)
from tests.helpers import TinyModule


def test_all_prunable_is_every_conv_and_linear_weight() -> None:
    module = TinyModule()
    assert list(resolve_params(module, ALL_PRUNABLE)) == [
        "model.conv1.weight",
        "model.fc1.weight",
        "model.fc2.weight",
    ]


def test_regex_matches_from_the_start_and_only_prunable_weights() -> None:
    module = TinyModule()
    assert list(resolve_params(module, ["re:model\\.fc"])) == [
        "model.fc1.weight",
        "model.fc2.weight",
    ]
    # `re:` is anchored at the start of the name, as in SparseML recipes
    with pytest.raises(ValueError, match="matches no prunable weight"):
        resolve_params(module, ["re:fc"])
    # biases are never candidates, even when a pattern would match them
    assert "model.fc1.bias" not in resolve_params(module, ["re:.*"])


def test_exact_names_keep_order_and_drop_duplicates() -> None:
    module = TinyModule()
    names = ["model.fc2.weight", "model.conv1.weight", "re:model\\.fc2"]
    assert list(resolve_params(module, names)) == ["model.fc2.weight", "model.conv1.weight"]


def test_no_match_lists_the_candidates() -> None:
    with pytest.raises(ValueError, match=r"`params` entry 'model.fc3.weight' matches no") as err:
        resolve_params(TinyModule(), ["model.fc3.weight"])
    assert "model.conv1.weight, model.fc1.weight, model.fc2.weight" in str(err.value)


def test_bad_regex_names_the_entry() -> None:
    with pytest.raises(ValueError, match=r"'re:\(' is not a valid regex"):
        resolve_params(TinyModule(), "re:(")


def test_model_without_prunable_layers() -> None:
    assert prunable_parameters(nn.Sequential(nn.ReLU())) == {}
    with pytest.raises(ValueError, match="the model has no layer of a known kind"):
        resolve_params(nn.Sequential(nn.ReLU()), ALL_PRUNABLE)


def test_the_output_layer_is_the_last_conv_or_linear_or_the_named_head() -> None:
    module = TinyModule()
    assert output_layer(module) == "model.fc2"
    assert output_layer(module, "model.fc1") == "model.fc1"
    with pytest.raises(ValueError, match=r"`head`='model.fc3' is not a Conv/Linear layer"):
        output_layer(module, "model.fc3")
    with pytest.raises(ValueError, match="no Conv/Linear layer"):
        output_layer(nn.Sequential(nn.ReLU()))


def test_excluded_weights_are_passed_over_and_naming_one_is_an_error() -> None:
    module = TinyModule()
    excluded = output_weight_excluded(module)
    assert list(excluded) == ["model.fc2.weight"]
    assert list(resolve_params(module, ALL_PRUNABLE, exclude=excluded)) == [
        "model.conv1.weight",
        "model.fc1.weight",
    ]
    assert list(resolve_params(module, ["re:model\\.fc"], exclude=excluded)) == ["model.fc1.weight"]
    with pytest.raises(ValueError, match=r"'model.fc2.weight' is the model's output layer") as err:
        resolve_params(module, ["model.fc1.weight", "model.fc2.weight"], exclude=excluded)
    assert "`params` entry" in str(err.value)
    with pytest.raises(ValueError, match=r"matches no prunable weight.*model.fc2.weight left out"):
        resolve_params(module, ["re:model\\.fc2"], exclude=excluded)
