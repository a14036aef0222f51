"""OneShotChannelPruning: a trained model loses channels at once, and its checkpoint rebuilds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_sparse.core.checkpoint import load_checkpoint
from lightning_sparse.core.structure import applied_changes, count_macs
from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.models import SmallCNN, resnet18
from lightning_sparse.module import ClassificationModule
from lightning_sparse.posttrain import OneShotChannelPruning, oneshot, prepare
from tests.stage_helpers import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _data() -> SyntheticDataModule:
    return SyntheticDataModule(
        num_classes=4, train_size=64, val_size=32, test_size=32, batch_size=16
    )


def _module(backbone: str = "cnn") -> ClassificationModule:
    pl.seed_everything(0)
    net = (
        SmallCNN(num_classes=4, width=8)
        if backbone == "cnn"
        else resnet18(num_classes=4, in_channels=1)
    )
    return ClassificationModule(net, num_classes=4, lr=0.01)


@pytest.mark.parametrize(("backbone", "sparsity"), [("cnn", 0.5), ("resnet18", 0.75)])
def test_oneshot_removes_a_share_of_the_macs_and_keeps_the_head(
    tmp_path: Path, backbone: str, sparsity: float
) -> None:
    module = _module(backbone)
    example = torch.zeros(1, 1, 8, 8)
    dense = count_macs(module, example)
    summary = oneshot(
        module, _data(), [OneShotChannelPruning(sparsity)], finetune_epochs=1, output_dir=tmp_path
    )
    report = summary["steps"]["oneshotchannelpruning"]
    assert report["macs_before"] == dense
    assert report["macs_after"] == count_macs(module, example)
    assert report["macs_after"] <= (1 - sparsity) * dense
    assert report["macs_after"] >= (1 - sparsity - 0.1) * dense
    assert report["params_after"] < report["params_before"]
    assert report["target_reached"]
    assert module.eval()(example).shape == (1, 4)  # the head keeps its 4 classes
    assert summary["after_finetune"] is not None
    # the run's checkpoint rebuilds the smaller model in a model built from the config
    rebuilt = _module(backbone)
    load_checkpoint(rebuilt, tmp_path / "checkpoints" / "last.ckpt")
    assert applied_changes(rebuilt) == applied_changes(module)
    for key, value in module.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_the_channels_target_removes_a_share_of_the_channels() -> None:
    module = _module()
    oneshot(module, _data(), [OneShotChannelPruning(0.5, target="channels")])
    # two groups (conv1 -> conv2, conv2 -> fc1; fc1 -> fc2 too): half of each group's channels
    assert module.model.conv1.out_channels == 4
    assert module.model.conv2.out_channels == 8
    assert module.model.fc1.out_features == 64
    assert module.model.fc2.out_features == 4


def test_global_allocation_takes_the_channels_with_the_smallest_scales_anywhere() -> None:
    module = _module("resnet18")
    with torch.no_grad():
        for name, layer in module.model.named_modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.fill_(0.05 if name.startswith("layer4") else 1.0)
    step = OneShotChannelPruning(
        0.5, importance="bn_scale", allocation="global", max_group_sparsity=0.8
    )
    summary = oneshot(module, _data(), [step])
    report = summary["steps"]["oneshotchannelpruning"]
    assert report["allocation"] == "global"
    assert report["target_reached"]
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    net = module.model
    # layer4 (512 wide) goes to its floor, a fifth; the stem, with scales 20x larger, keeps all
    assert net.layer4[0].conv1.out_channels == net.layer4[1].conv1.out_channels == 103
    assert net.conv1.out_channels == 64


def test_a_checkpoint_of_a_oneshot_model_without_the_mixin_still_records_it(
    tmp_path: Path,
) -> None:
    module = _module()
    oneshot(module, _data(), [OneShotChannelPruning(0.5)], output_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    recorded = checkpoint["callbacks"]["oneshot"]["structure"]["changes"]
    assert recorded == applied_changes(module)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"`sparsity`=1.0 is not allowed; it must be in \[0, 1\)"),
        ({"sparsity": 0.5, "target": "flops"}, r"`target`='flops' is not allowed"),
        ({"sparsity": 0.5, "importance": "taylor"}, r"`importance`='taylor' ranks channels by"),
        ({"sparsity": 0.5, "importance": "l3"}, r"`importance`='l3' is not allowed"),
        ({"sparsity": 0.5, "round_to": 0}, r"`round_to`=0 is not allowed"),
        ({"sparsity": 0.5, "calibration_batches": 0}, r"`calibration_batches`=0 is not allowed"),
        ({"sparsity": 0.5, "params": []}, r"`params`=\[\] must be a parameter name"),
        ({"sparsity": 0.5, "allocation": "layer"}, r"`allocation`='layer' is not allowed"),
        ({"sparsity": 0.5, "max_group_sparsity": -0.1}, r"`max_group_sparsity`=-0.1 is not"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OneShotChannelPruning(**kwargs)


def test_naming_the_output_layer_is_refused_before_any_work() -> None:
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    step = OneShotChannelPruning(0.5, params=["model.conv2.weight", "model.fc2.weight"])
    with pytest.raises(ValueError, match=r"oneshot\..*'model.fc2.weight' is the model's output"):
        prepare(module, _data(), [step])
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
