from __future__ import annotations

import itertools

import pytest
import torch

from lightning_sparse.core.clustering import (
    INITS,
    centroid_gradients,
    kmeans_codebook,
    reconstruct,
)


def _pruned_weight(shape: tuple[int, ...] = (32, 48), sparsity: float = 0.7) -> torch.Tensor:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    threshold = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
    return weight.masked_fill(weight.abs() <= threshold, 0.0)


def _error(weight: torch.Tensor, num_clusters: int, init: str, per_channel: bool) -> float:
    centroids, assignments = kmeans_codebook(weight, num_clusters, init, per_channel)
    return float(((reconstruct(centroids, assignments, weight != 0) - weight) ** 2).sum())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_reconstruction_error_decreases_with_k(init: str, per_channel: bool) -> None:
    weight = _pruned_weight()
    errors = [_error(weight, k, init, per_channel) for k in (1, 2, 4, 8, 16)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_pruned_zeros_stay_zero_and_are_never_a_centroid(init: str, per_channel: bool) -> None:
    weight = _pruned_weight(sparsity=0.9)
    mask = weight != 0
    centroids, assignments = kmeans_codebook(weight, 8, init, per_channel)
    rebuilt = reconstruct(centroids, assignments, mask)
    assert (rebuilt[~mask] == 0).all()
    assert (assignments[~mask] == 0).all()


def test_one_cluster_is_the_mean_of_the_kept_weights_only() -> None:
    weight = _pruned_weight(sparsity=0.9)
    centroids, _ = kmeans_codebook(weight, 1)
    torch.testing.assert_close(centroids, weight[weight != 0].mean().reshape(1))
    channel_centroids, _ = kmeans_codebook(weight, 1, per_channel=True)
    for row, centroid in zip(weight, channel_centroids[:, 0], strict=True):
        if (row != 0).any():
            torch.testing.assert_close(centroid, row[row != 0].mean())


def test_a_mask_prunes_non_zero_weights_too() -> None:
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)) + 10.0
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(2)) > 0.5
    centroids, assignments = kmeans_codebook(weight, 4, mask=mask)
    assert centroids.min() > 5.0  # the masked weights (all near 10) are the only ones clustered
    assert (reconstruct(centroids, assignments, mask)[~mask] == 0).all()


@pytest.mark.parametrize("init", INITS)
def test_deterministic(init: str) -> None:
    weight = _pruned_weight()
    first = kmeans_codebook(weight, 8, init, per_channel=True, seed=3)
    second = kmeans_codebook(weight.clone(), 8, init, per_channel=True, seed=3)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_per_channel_shapes_and_dtypes() -> None:
    weight = _pruned_weight((6, 4, 3, 3), sparsity=0.5).double()
    centroids, assignments = kmeans_codebook(weight, 5, per_channel=True)
    assert centroids.shape == (6, 5)
    assert centroids.dtype == torch.float64
    assert assignments.shape == weight.shape
    assert assignments.dtype == torch.int64
    assert int(assignments.min()) >= 0
    assert int(assignments.max()) < 5
    layer_centroids, _ = kmeans_codebook(weight, 5)
    assert layer_centroids.shape == (5,)
    assert (centroids.diff(dim=1) >= 0).all()  # ascending per channel


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("extra", [0, 3])
def test_k_at_least_distinct_values_is_exact(init: str, per_channel: bool, extra: int) -> None:
    levels = torch.tensor([-2.0, -0.5, 0.25, 1.0, 7.0])
    picks = torch.randint(0, 5, (4, 30), generator=torch.Generator().manual_seed(4))
    weight = levels[picks]
    weight[:, :5] = levels  # every row holds every level
    weight[:, 5:9] = 0.0  # and some pruned zeros
    centroids, assignments = kmeans_codebook(weight, 5 + extra, init, per_channel)
    assert torch.equal(reconstruct(centroids, assignments, weight != 0), weight)


def test_a_fully_pruned_channel_reconstructs_to_zero() -> None:
    weight = _pruned_weight((4, 16), sparsity=0.5)
    weight[2] = 0.0
    centroids, assignments = kmeans_codebook(weight, 3, per_channel=True)
    assert (centroids[2] == 0).all()
    assert (reconstruct(centroids, assignments, weight != 0)[2] == 0).all()


@pytest.mark.parametrize("per_channel", [False, True])
def test_centroid_gradient_is_the_hand_sum(per_channel: bool) -> None:
    weight = _pruned_weight((5, 12), sparsity=0.4)
    mask = weight != 0
    centroids, assignments = kmeans_codebook(weight, 4, per_channel=per_channel)
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
    summed = centroid_gradients(grad, assignments, 4, mask, per_channel)

    expected = torch.zeros(5, 4) if per_channel else torch.zeros(4)
    for row in range(5):
        for column in range(12):
            if mask[row, column]:
                cluster = int(assignments[row, column])
                if per_channel:
                    expected[row, cluster] += grad[row, column]
                else:
                    expected[cluster] += grad[row, column]
    torch.testing.assert_close(summed, expected)

    # The same as autograd through reconstruct(), which training with shared weights relies on.
    leaf = centroids.clone().requires_grad_(True)
    (reconstruct(leaf, assignments, mask) * grad).sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clusters": 0}, "`num_clusters`=0"),
        ({"num_clusters": 4, "init": "kmeans++"}, "`init`='kmeans\\+\\+'"),
        ({"num_clusters": 4, "iterations": -1}, "`iterations`=-1"),
        ({"num_clusters": 4, "mask": torch.ones(3, 3)}, "`mask` must be a bool tensor"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kmeans_codebook(torch.randn(4, 4), **kwargs)  # type: ignore[arg-type]
