"""Exit heads, the joint loss, threshold calibration and cutting a model into stages."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_sparse.core.early_exit import (
    ExitHead,
    SegmentError,
    calibrate_thresholds,
    cascade,
    joint_exit_loss,
    trace_with_cuts,
)
from lightning_sparse.models import MLP, LeNet5, SmallCNN
from lightning_sparse.module import ClassificationModule


def test_head_pools_then_classifies_and_is_seeded() -> None:
    head = ExitHead([3, 4, 4], num_classes=5, pool_size=2, seed=7)
    features = torch.randn(2, 3, 4, 4)
    pooled = torch.relu(features).reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(1)
    expected = pooled @ head.linear.weight.T + head.linear.bias
    assert torch.allclose(head(features), expected, atol=1e-6)
    assert torch.equal(ExitHead([3, 4, 4], 5, 2, seed=7).linear.weight, head.linear.weight)
    assert ExitHead([16], 5, activation="none")(torch.randn(2, 16)).shape == (2, 5)


def test_joint_loss_is_the_weighted_sum_of_cross_entropies() -> None:
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]])]
    labels = torch.tensor([0, 1])

    def ce(rows: list[list[float]]) -> float:
        return sum(
            -row[y] + math.log(sum(math.exp(v) for v in row))
            for row, y in zip(rows, [0, 1], strict=True)
        ) / len(rows)

    expected = 0.3 * ce([[2.0, 0.0], [0.0, 1.0]]) + 1.0 * ce([[0.0, 0.0], [3.0, 0.0]])
    assert joint_exit_loss(logits, labels, [0.3, 1.0]).item() == pytest.approx(expected)


def synthetic(seed: int = 0, count: int = 400) -> tuple[torch.Tensor, ...]:
    """Two exits whose confidence predicts correctness; the full model is right 95% of the time."""
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(2, count, generator=generator)
    exit_correct = torch.rand(2, count, generator=generator) < confidence
    final_correct = torch.rand(count, generator=generator) < 0.95
    return confidence, exit_correct, final_correct


@pytest.mark.parametrize("drop", [0.0, 0.005, 0.02, 0.1])
def test_thresholds_meet_the_accuracy_drop_and_take_the_most_inputs_at_the_first_exit(
    drop: float,
) -> None:
    confidence, exit_correct, final_correct = synthetic()
    thresholds = calibrate_thresholds(confidence, exit_correct, final_correct, drop)
    accuracy, fractions = cascade(confidence, exit_correct, final_correct, thresholds)
    full = final_correct.float().mean().item()
    assert accuracy >= full - drop - 1e-12
    assert sum(fractions) == pytest.approx(1.0)
    # Greedy, and what counts are inputs the full model gets right and the exit wrong: a lower
    # first threshold (the next confidence below it) would lose more than the budget there.
    first = thresholds[0]
    if first < 1.0:
        lower = confidence[0][confidence[0] < first].max().item()
        lost = (confidence[0] >= lower) & final_correct & ~exit_correct[0]
        assert int(lost.sum()) > math.floor(drop * len(final_correct) + 1e-9)


def test_looser_targets_let_more_inputs_leave_early() -> None:
    confidence, exit_correct, final_correct = synthetic()
    leaving = []
    for drop in (0.0, 0.02, 0.1, 0.5):
        thresholds = calibrate_thresholds(confidence, exit_correct, final_correct, drop)
        leaving.append(1 - cascade(confidence, exit_correct, final_correct, thresholds)[1][-1])
    assert leaving == sorted(leaving)
    assert leaving[-1] > leaving[0]


def test_an_exit_that_cannot_fit_the_budget_is_off() -> None:
    confidence = torch.tensor([[0.9, 0.8, 0.7]])
    exit_correct = torch.tensor([[False, False, False]])
    final_correct = torch.tensor([True, True, True])
    assert calibrate_thresholds(confidence, exit_correct, final_correct, 0.0) == [1.0]
    accuracy, fractions = cascade(confidence, exit_correct, final_correct, [1.0])
    assert (accuracy, fractions) == (1.0, [0.0, 1.0])


def test_a_threshold_never_splits_equal_confidences() -> None:
    # Two inputs at 0.9, one of them wrong: a budget of one error lets both leave (not the third,
    # also wrong); a budget of none cannot take just the right one of the two.
    confidence = torch.tensor([[0.9, 0.9, 0.5]])
    exit_correct = torch.tensor([[True, False, False]])
    final_correct = torch.tensor([True, True, True])
    thresholds = calibrate_thresholds(confidence, exit_correct, final_correct, 0.34)
    assert thresholds == [pytest.approx(0.9)]
    assert calibrate_thresholds(confidence, exit_correct, final_correct, 0.3) == [1.0]


@pytest.mark.parametrize(
    ("model", "exits", "shape"),
    [
        (
            ClassificationModule(SmallCNN(), num_classes=10),
            ["model.conv1", "model.conv2"],
            [1, 8, 8],
        ),
        (ClassificationModule(MLP(), num_classes=10), ["model.fc1", "model.fc2"], [1, 8, 8]),
        (ClassificationModule(LeNet5(), num_classes=10), ["model.pool1", "model.fc1"], [1, 28, 28]),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), ["2"], [4]),
    ],
    ids=["cnn", "mlp", "lenet5", "sequential"],
)
def test_traced_model_returns_its_logits_and_each_exit_layers_output(
    model: nn.Module, exits: list[str], shape: list[int]
) -> None:
    model.eval()
    captured = {}
    layers = dict(model.named_modules())
    for name in exits:
        layers[name].register_forward_hook(
            lambda m, a, out, name=name: captured.__setitem__(name, out)
        )
    inputs = torch.randn(2, *shape)
    logits, *features = trace_with_cuts(model, exits)(inputs)
    assert torch.equal(logits, model(inputs))
    for name, feature in zip(exits, features, strict=True):
        assert torch.equal(feature, captured[name])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.block = Block()
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            return self.fc(x)
        return x


def test_a_whole_residual_block_is_a_clean_cut() -> None:
    model = Residual().eval()
    inputs = torch.randn(1, 1, 4, 4)
    logits, stem, block = trace_with_cuts(model, ["stem", "block"])(inputs)
    assert torch.equal(logits, model(inputs))
    assert torch.equal(block, model.block(stem))


def test_a_cut_inside_a_skip_connection_is_refused_naming_the_model() -> None:
    with pytest.raises(SegmentError, match=r"Residual cannot be cut after 'block\.conv1'"):
        trace_with_cuts(Residual(), ["block.conv1"])


def test_untraceable_models_are_refused_naming_their_type() -> None:
    with pytest.raises(SegmentError, match=r"cannot cut Branchy into stages: torch\.fx cannot"):
        trace_with_cuts(Branchy(), ["fc"])


def test_exits_out_of_order_or_not_called_once_are_refused() -> None:
    module = ClassificationModule(SmallCNN(), num_classes=10)
    with pytest.raises(SegmentError, match=r"'model\.conv1' runs before the exit listed ahead"):
        trace_with_cuts(module, ["model.conv2", "model.conv1"])
    with pytest.raises(SegmentError, match="'train_acc' is called 0 times"):
        trace_with_cuts(module, ["train_acc"])
