from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_sparse.core.lowrank import (
    factorize_conv2d,
    factorize_linear,
    layer_dims,
    macs_saving,
    rank_for_energy,
    rank_for_ratio,
    replace_module,
    singular_values,
    worth_factorizing,
)


def _seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_linear_reproduces_the_layer(bias: bool) -> None:
    _seeded()
    linear = nn.Linear(24, 16, bias=bias)
    inputs = torch.randn(8, 24)
    factored = factorize_linear(linear, 16)
    first, second = factored
    assert isinstance(first, nn.Linear)
    assert isinstance(second, nn.Linear)
    assert first.weight.shape == (16, 24)
    assert first.bias is None
    assert second.weight.shape == (16, 16)
    assert (second.bias is not None) == bias
    torch.testing.assert_close(factored(inputs), linear(inputs), atol=1e-5, rtol=0)


def test_factors_split_the_singular_values_evenly() -> None:
    _seeded()
    linear = nn.Linear(10, 6)
    first, second = factorize_linear(linear, 4)
    assert isinstance(first, nn.Linear)
    assert isinstance(second, nn.Linear)
    first_norms = first.weight.detach().norm(dim=1)
    second_norms = second.weight.detach().norm(dim=0)
    torch.testing.assert_close(first_norms, second_norms)
    torch.testing.assert_close(first_norms**2, singular_values(linear)[:4].float())


def test_error_decreases_with_rank() -> None:
    _seeded()
    linear = nn.Linear(32, 20)
    inputs = torch.randn(64, 32)
    with torch.no_grad():
        errors = [
            float((factorize_linear(linear, rank)(inputs) - linear(inputs)).norm())
            for rank in (1, 2, 5, 10, 15, 20)
        ]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-4


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "bias"),
    [(1, 0, 1, True), (2, 1, 1, False), (1, "same", 2, True)],
)
def test_conv_shapes_and_full_rank_equality(
    stride: int, padding: int | str, dilation: int, bias: bool
) -> None:
    _seeded()
    conv = nn.Conv2d(3, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    inputs = torch.randn(2, 3, 11, 11)
    full = min(8, 3 * 3 * 3)
    factored = factorize_conv2d(conv, full)
    spatial, pointwise = factored
    assert isinstance(spatial, nn.Conv2d)
    assert isinstance(pointwise, nn.Conv2d)
    assert spatial.out_channels == full
    assert spatial.bias is None
    assert pointwise.kernel_size == (1, 1)
    assert (pointwise.bias is not None) == bias
    expected = conv(inputs)
    assert factored(inputs).shape == expected.shape
    torch.testing.assert_close(factored(inputs), expected, atol=1e-5, rtol=0)
    assert factorize_conv2d(conv, 2)(inputs).shape == expected.shape


def test_grouped_conv_is_refused_naming_the_layer() -> None:
    conv = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match=r"features\.3: groups=2"):
        factorize_conv2d(conv, 2, name="features.3")


@pytest.mark.parametrize("rank", [0, 7, 2.5])
def test_rank_out_of_range_is_refused(rank: int) -> None:
    with pytest.raises(ValueError, match=r"`rank`=.* for fc1 \(6, 10\) must be an integer in"):
        factorize_linear(nn.Linear(10, 6), rank, name="fc1")


def test_rank_for_energy_on_a_constructed_spectrum() -> None:
    # Squares 16, 9, 4, 1 (total 30): cumulative fractions 0.533, 0.833, 0.967, 1.0.
    spectrum = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert rank_for_energy(spectrum, 0.5) == 1
    assert rank_for_energy(spectrum, 16 / 30) == 1
    assert rank_for_energy(spectrum, 0.8) == 2
    assert rank_for_energy(spectrum, 0.9) == 3
    assert rank_for_energy(spectrum, 0.99) == 4
    assert rank_for_energy(spectrum, 1.0) == 4
    assert rank_for_energy(torch.zeros(3), 0.9) == 1


def test_rank_for_energy_of_a_low_rank_layer() -> None:
    _seeded()
    linear = nn.Linear(30, 20)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(20, 3) @ torch.randn(3, 30))
    assert rank_for_energy(singular_values(linear), 0.999999) == 3


@pytest.mark.parametrize(
    ("shape", "ratio", "rank"),
    [((20, 30), 0.5, 10), ((20, 30), 0.3, 6), ((20, 30), 0.01, 1), ((8, 3, 3, 3), 1.0, 8)],
)
def test_rank_for_ratio(shape: tuple[int, ...], ratio: float, rank: int) -> None:
    assert rank_for_ratio(shape, ratio) == rank


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rank_for_energy(torch.ones(3), 0.0), "`energy`=0.0"),
        (lambda: rank_for_ratio((4, 4), 1.5), "`ratio`=1.5"),
    ],
)
def test_invalid_fractions_are_named(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_macs_saving_and_worth_factorizing() -> None:
    assert macs_saving(800, 500, 100) == pytest.approx(1 - 100 * 1300 / 400_000)
    assert worth_factorizing(800, 500, 100)
    # Break-even: r(in + out) == in * out is not a saving.
    assert not worth_factorizing(4, 4, 2)
    assert worth_factorizing(4, 4, 1)
    assert macs_saving(4, 4, 3) < 0
    assert layer_dims(nn.Conv2d(20, 50, 5)) == (500, 50)
    assert layer_dims(nn.Linear(800, 500)) == (800, 500)


def test_replace_module_in_nested_sequential() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    old = model.get_submodule("1.1")
    assert isinstance(old, nn.Linear)
    factored = factorize_linear(old, 2, name="1.1")
    assert replace_module(model, "1.1", factored) is old
    assert model.get_submodule("1.1") is factored
    assert "1.1.0.weight" in model.state_dict()
    with pytest.raises(ValueError, match=r"No module '1\.5'"):
        replace_module(model, "1.5", nn.Identity())
    with pytest.raises(ValueError, match="cannot replace the root"):
        replace_module(model, "", nn.Identity())
