from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.core.targets import prunable_parameters
from lightning_sparse.models import LeNet5
from lightning_sparse.module import ClassificationModule
from tests.helpers import quiet_trainer


def test_caffe_layout_and_parameter_count_at_28x28() -> None:
    model = LeNet5(in_channels=1, num_classes=10, input_size=28)
    assert model.padding == 0
    assert list(prunable_parameters(model)) == [
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
    ]
    assert model.conv1.weight.shape == (20, 1, 5, 5)
    assert model.conv2.weight.shape == (50, 20, 5, 5)
    assert model.fc1.weight.shape == (500, 50 * 4 * 4)
    assert model.fc2.weight.shape == (10, 500)
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize(
    ("channels", "size", "classes", "padding", "fc1_inputs"),
    [
        (1, 8, 10, 2, 50 * 2 * 2),  # the digits: the least padding that fits
        (1, 15, 10, 1, 50 * 2 * 2),
        (1, 16, 4, 0, 50 * 1 * 1),  # the smallest input without padding
        (3, 32, 7, 0, 50 * 5 * 5),
    ],
)
def test_other_shapes_pad_only_when_they_must(
    channels: int, size: int, classes: int, padding: int, fc1_inputs: int
) -> None:
    model = LeNet5(in_channels=channels, num_classes=classes, input_size=size)
    assert model.padding == padding
    assert model.fc1.in_features == fc1_inputs
    assert model(torch.zeros(2, channels, size, size)).shape == (2, classes)


def test_explicit_padding_is_kept() -> None:
    model = LeNet5(input_size=28, padding=2)
    assert model.fc1.in_features == 50 * 7 * 7
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_too_small_for_the_padding_names_the_model_and_the_minimum() -> None:
    with pytest.raises(ValueError, match="model=lenet5") as info:
        LeNet5(input_size=8, padding=0)
    message = str(info.value)
    assert "at least 16 pixels" in message
    assert "model.model.padding=2" in message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0}, "`in_channels`=0"),
        ({"num_classes": 0}, "`num_classes`=0"),
        ({"input_size": 0}, "`input_size`=0"),
        ({"padding": -1}, "`padding`=-1"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeNet5(**kwargs)


def test_trains_through_a_lightning_trainer() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    module = ClassificationModule(LeNet5(), num_classes=10)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    loader = DataLoader(data, batch_size=8)
    trainer = quiet_trainer(max_steps=2, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 2
    for name, parameter in module.named_parameters():
        assert not torch.equal(before[name], parameter), name
