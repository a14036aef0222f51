from __future__ import annotations

import pytest
import torch

from lightning_sparse.core.targets import prunable_parameters
from lightning_sparse.models import MLP, SmallCNN


def test_small_cnn_layout_and_output() -> None:
    model = SmallCNN(in_channels=1, num_classes=10, width=32, input_size=8)
    assert list(prunable_parameters(model)) == [
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
    ]
    assert model.conv1.weight.shape == (32, 1, 3, 3)
    assert model.conv2.weight.shape == (64, 32, 3, 3)
    assert model.fc1.weight.shape == (128, 64 * 4 * 4)
    assert model.fc2.weight.shape == (10, 128)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize(("channels", "size", "width"), [(3, 16, 8), (1, 4, 4)])
def test_small_cnn_other_shapes(channels: int, size: int, width: int) -> None:
    model = SmallCNN(in_channels=channels, num_classes=7, width=width, input_size=size)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)


def test_small_cnn_depth_hidden_and_batch_norm() -> None:
    model = SmallCNN(width=4, depth=3, hidden=16, batch_norm=True)
    assert list(prunable_parameters(model)) == [
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "fc1.weight",
        "fc2.weight",
    ]
    assert model.conv3.weight.shape == (8, 8, 3, 3)
    assert model.conv1.bias is None  # the BatchNorm's shift replaces it
    assert [name for name, _ in model.named_children()] == [
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "pool", "fc1", "fc2"
    ]  # fmt: skip
    assert model.bn3.num_features == 8
    assert model.fc2.weight.shape == (10, 16)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_small_cnn_defaults_keep_the_original_state_dict_keys() -> None:
    assert list(SmallCNN().state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    ]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), [("depth", 1), ("hidden", 0)])
def test_small_cnn_rejects_bad_depth_and_hidden(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"`{field}`={value}"):
        SmallCNN(**{field: value})


def test_small_cnn_rejects_odd_input_size() -> None:
    with pytest.raises(ValueError, match="`input_size`=7"):
        SmallCNN(input_size=7)


def test_mlp_layout_and_output() -> None:
    model = MLP(input_dim=64, hidden=(256, 256), num_classes=10)
    assert list(prunable_parameters(model)) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert model.fc1.weight.shape == (256, 64)
    assert model.fc3.weight.shape == (10, 256)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_mlp_takes_an_input_shape() -> None:
    model = MLP(input_dim=[2, 4, 4], hidden=[16], num_classes=3)
    assert model.fc1.in_features == 32
    assert list(prunable_parameters(model)) == ["fc1.weight", "fc2.weight"]
    assert model(torch.zeros(2, 2, 4, 4)).shape == (2, 3)


def test_mlp_rejects_empty_layer() -> None:
    with pytest.raises(ValueError, match="`hidden`"):
        MLP(hidden=(0,))


def test_models_are_plain_modules() -> None:
    import lightning.pytorch as pl

    assert not isinstance(SmallCNN(), pl.LightningModule)
    assert not isinstance(MLP(), pl.LightningModule)
