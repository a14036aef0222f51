"""torchvision adapters, and any nn.Module named by ``_target_`` through the model config."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torch import nn

from lightning_sparse.core.targets import prunable_parameters
from lightning_sparse.models import mobilenet_v3_small, resnet18
from lightning_sparse.module import ClassificationModule
from lightning_sparse.run.recipe import compose_config
from tests.stage_helpers import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

Factory = Callable[..., nn.Module]


@pytest.mark.parametrize(
    ("factory", "stem", "head"),
    [(resnet18, "conv1", "fc"), (mobilenet_v3_small, "features.0.0", "classifier.3")],
)
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_adapters_take_channels_and_classes(
    factory: Factory, stem: str, head: str, channels: int, size: int
) -> None:
    model = factory(num_classes=7, in_channels=channels)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)
    assert model.get_submodule(stem).in_channels == channels
    assert model.get_submodule(stem).stride == (1, 1)  # small_inputs: a stride-1 stem
    assert model.get_submodule(head).out_features == 7
    names = list(prunable_parameters(model))
    assert names[0] == f"{stem}.weight"
    assert names[-1] == f"{head}.weight"


def test_resnet_small_inputs_replaces_the_imagenet_stem() -> None:
    small, imagenet = resnet18(small_inputs=True), resnet18(small_inputs=False)
    assert small.conv1.kernel_size == (3, 3)
    assert isinstance(small.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    # With the ImageNet stem and 3 channels, it is torchvision's model: its state dicts load.
    imagenet.load_state_dict(torchvision.models.resnet18(num_classes=10).state_dict())


def test_mobilenet_keeps_torchvision_names_for_the_rest() -> None:
    ours = set(mobilenet_v3_small(small_inputs=False).state_dict())
    assert ours == set(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict())


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (resnet18, {"num_classes": 0}, "`num_classes`=0"),
        (mobilenet_v3_small, {"in_channels": 0}, "`in_channels`=0"),
        (mobilenet_v3_small, {"dropout": 1.0}, "`dropout`=1.0"),
    ],
)
def test_bad_arguments(factory: Factory, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small"])
def test_model_configs_build_for_the_data(model: str) -> None:
    cfg = compose_config([f"model={model}", "data=mnist"])
    module = instantiate(cfg.model)
    assert isinstance(module, ClassificationModule)
    assert module(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert (
        "model.fc.weight" in dict(module.named_parameters()) or module.head_name == "classifier.3"
    )


def test_any_module_by_target_through_the_model_config() -> None:
    # A torchvision model the project has no adapter for, named on the command line. `~` then `+`
    # replaces the backbone node (a plain `model.model={...}` would merge into SmallCNN's keys).
    cfg = compose_config(
        [
            "~model.model",
            "+model.model={_target_: torchvision.models.squeezenet1_1, num_classes: 10}",
            "data=cifar10",
        ]
    )
    module = instantiate(cfg.model)
    assert type(module.model).__name__ == "SqueezeNet"
    assert module.head_name is None  # its classifier is a conv: no Linear head to check
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # Any module with a Linear head: torch.nn built from config alone.
    cfg = compose_config(
        [
            "model=mlp",
            "~model.model",
            "+model.model={_target_: torch.nn.Sequential, _args_: ["
            "{_target_: torch.nn.Flatten}, {_target_: torch.nn.Linear, in_features: 64, "
            "out_features: 10}]}",
        ]
    )
    module = instantiate(cfg.model)
    assert module.head_name == "1"
    assert module(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert list(prunable_parameters(module)) == ["model.1.weight"]
