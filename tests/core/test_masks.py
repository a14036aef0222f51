from __future__ import annotations

import pytest
import torch

from lightning_sparse.core.masks import compute_masks, mask_sparsity, parse_mask_type


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv": torch.randn(16, 8, 3, 3, generator=generator),
        "linear": torch.randn(12, 32, generator=generator) * 3,
    }


def _by_input_groups(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Mask regrouped as [groups, size] along the input dimension (dim 1)."""
    moved = mask.permute(0, *range(2, mask.dim()), 1) if mask.dim() > 2 else mask
    return moved.reshape(-1, size)


@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.5, 0.9, 0.999])
def test_unstructured_per_layer_prunes_exactly_the_smallest(sparsity: float) -> None:
    weights = _weights()
    masks = compute_masks(weights, sparsity, parse_mask_type("unstructured"))
    for name, weight in weights.items():
        mask = masks[name]
        assert mask.shape == weight.shape
        assert mask.dtype == torch.bool
        assert int((~mask).sum()) == round(sparsity * weight.numel())
        if 0 < (~mask).sum() < mask.numel():
            assert weight[~mask].abs().max() <= weight[mask].abs().min()


def test_global_uses_one_threshold_over_all_layers() -> None:
    weights = _weights()
    masks = compute_masks(weights, 0.8, parse_mask_type("unstructured"), global_sparsity=True)
    total = sum(w.numel() for w in weights.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.8 * total)
    max_pruned = max(weights[n][~masks[n]].abs().max() for n in weights)
    min_kept = min(weights[n][masks[n]].abs().min() for n in weights)
    assert max_pruned <= min_kept
    # the linear layer was scaled up, so it keeps more than its share
    assert mask_sparsity(masks["linear"]) < 0.8 < mask_sparsity(masks["conv"])


@pytest.mark.parametrize("global_sparsity", [False, True])
def test_two_of_four_at_half_sparsity_is_exact(global_sparsity: bool) -> None:
    weights = _weights()
    masks = compute_masks(weights, 0.5, parse_mask_type("2:4"), global_sparsity)
    for name, weight in weights.items():
        groups = _by_input_groups(masks[name], 4)
        assert (groups.sum(dim=1) == 2).all(), name
        kept = _by_input_groups(weight.abs(), 4)
        # the two kept are the two largest of each group
        assert (
            kept[groups].reshape(-1, 2).min(1).values >= kept[~groups].reshape(-1, 2).max(1).values
        ).all()


def test_n_of_m_ramps_without_breaking_the_pattern() -> None:
    weights = _weights()
    masks = compute_masks(weights, 0.25, parse_mask_type("2:4"))
    for name, weight in weights.items():
        groups = _by_input_groups(masks[name], 4)
        assert (groups.sum(dim=1) >= 2).all()  # never more than M-N pruned in a group
        assert int((~masks[name]).sum()) == round(0.25 * weight.numel())
    # asking for more than N:M can hold is capped at 1 - N/M
    capped = compute_masks(weights, 0.9, parse_mask_type("1:4"))
    assert all(mask_sparsity(m) == pytest.approx(0.75) for m in capped.values())


@pytest.mark.parametrize("global_sparsity", [False, True])
def test_block_masks_prune_whole_blocks(global_sparsity: bool) -> None:
    weights = _weights()
    masks = compute_masks(weights, 0.6, parse_mask_type("block4"), global_sparsity)
    for mask in masks.values():
        groups = _by_input_groups(mask, 4)
        assert (groups.all(dim=1) | ~groups.any(dim=1)).all()
    if not global_sparsity:
        assert mask_sparsity(masks["linear"]) == pytest.approx(round(0.6 * 96) / 96)
    else:
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert 0.6 * 1536 - 4 < pruned <= 0.6 * 1536


def test_channel_masks_remove_whole_output_channels() -> None:
    weights = _weights()
    masks = compute_masks(weights, 0.5, parse_mask_type("channel"))
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.all(dim=1) | ~rows.any(dim=1)).all()
        assert int((~rows.any(dim=1)).sum()) == round(0.5 * mask.shape[0]), name


def test_masks_grow_monotonically_on_masked_weights() -> None:
    weights = _weights()
    unstructured = parse_mask_type("unstructured")
    first = compute_masks(weights, 0.5, unstructured)
    zeroed = {n: w * first[n] for n, w in weights.items()}
    second = compute_masks(zeroed, 0.8, unstructured)
    for name in weights:
        assert not (second[name] & ~first[name]).any(), "a pruned weight came back"


def test_incompatible_group_names_the_layer() -> None:
    weights = {"stem.weight": torch.randn(8, 1, 3, 3)}
    with pytest.raises(
        ValueError, match=r"`stem.weight` has input dimension 1 .* not divisible by 4"
    ):
        compute_masks(weights, 0.5, parse_mask_type("2:4"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("random", r"`mask_type`='random' is not a mask type; allowed: 'unstructured'"),
        ("4:2", r"`mask_type`='4:2': N:M needs 0 < N < M"),
        ("block1", r"`mask_type`='block1': a block needs at least 2 weights"),
    ],
)
def test_bad_mask_types(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mask_type(text)


def test_parsed_mask_types() -> None:
    assert parse_mask_type("2:4").max_sparsity == pytest.approx(0.5)
    assert str(parse_mask_type("block8")) == "block8"
    assert parse_mask_type("channel").max_sparsity == 1.0
