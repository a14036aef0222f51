"""Penalties, their groups and the strength schedule, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_sparse.core.regularization import (
    fraction_below,
    parse_groups,
    penalty,
    resolve_penalty_params,
    strength_factor,
)


def test_l1_and_bn_scale_are_sums_of_magnitudes() -> None:
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert penalty(weight, "l1").item() == pytest.approx(3.5)
    assert penalty(torch.tensor([0.5, -0.25]), "bn_scale").item() == pytest.approx(0.75)


def test_group_lasso_over_output_channels_weights_by_sqrt_group_size() -> None:
    # Two conv filters of 1x1x2x2 = 4 weights each: sqrt(4) * (||f0|| + ||f1||).
    weight = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    expected = 2.0 * (5.0 + 2.0)
    assert penalty(weight, "group_lasso", parse_groups("channel")).item() == pytest.approx(expected)


def test_group_lasso_over_nm_groups_tiles_the_input_dimension_at_each_kernel_position() -> None:
    # Conv [out=1, in=4, 1, 2]: at kernel position 0 the 4 input weights are w[0, :, 0, 0].
    weight = torch.zeros(1, 4, 1, 2)
    weight[0, :, 0, 0] = torch.tensor([1.0, 2.0, 2.0, 4.0])  # norm 5
    weight[0, :, 0, 1] = torch.tensor([0.0, 3.0, 0.0, 4.0])  # norm 5
    structure = parse_groups("2:4")
    assert penalty(weight, "group_lasso", structure).item() == pytest.approx(2.0 * 10.0)
    # Root mean squares 2.5 and 2.5: neither is below 2, both below 3.
    assert fraction_below(weight, "group_lasso", structure, 2.0) == 0.0
    assert fraction_below(weight, "group_lasso", structure, 3.0) == 1.0


def test_group_lasso_gradient_at_a_zero_group_is_zero_not_nan() -> None:
    weight = torch.zeros(2, 3, requires_grad=True)
    penalty(weight, "group_lasso", parse_groups("channel")).backward()
    assert weight.grad is not None
    assert torch.equal(weight.grad, torch.zeros(2, 3))


def test_fraction_below_uses_each_groups_root_mean_square() -> None:
    weight = torch.tensor([[0.001, 0.001, 0.001, 0.001], [1.0, 0.0, 0.0, 0.0]])
    # RMS 0.001 and 0.5.
    assert fraction_below(weight, "group_lasso", parse_groups("channel"), 0.01) == 0.5
    assert fraction_below(weight, "l1", None, 0.01) == pytest.approx(7 / 8)


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [
        (0.0, 0.0),
        (0.99, 0.0),
        (1.0, 0.0),
        (1.5, 0.25),
        (2.0, 0.5),
        (3.0, 1.0),
        (4.99, 1.0),
        (5.0, 0.0),
        (6.0, 0.0),
    ],
)
def test_strength_warms_up_ramps_holds_and_stops(epoch: float, factor: float) -> None:
    assert strength_factor(epoch, start_epoch=1.0, end_epoch=5.0, ramp_epochs=2.0) == (
        pytest.approx(factor)
    )


def test_strength_without_ramp_or_end() -> None:
    assert strength_factor(0.0, 0.0, None, 0.0) == 1.0
    assert strength_factor(1e6, 0.0, None, 0.0) == 1.0
    assert math.isclose(strength_factor(0.5, 0.0, None, 1.0), 0.5)


@pytest.mark.parametrize(
    ("groups", "message"),
    [("unstructured", "`groups`='unstructured' is not allowed"), ("rows", "`groups`='rows'")],
)
def test_groups_errors_name_the_field(groups: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_groups(groups)


def test_bn_scale_selects_batchnorm_weights_and_names_the_field_when_there_are_none() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 2))
    assert list(resolve_penalty_params(model, ["__ALL_PRUNABLE__"], "bn_scale")) == ["1.weight"]
    assert list(resolve_penalty_params(model, ["re:1\\."], "bn_scale")) == ["1.weight"]
    with pytest.raises(ValueError, match=r"`params` entry '0\.weight' matches no BatchNorm scale"):
        resolve_penalty_params(model, ["0.weight"], "bn_scale")
    plain = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        resolve_penalty_params(plain, ["__ALL_PRUNABLE__"], "bn_scale")


def test_nm_groups_that_do_not_tile_a_weight_name_it() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"`groups`='2:4'.*'0.weight' has shape \[4, 6\]"):
        resolve_penalty_params(model, ["__ALL_PRUNABLE__"], "group_lasso", parse_groups("2:4"))
