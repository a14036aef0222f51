"""One-shot pruning from Python: the step, the plan's checks, before/after, fine-tune, outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.callbacks import ConstantPruning, MagnitudePruning
from lightning_sparse.data import DigitsDataModule, SyntheticDataModule
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule
from lightning_sparse.posttrain.oneshot import (
    OneShotPruning,
    OneShotStep,
    execute,
    oneshot,
    prepare,
)
from tests.stage_helpers import one_thread, quiet_trainer

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

LAYERS = ["model.conv1.weight", "model.conv2.weight", "model.fc1.weight", "model.fc2.weight"]


def _data(**kwargs: Any) -> SyntheticDataModule:
    options = {"num_classes": 4, "train_size": 64, "val_size": 32, "test_size": 32}
    return SyntheticDataModule(**{**options, **kwargs}, batch_size=16)


@pytest.fixture(scope="module")
def trained_state() -> dict[str, torch.Tensor]:
    """Weights of a small CNN trained for 2 epochs on the synthetic blobs (dense)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = ClassificationModule(SmallCNN(num_classes=4, width=8), num_classes=4, lr=0.01)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, datamodule=_data())
    torch.set_num_threads(threads)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture
def trained(trained_state: dict[str, torch.Tensor]) -> ClassificationModule:
    module = ClassificationModule(SmallCNN(num_classes=4, width=8), num_classes=4, lr=0.01)
    module.load_state_dict(trained_state)
    return module


def _zeros(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {name: params[name].detach() == 0 for name in LAYERS}


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_oneshot_prunes_to_the_target_and_evaluates_before_and_after(
    trained: ClassificationModule, criterion: str
) -> None:
    summary = oneshot(trained, _data(), [OneShotPruning(0.6, criterion=criterion)])
    assert summary["criterion"] == criterion
    assert summary["before"]["sparsity"] == 0.0
    assert summary["after_oneshot"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert summary["after_finetune"] is None
    for name in LAYERS:  # per layer, within one weight
        assert summary["sparsity_per_layer"][name] == pytest.approx(0.6, abs=1 / 72), name
    for stage in ("before", "after_oneshot"):
        assert 0.0 <= summary[stage]["test_acc"] <= 1.0
        assert 0.0 <= summary[stage]["val_acc"] <= 1.0
        assert "test/loss" in summary[stage]["metrics"]
    assert summary["before"]["test_acc"] > 0.5  # the blobs are easy; chance is 0.25
    assert summary["test_acc"] == summary["after_oneshot"]["test_acc"]
    report = summary["steps"]["pruning"]
    expected_batches = 4 if criterion == "wanda" else 0  # 64 samples / 16: the whole train split
    assert report["calibration_batches_used"] == expected_batches
    assert report["calibration_samples"] == 16 * expected_batches
    assert sum(report["pruned"].values()) == summary["params_total"] - summary["params_nonzero"]


def test_wanda_and_magnitude_choose_different_weights(trained_state: dict) -> None:
    masks = {}
    for criterion in ("magnitude", "wanda"):
        module = ClassificationModule(SmallCNN(num_classes=4, width=8), num_classes=4)
        module.load_state_dict(trained_state)
        oneshot(module, _data(), [OneShotPruning(0.5, criterion=criterion)])
        masks[criterion] = _zeros(module)
    assert any(not torch.equal(masks["magnitude"][n], masks["wanda"][n]) for n in LAYERS)


def test_global_and_two_of_four(trained: ClassificationModule) -> None:
    steps = {
        "convs": OneShotPruning(0.5, mask_type="2:4", params=["re:model\\.conv2"]),
        "rest": OneShotPruning(0.8, global_sparsity=True, params=["re:model\\.fc"]),
    }
    summary = oneshot(trained, _data(), steps)
    layers = summary["sparsity_per_layer"]
    assert set(layers) == {"model.conv2.weight", "model.fc1.weight", "model.fc2.weight"}
    conv2 = trained.model.conv2.weight.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool(((conv2 == 0).sum(dim=1) == 2).all())
    fc = [trained.model.fc1.weight, trained.model.fc2.weight]
    zeros = sum(int((w == 0).sum()) for w in fc)
    assert zeros / sum(w.numel() for w in fc) == pytest.approx(0.8, abs=1e-3)
    assert layers["model.fc1.weight"] != pytest.approx(layers["model.fc2.weight"], abs=1e-3)
    assert summary["criterion"] == ["magnitude", "magnitude"]


def test_finetune_holds_every_zero_and_writes_outputs(
    trained: ClassificationModule, tmp_path: Path
) -> None:
    summary = oneshot(
        trained,
        _data(),
        [OneShotPruning(0.7, criterion="wanda", calibration_batches=2)],
        finetune_epochs=2,
        output_dir=tmp_path,
    )
    after, tuned = summary["after_oneshot"], summary["after_finetune"]
    assert tuned["sparsity"] == after["sparsity"]
    assert summary["epochs"] == 2
    assert summary["test_acc"] == tuned["test_acc"]
    # The written checkpoint is the final model: plain keys, loads strictly, zeros where pruned.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    net = SmallCNN(num_classes=4, width=8)
    net.load_state_dict(
        {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}, strict=True
    )
    for name, zeros in _zeros(trained).items():
        assert torch.equal(net.get_parameter(name.removeprefix("model.")) == 0, zeros), name
    assert checkpoint["callbacks"]["oneshot"]["steps"]["pruning"]["criterion"] == "wanda"
    assert (tmp_path / "checkpoints" / "finetune" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["after_finetune"] == tuned


def test_the_fine_tune_keeps_exactly_the_one_shot_zeros(trained_state: dict) -> None:
    zeros, weights = {}, {}
    for epochs in (0, 2):
        module = ClassificationModule(SmallCNN(num_classes=4, width=8), num_classes=4, lr=0.01)
        module.load_state_dict(trained_state)
        step = OneShotPruning(0.7, criterion="wanda", calibration_batches=2)
        plan = prepare(module, _data(), [step], finetune_epochs=epochs)
        (hold,) = plan.finetune_callbacks  # the default: hold what the step prunes
        assert isinstance(hold, ConstantPruning)
        assert hold.params == LAYERS
        execute(plan)
        zeros[epochs] = _zeros(module)
        weights[epochs] = module.model.fc1.weight.detach().clone()
    for name in LAYERS:
        assert torch.equal(zeros[0][name], zeros[2][name]), name  # element for element
    assert not torch.equal(weights[0], weights[2])  # ... while the kept weights trained


def test_a_fine_tune_that_does_not_hold_the_zeros_is_refused(
    trained: ClassificationModule,
) -> None:
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    holds_only_fc = [ConstantPruning(params=["re:model\\.fc"])]
    with pytest.raises(ValueError, match=r"would let 'model.conv1.weight' regrow"):
        oneshot(
            trained,
            _data(),
            [OneShotPruning(0.5)],
            finetune_epochs=1,
            finetune_callbacks=holds_only_fc,
        )
    # Refused before any work: the model is untouched.
    for key, value in trained.state_dict().items():
        assert torch.equal(value, before[key]), key
    # A MagnitudePruning over the pruned weights holds them too; so does no fine-tune at all.
    prepare(trained, _data(), [OneShotPruning(0.5)], finetune_epochs=1,
            finetune_callbacks=[MagnitudePruning(0.5, end_epoch=0)])  # fmt: skip
    prepare(trained, _data(), [OneShotPruning(0.5)], finetune_epochs=0, finetune_callbacks=[])


class _EmptyData(pl.LightningDataModule):
    num_classes = 4

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()))


def test_an_empty_calibration_set_is_an_error_before_any_work(
    trained: ClassificationModule,
) -> None:
    message = "oneshot.pruning: the calibration set is empty"
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(trained, _EmptyData(), [OneShotPruning(0.5, criterion="wanda")])
    prepare(trained, _EmptyData(), [OneShotPruning(0.5, criterion="magnitude")])  # needs none


def test_model_and_data_must_agree_on_classes(trained: ClassificationModule) -> None:
    with pytest.raises(ValueError, match=r"predicts 4 classes .* but the data have 10"):
        prepare(trained, DigitsDataModule(), [OneShotPruning(0.5)])


def test_params_that_match_nothing_are_named(trained: ClassificationModule) -> None:
    with pytest.raises(ValueError, match=r"oneshot.pruning: `params` entry 're:model.conv9'"):
        prepare(trained, _data(), [OneShotPruning(0.5, params="re:model.conv9")])
    with pytest.raises(ValueError, match=r"oneshot.pruning: `mask_type`='2:4' groups 4"):
        prepare(trained, _data(), [OneShotPruning(0.5, mask_type="2:4")])  # conv1: 1 channel


def test_more_than_one_process_is_refused(trained: ClassificationModule) -> None:
    with pytest.raises(ValueError, match="One-shot compression runs in one process"):
        prepare(trained, _data(), [OneShotPruning(0.5)], trainer_kwargs={"devices": 2})


def test_steps_must_be_steps_and_there_must_be_some(trained: ClassificationModule) -> None:
    with pytest.raises(ValueError, match="No one-shot steps"):
        prepare(trained, _data(), [])
    with pytest.raises(ValueError, match=r"oneshot.prune: ConstantPruning is not a OneShotStep"):
        prepare(trained, _data(), {"prune": ConstantPruning()})  # type: ignore[dict-item]


class _Scale(OneShotStep):
    """A stand-in for a post-fine-tune step (where PTQ goes): halves every weight."""

    after_finetune = True

    def apply(self, module: torch.nn.Module, calibration: Any) -> dict[str, Any]:
        with torch.no_grad():
            for param in module.parameters():
                param.mul_(0.5)
        return {"scaled": True}


def test_after_finetune_steps_run_last(trained: ClassificationModule) -> None:
    fc2 = trained.model.fc2.weight.detach().clone()
    summary = oneshot(trained, _data(), {"prune": OneShotPruning(0.5), "late": _Scale()})
    assert summary["steps"]["late"] == {"scaled": True}
    pruned = torch.where(trained.model.fc2.weight == 0, 0.0, fc2)
    torch.testing.assert_close(trained.model.fc2.weight.detach(), 0.5 * pruned)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "`sparsity`=1.0 is not allowed"),
        ({"sparsity": True}, "`sparsity`=True is not allowed"),
        ({"sparsity": 0.5, "criterion": "taylor"}, "`criterion`='taylor' is not allowed"),
        ({"sparsity": 0.6, "mask_type": "2:4"}, "at most 0.5"),
        ({"sparsity": 0.5, "mask_type": "3x3"}, "`mask_type`='3x3' is not a mask type"),
        ({"sparsity": 0.5, "criterion": "wanda", "calibration_batches": 0}, "at least 1"),
        ({"sparsity": 0.5, "calibration_batches": 1.5}, "`calibration_batches`=1.5"),
        ({"sparsity": 0.5, "params": []}, "`params`=[]"),
    ],
)
def test_bad_step_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        OneShotPruning(**kwargs)


def test_channel_masks_leave_the_output_layer_whole(trained: ClassificationModule) -> None:
    step = OneShotPruning(0.5, mask_type="channel")
    summary = oneshot(trained, _data(), [step])
    assert step.target_names == LAYERS[:3]
    assert bool((trained.model.fc2.weight.abs().sum(dim=1) > 0).all())
    assert "model.fc2.weight" not in summary["steps"]["pruning"]["pruned"]
    with pytest.raises(ValueError, match=r"'model.fc2.weight' is the model's output layer"):
        prepare(trained, _data(), [OneShotPruning(0.5, mask_type="channel", params=LAYERS)])
