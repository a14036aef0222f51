"""Pruning scores: magnitude, and Wanda's |W| * rms(input) gathered by forward hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.core.criteria import (
    criterion_masks,
    criterion_scores,
    input_rms,
    needs_calibration,
)
from lightning_sparse.core.masks import compute_masks, mask_sparsity, parse_mask_type
from tests.stage_helpers import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

UNSTRUCTURED = parse_mask_type("unstructured")


def _unfolded_rms(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Reference: im2col columns, mean of squares over samples and positions, per group."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = (0, 0)
    columns = F.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
    )
    rms = columns.square().mean(dim=(0, 2)).sqrt()  # [C * kh * kw]
    channels, groups = x.shape[1], conv.groups
    per_group = rms.reshape(groups, channels // groups, -1)
    return per_group.repeat_interleave(conv.out_channels // groups, 0).reshape(conv.weight.shape)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Conv2d(4, 8, (3, 2), padding=2, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
        nn.Conv2d(3, 5, 1),
    ],
    ids=["strided-grouped", "dilated-rectangular", "depthwise-reflect", "pointwise"],
)
def test_conv_input_norms_match_im2col(conv: nn.Conv2d) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, conv.in_channels, 9, 9, generator=generator) for _ in range(2)]
    got = input_rms(nn.Sequential(conv), ["0.weight"], [(b, None) for b in batches])["0.weight"]
    expected = _unfolded_rms(conv, torch.cat(batches))
    assert got.shape == conv.weight.shape
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_conv1d_and_linear_input_norms() -> None:
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.Flatten(), nn.Linear(50, 4))
    x = torch.randn(6, 3, 10)
    norms = input_rms(model, ["0.weight", "2.weight"], [x])
    as_2d = _unfolded_rms(nn.Conv2d(3, 5, (1, 3), padding=(0, 1)), x.unsqueeze(2))
    torch.testing.assert_close(norms["0.weight"], as_2d.reshape(5, 3, 3))
    hidden = model[1](model[0](x))
    expected = hidden.square().mean(dim=0).sqrt().expand(4, 50)
    torch.testing.assert_close(norms["2.weight"], expected)


def test_linear_over_sequences_averages_every_position() -> None:
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(4, 7, 5)
    norms = input_rms(model, ["0.weight"], [x])
    torch.testing.assert_close(norms["0.weight"][0], x.reshape(-1, 5).square().mean(0).sqrt())


def test_hooks_are_removed_and_the_training_flag_restored() -> None:
    model = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5))
    model.train()
    input_rms(model, ["0.weight"], [torch.randn(2, 4)], max_batches=1)
    assert model.training
    assert not model[0]._forward_pre_hooks


def test_max_batches_limits_the_calibration() -> None:
    model = nn.Sequential(nn.Linear(2, 1))
    small, large = torch.ones(1, 2), torch.full((1, 2), 100.0)
    first_only = input_rms(model, ["0.weight"], [small, large], max_batches=1)["0.weight"]
    torch.testing.assert_close(first_only, torch.ones(1, 2))


def test_magnitude_scores_give_exactly_the_magnitude_masks() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 3))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    scores = criterion_scores(model, params, "magnitude")
    for mask_type in ("unstructured", "2:4", "channel"):
        parsed = parse_mask_type(mask_type)
        for global_ in (False, True):
            ours = criterion_masks(scores, 0.5, parsed, global_)
            reference = compute_masks(
                {n: p.detach() for n, p in params.items()}, 0.5, parsed, global_
            )
            for name in params:
                assert torch.equal(ours[name], reference[name]), (mask_type, global_, name)


def test_wanda_prunes_weights_on_quiet_inputs_first() -> None:
    # Two inputs: the first is large in the data, the second nearly silent. Weights on the silent
    # input are bigger, so magnitude keeps them; Wanda keeps the ones that carry signal.
    layer = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 3.0]] * 4))
    model = nn.Sequential(layer)
    data = [torch.tensor([[10.0, 0.01], [-10.0, 0.02]])]
    params = {"0.weight": layer.weight}
    by_magnitude = criterion_masks(criterion_scores(model, params, "magnitude"), 0.5, UNSTRUCTURED)
    by_wanda = criterion_masks(criterion_scores(model, params, "wanda", data), 0.5, UNSTRUCTURED)
    assert by_magnitude["0.weight"][:, 1].all()
    assert not by_magnitude["0.weight"][:, 0].any()
    assert by_wanda["0.weight"][:, 0].all()
    assert not by_wanda["0.weight"][:, 1].any()


@pytest.mark.parametrize("mask_type", ["unstructured", "2:4", "block4", "channel"])
@pytest.mark.parametrize("global_sparsity", [False, True])
def test_wanda_masks_have_the_structure_asked_for(mask_type: str, global_sparsity: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 8))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    scores = criterion_scores(model, params, "wanda", [torch.randn(5, 4, 4, 4)])
    assert all(bool((s >= 0).all()) for s in scores.values())
    masks = criterion_masks(scores, 0.5, parse_mask_type(mask_type), global_sparsity)
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned / total == pytest.approx(0.5, abs=0.02)
    if mask_type == "2:4":
        for mask in masks.values():
            moved = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
            assert bool((moved.reshape(-1, 4).sum(dim=1) == 2).all())
    if not global_sparsity:
        for mask in masks.values():
            assert mask_sparsity(mask) == pytest.approx(0.5, abs=0.02)


def test_wanda_needs_calibration() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    params = {"0.weight": model[0].weight}
    assert needs_calibration("wanda")
    assert not needs_calibration("magnitude")
    with pytest.raises(ValueError, match="needs calibration batches"):
        criterion_scores(model, params, "wanda")
    with pytest.raises(ValueError, match="The calibration set is empty"):
        criterion_scores(model, params, "wanda", [])


def test_a_layer_that_never_runs_is_named() -> None:
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers["used"](x)

    wrapper = Wrapper()
    with pytest.raises(ValueError, match=r"`layers.unused.weight` got no input"):
        input_rms(wrapper, ["layers.used.weight", "layers.unused.weight"], [torch.ones(1, 2)])


def test_unknown_criterion_and_negative_scores() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="`criterion`='taylor' is not allowed"):
        criterion_scores(model, {"0.weight": model[0].weight}, "taylor")
    with pytest.raises(ValueError, match="non-negative"):
        criterion_masks({"w": -torch.ones(2, 2)}, 0.5, UNSTRUCTURED)
