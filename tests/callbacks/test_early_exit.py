"""EarlyExit: heads outside the model, the joint loss, calibrated thresholds, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sparse.callbacks import EarlyExit
from lightning_sparse.core.early_exit import cascade
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule
from tests.callbacks.test_regularization import MemoryLogger
from tests.helpers import (
    TinyData,
    TinyModule,
    TinyNet,
    fit_resumable,
    quiet_trainer,
    run_ddp_script,
)


def digits_module() -> ClassificationModule:
    return ClassificationModule(SmallCNN(width=8), num_classes=10, lr=0.01)


@pytest.fixture(scope="module")
def trained() -> tuple[ClassificationModule, EarlyExit, DigitsDataModule, pl.Trainer, MemoryLogger]:
    torch.manual_seed(0)
    module = digits_module()
    early_exit = EarlyExit(exits=["model.conv1"], pool_size=4, max_accuracy_drop=0.01)
    data = DigitsDataModule(batch_size=64)
    logger = MemoryLogger()
    trainer = quiet_trainer(max_epochs=3, callbacks=[early_exit], logger=logger)
    trainer.fit(module, data)
    return module, early_exit, data, trainer, logger


def test_heads_are_in_neither_the_models_state_dict_nor_its_optimizer(trained: Any) -> None:
    module, early_exit, _, trainer, _ = trained
    assert len(early_exit.heads) == 1
    assert set(module.state_dict()) == set(digits_module().state_dict())
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in early_exit.heads[0].parameters())
    # The hooks are gone after fit: the model is plain again.
    assert not module.model.conv1._forward_hooks


def head_outputs(
    module: ClassificationModule, head: nn.Module, loader: Any
) -> tuple[torch.Tensor, ...]:
    """Confidence and correctness of the head, and the full model's correctness, by hand."""
    module.eval()
    confidence, exit_correct, full_correct = [], [], []
    with torch.no_grad():
        for inputs, labels in loader:
            probs = torch.softmax(head(module.model.conv1(inputs)), dim=-1)
            confidence.append(probs.max(dim=-1).values)
            exit_correct.append(probs.argmax(dim=-1) == labels)
            full_correct.append(module(inputs).argmax(dim=-1) == labels)
    return torch.cat(confidence)[None], torch.cat(exit_correct)[None], torch.cat(full_correct)


def test_thresholds_meet_the_accuracy_drop_on_validation(trained: Any) -> None:
    module, early_exit, data, _, logger = trained
    thresholds = early_exit.thresholds
    assert thresholds is not None
    assert 0 < thresholds[0] < 1
    confidence, exit_correct, full_correct = head_outputs(
        module, early_exit.heads[0], data.val_dataloader()
    )
    accuracy, fractions = cascade(confidence, exit_correct, full_correct, thresholds)
    full = full_correct.float().mean().item()
    assert accuracy >= full - 0.01
    # What the budget counts: exited inputs the full model gets right and the head wrong.
    lost = (confidence[0] >= thresholds[0]) & full_correct & ~exit_correct[0]
    assert int(lost.sum()) <= 0.01 * len(full_correct)
    assert fractions[0] > 0.3  # the first exit does take inputs
    calibration = early_exit.last_calibration
    assert calibration["accuracy"] == pytest.approx(accuracy)
    assert calibration["exit_fractions"] == pytest.approx(fractions)
    # Logged once per validation epoch (not for the sanity check).
    key = "compression/EarlyExit"
    assert len(logger.per_epoch(f"{key}/threshold/model.conv1")) == 3
    assert logger.per_epoch(f"{key}/threshold/model.conv1")[-1] == pytest.approx(thresholds[0])
    assert logger.per_epoch(f"{key}/val_acc_full")[-1] == pytest.approx(full)
    # Calibrating again on the same split from Python finds the same thresholds.
    assert early_exit.calibrate(module, data.val_dataloader()) == pytest.approx(thresholds)


class Recording(EarlyExit):
    """Keeps the term of every step and the same term computed by hand from the layer outputs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.terms: list[tuple[float, float]] = []

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        features = dict(self._tap.outputs)
        term = super().loss_term(trainer, pl_module, batch, outputs)
        labels = batch[1]
        by_hand = 0.0
        for weight, name, head in zip(self.weights, self.exits, self.heads, strict=True):
            feature = torch.relu(features[name].detach().double())
            pooled = feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature
            logits = pooled @ head.linear.weight.detach().double().T + head.linear.bias.detach()
            losses = [
                -row[int(y)] + math.log(sum(math.exp(v) for v in row.tolist()))
                for row, y in zip(logits, labels, strict=True)
            ]
            by_hand += weight * float(sum(losses)) / len(losses)
        self.terms.append((float(term.detach()), by_hand))
        return term


def tiny_module() -> ClassificationModule:
    return ClassificationModule(TinyNet(), num_classes=4)


def test_joint_loss_equals_the_hand_computation() -> None:
    torch.manual_seed(0)
    callback = Recording(exits=["model.conv1", "model.fc1"], weights=[0.5, 2.0])
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(tiny_module(), TinyData())
    assert len(callback.terms) == 10
    for term, by_hand in callback.terms:
        assert term == pytest.approx(by_hand, rel=1e-5)


def test_resumed_run_ends_bit_identical(tmp_path: Path) -> None:
    settings: dict[str, Any] = {"exits": ["model.conv1", "model.fc1"], "head_lr": 0.01}

    def final(run: str, crash_at: int | None, ckpt: str | None) -> tuple[Any, ...]:
        torch.manual_seed(0 if ckpt is None else 1)  # resumed: weights from the checkpoint
        module, callback = tiny_module(), EarlyExit(**settings)
        fit_resumable(module, [callback], tmp_path / run, crash_at, ckpt)
        return module.state_dict(), callback.state_dict()

    whole_model, whole = final("a", None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        final("b", 13, None)
    resumed_model, resumed = final("c", None, str(tmp_path / "b" / "step=10.ckpt"))
    for key, value in whole_model.items():
        assert torch.equal(value, resumed_model[key]), key
    for stored, again in zip(whole["heads"], resumed["heads"], strict=True):
        for key, value in stored["state"].items():
            assert torch.equal(value, again["state"][key]), key
    moments = whole["optimizer"]["state"], resumed["optimizer"]["state"]
    for index, state in moments[0].items():
        assert torch.equal(state["exp_avg"], moments[1][index]["exp_avg"])
    state = torch.load(tmp_path / "b" / "step=10.ckpt", weights_only=True)["callbacks"]
    assert state["EarlyExit"]["heads"][0]["feature_shape"] == [8, 4, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exits": []}, "`exits`=\\[\\] is not allowed"),
        ({"exits": ["a", "a"]}, "names a layer twice"),
        ({"weights": [1.0]}, "`weights`=\\[1.0\\] is not allowed"),
        ({"weights": 0}, "`weights`=0 is not allowed"),
        ({"head_lr": 0}, "`head_lr`=0 is not allowed"),
        ({"pool_size": 0}, "`pool_size`=0 is not allowed"),
        ({"activation": "gelu"}, "`activation`='gelu' is not allowed"),
        ({"max_accuracy_drop": 5}, "`max_accuracy_drop`=5 is not allowed"),
        ({"detach": "yes"}, "`detach`='yes' is not allowed"),
    ],
)
def test_errors_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyExit(**{"exits": ["model.conv1", "model.fc1"], **kwargs})


def test_model_checks_name_the_layer_and_the_model() -> None:
    with pytest.raises(ValueError, match=r"`exits`: the model has no layer 'model\.conv9'"):
        EarlyExit(exits=["model.conv9"]).check_model(tiny_module())
    with pytest.raises(ValueError, match=r"'model\.conv1' runs before the exit listed ahead"):
        EarlyExit(exits=["model.fc1", "model.conv1"]).check_model(tiny_module())
    with pytest.raises(TypeError, match=r"does not mix in .*CompressionModule"):
        quiet_trainer(max_epochs=1, callbacks=[EarlyExit(exits=["model.conv1"])]).fit(
            TinyModule(), TinyData()
        )


@pytest.mark.slow
def test_heads_and_thresholds_agree_across_ddp_ranks(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.callbacks.ddp_early_exit_script", tmp_path)
    for head0, head1 in zip(rank0["heads"], rank1["heads"], strict=True):
        for key, value in head0.items():
            assert torch.equal(value, head1[key]), key
    # Both ranks calibrated on every validation sample (80, half on each), so they agree.
    assert rank0["inputs"] == rank1["inputs"] == 80
    assert rank0["thresholds"] == rank1["thresholds"]
