"""Weight sharing: 1-D k-means codebooks for a layer or for each of its output channels.

A clustered weight is ``centroids`` (``[k]`` per layer, ``[out_channels, k]`` per channel), an
integer ``assignments`` tensor shaped like the weight, and a bool ``mask`` (``True`` keeps the
weight), as in Han et al., *Deep Compression* (2016).

Sparsity is preserved with a **separate mask**, not a reserved assignment index: pruned weights
are never clustered, so no centroid is pulled towards zero, and they reconstruct to exactly zero.
Their assignment is ``0`` and means nothing. A separate mask keeps every code in ``[0, k)``
(``k = 16`` is exactly 4 bits, not 17 symbols), and it is what the pruning callbacks already
keep and what the entropy coder codes as gaps.

Lloyd's algorithm runs in 1-D on the sorted kept values: a cluster is a contiguous run of the
sorted values, so each iteration costs ``O(k log n)`` searches and two prefix-sum lookups instead
of an ``n x k`` distance matrix, and it is deterministic (no floating-point atomics) on any
device. No sklearn.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INITS", "centroid_gradients", "kmeans_codebook", "reconstruct"]

INITS = ("linear", "density", "random")


def kmeans_codebook(
    weight: Tensor,
    num_clusters: int,
    init: str = "linear",
    per_channel: bool = False,
    iterations: int = 30,
    mask: Tensor | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Cluster a weight's kept values into ``num_clusters`` shared values.

    Args:
        weight: Any-shaped weight; dim 0 is the output channel (Linear, Conv).
        num_clusters: Centroids per layer, or per output channel when ``per_channel``.
        init: ``"linear"`` spaces the centroids evenly over ``[min, max]`` of the kept weights
            (Deep Compression found it best: it keeps the rare large weights representable);
            ``"density"`` places them at evenly spaced levels of the kept weights' CDF;
            ``"random"`` picks kept weights at random (Forgy), seeded by ``seed``.
        per_channel: One codebook per output channel (row of dim 0) instead of one per layer.
        iterations: Most Lloyd iterations; it stops earlier once no weight changes cluster.
        mask: Bool tensor shaped like ``weight``, ``True`` keeps the weight. ``None`` keeps
            the non-zero weights. The mask is authoritative: a kept weight that is exactly zero
            is clustered like any other.
        seed: Seed of the ``"random"`` init; the other inits do not draw random numbers.

    Returns:
        ``(centroids, assignments)``: centroids in ``weight.dtype``, ascending, shaped ``[k]``
        or ``[out_channels, k]``; ``assignments`` int64 shaped like ``weight``, in ``[0, k)``,
        ``0`` where pruned. A channel with fewer distinct kept values than ``k`` leaves the
        spare centroids unused; a channel with no kept weight has all-zero (unused) centroids.
        With ``k`` at least the number of distinct kept values the reconstruction is exact.

    Raises:
        ValueError: When ``num_clusters``, ``init``, ``iterations`` or ``mask`` is invalid.
    """
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"`num_clusters`={num_clusters!r} must be an integer >= 1.")
    if init not in INITS:
        raise ValueError(f"`init`={init!r} is not an init; allowed: {', '.join(INITS)}.")
    if iterations < 0:
        raise ValueError(f"`iterations`={iterations!r} must be >= 0.")
    if weight.dim() == 0:
        raise ValueError("`weight` must have at least one dimension.")
    if mask is None:
        mask = weight != 0
    elif mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"`mask` must be a bool tensor shaped like the weight {tuple(weight.shape)}; "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )
    rows = weight.shape[0] if per_channel else 1
    # float64: the cluster sums are differences of prefix sums over up to millions of weights.
    values = weight.detach().reshape(rows, -1).to(torch.float64)
    kept = mask.reshape(rows, -1)
    count = kept.sum(dim=1)
    # Pruned values sort to the end as +inf, so each row's kept values are its first count[c].
    sorted_values = torch.sort(values.masked_fill(~kept, torch.inf), dim=1).values
    finite = torch.arange(values.shape[1], device=values.device) < count[:, None]
    prefix = torch.nn.functional.pad(torch.cumsum(sorted_values.masked_fill(~finite, 0), 1), (1, 0))

    centroids = _initial_centroids(values, kept, sorted_values, count, num_clusters, init, seed)
    centroids = torch.sort(centroids, dim=1).values
    has_values = (count > 0)[:, None]
    previous_edges: Tensor | None = None
    for _ in range(iterations):
        # A cluster is the run of sorted values between two centroid midpoints; a value equal
        # to a midpoint goes to the upper cluster here and in the final assignment alike.
        midpoints = (centroids[:, :-1] + centroids[:, 1:]) / 2
        starts = torch.searchsorted(sorted_values, midpoints.contiguous(), right=False)
        edges = torch.cat([torch.zeros_like(count)[:, None], starts, count[:, None]], dim=1)
        sizes = edges[:, 1:] - edges[:, :-1]
        sums = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
        converged = previous_edges is not None and torch.equal(edges, previous_edges)
        centroids = torch.where(sizes > 0, sums / sizes.clamp(min=1), centroids)
        empty = (sizes == 0) & has_values
        if empty.any():
            centroids, reseeded = _reseed_empty(centroids, empty, sorted_values, finite)
            converged = converged and not reseeded
        # Idle centroids keep their value and reseeded ones land anywhere: restore the order.
        centroids = torch.sort(centroids, dim=1).values
        if converged:
            break
        previous_edges = edges

    assignments = _assign(values, centroids).masked_fill(~kept, 0).reshape(weight.shape)
    centroids = centroids.to(weight.dtype)
    return (centroids if per_channel else centroids[0]), assignments


def reconstruct(centroids: Tensor, assignments: Tensor, mask: Tensor) -> Tensor:
    """The shared-value weight: each kept weight's centroid, zero where ``mask`` prunes.

    Differentiable in ``centroids``: autograd through it gives :func:`centroid_gradients`.

    Args:
        centroids: ``[k]`` (per layer) or ``[out_channels, k]`` (per channel).
        assignments: Int64 cluster indices shaped like the weight.
        mask: Bool tensor shaped like the weight, ``True`` keeps the weight.

    Returns:
        A tensor shaped like ``assignments`` with ``centroids``' dtype.
    """
    if centroids.dim() == 1:
        values = centroids[assignments]
    else:
        rows = centroids.shape[0]
        values = centroids.gather(1, assignments.reshape(rows, -1)).reshape(assignments.shape)
    return values.masked_fill(~mask, 0)


def centroid_gradients(
    grad: Tensor,
    assignments: Tensor,
    num_clusters: int,
    mask: Tensor,
    per_channel: bool = False,
) -> Tensor:
    """Sum each cluster's weight gradients into its centroid (Deep Compression's update).

    Args:
        grad: Gradient of the loss with respect to the (reconstructed) weight.
        assignments: Int64 cluster indices shaped like the weight.
        num_clusters: ``k``, the number of centroids per codebook.
        mask: Bool tensor shaped like the weight; pruned weights belong to no cluster, so
            their gradient is dropped rather than added to cluster 0.
        per_channel: Whether the codebooks are per output channel (dim 0).

    Returns:
        ``[k]`` or ``[out_channels, k]`` gradients in ``grad.dtype``.
    """
    rows = grad.shape[0] if per_channel else 1
    flat_grad = grad.reshape(rows, -1).masked_fill(~mask.reshape(rows, -1), 0)
    summed = torch.zeros(rows, num_clusters, dtype=grad.dtype, device=grad.device)
    summed.scatter_add_(1, assignments.reshape(rows, -1), flat_grad)
    return summed if per_channel else summed[0]


def _initial_centroids(
    values: Tensor,
    kept: Tensor,
    sorted_values: Tensor,
    count: Tensor,
    num_clusters: int,
    init: str,
    seed: int,
) -> Tensor:
    """``[rows, k]`` starting centroids; rows without a kept value start (and stay) at zero."""
    last = (count - 1).clamp(min=0)[:, None]
    levels = torch.linspace(0, 1, num_clusters, dtype=values.dtype, device=values.device)
    if init == "linear":
        low, high = sorted_values[:, :1], sorted_values.gather(1, last)
        centroids = low + (high - low) * levels
    elif init == "density":
        # Evenly spaced levels of the empirical CDF, read off the sorted kept values.
        index = torch.round(levels * last).long()
        centroids = sorted_values.gather(1, index)
    else:
        generator = torch.Generator().manual_seed(seed)
        keys = torch.rand(values.shape, generator=generator, dtype=values.dtype).to(values.device)
        # Pruned weights get keys above every kept one, so a row's first count[c] picks are kept.
        order = torch.argsort(keys.masked_fill(~kept, 2.0), dim=1)
        picks = torch.arange(num_clusters, device=values.device)[None] % count.clamp(min=1)[:, None]
        centroids = values.gather(1, order.gather(1, picks))
    return centroids.masked_fill((count == 0)[:, None], 0.0)


def _reseed_empty(
    centroids: Tensor, empty: Tensor, sorted_values: Tensor, finite: Tensor
) -> tuple[Tensor, bool]:
    """Move empty centroids onto the worst-represented kept values.

    Without this, a centroid that loses all its weights stays idle and ``k`` at least the number
    of distinct values would not reconstruct exactly; moving it onto the value with the largest
    error lowers the total error, so Lloyd still converges.
    """
    error = (sorted_values - centroids.gather(1, _assign(sorted_values, centroids))) ** 2
    error = error.masked_fill(~finite, -1.0)
    picks = min(centroids.shape[1], sorted_values.shape[1])
    top_error, top_index = error.topk(picks, dim=1)
    rank = (torch.cumsum(empty.long(), dim=1) - 1).clamp(0, picks - 1)
    candidate_error = top_error.gather(1, rank)
    moves = empty & (torch.cumsum(empty.long(), dim=1) <= picks) & (candidate_error > 0)
    candidates = sorted_values.gather(1, top_index.gather(1, rank))
    return torch.where(moves, candidates, centroids), bool(moves.any())


def _assign(values: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest (ascending) centroid for each value, row by row."""
    midpoints = ((centroids[:, :-1] + centroids[:, 1:]) / 2).contiguous()
    return torch.searchsorted(midpoints, values.contiguous(), right=True)
