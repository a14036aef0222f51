"""Early exits (BranchyNet, Teerapittayanon et al. 2016): heads, joint loss, thresholds, stages.

Pure torch (``torch.fx`` included), no Lightning:

- :class:`ExitHead`: (optional ReLU) -> average pool -> linear, on a layer's output;
- :func:`joint_exit_loss`: ``sum_i w_i * CE(head_i, labels)``, the term added to the task loss;
- :func:`calibrate_thresholds` and :func:`cascade`: per-exit confidence thresholds (max softmax
  probability) chosen on held-out data so that the cascade loses at most a given accuracy, and
  what a set of thresholds does there;
- :func:`trace_with_cuts`: the model traced by ``torch.fx`` with the exit layers' outputs as extra
  outputs, after checking that each exit is a clean cut (its output is the only value the rest of
  the forward needs), which is what lets the model be exported as a chain of stages.

A threshold of 1.0 (or more) turns an exit off; otherwise an input leaves at the first exit whose
head's max softmax probability is ``>= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "ACTIVATIONS",
    "ExitHead",
    "SegmentError",
    "batch_labels",
    "calibrate_thresholds",
    "cascade",
    "exit_mask",
    "joint_exit_loss",
    "trace_with_cuts",
]

ACTIVATIONS = ("relu", "none")
# Heads start from this seed (plus the exit's index) on every rank and in every process, so DDP
# ranks hold the same heads without a broadcast and a head rebuilt from a checkpoint's spec has
# the same initial values.
HEAD_SEED = 0


class SegmentError(ValueError):
    """The model cannot be cut into stages at the exits."""


class ExitHead(nn.Module):
    """An exit classifier on one layer's output: (ReLU) -> average pool -> flatten -> linear.

    ``[batch, channels, *spatial]`` outputs (Conv1d/2d/3d) are pooled to ``pool_size`` per spatial
    dimension (1: global average pooling); ``[batch, features]`` outputs go straight to the linear
    layer. The ReLU is there because a named layer's output is often pre-activation (SmallCNN's
    ``conv1`` is followed by a functional ReLU), and a linear head on the global average of a
    linear map of the input sees little more than the input's mean.

    Args:
        feature_shape: the layer's output shape without the batch dimension.
        num_classes: the model's classes.
        pool_size: output size of the average pool per spatial dimension.
        activation: ``relu`` or ``none``.
        seed: initialises the linear layer reproducibly.
    """

    def __init__(
        self,
        feature_shape: Sequence[int],
        num_classes: int,
        pool_size: int = 1,
        activation: str = "relu",
        seed: int = HEAD_SEED,
    ) -> None:
        super().__init__()
        shape = [int(s) for s in feature_shape]
        if not shape or len(shape) > 4:
            raise ValueError(
                f"an exit head takes [batch, features] or [batch, channels, *spatial] (1-3 spatial "
                f"dims); this layer outputs [batch, {', '.join(map(str, shape))}]."
            )
        self.feature_shape = shape
        self.num_classes = int(num_classes)
        self.pool_size = int(pool_size)
        self.activation = activation
        spatial = len(shape) - 1
        pools: dict[int, type[nn.Module]] = {
            1: nn.AdaptiveAvgPool1d,
            2: nn.AdaptiveAvgPool2d,
            3: nn.AdaptiveAvgPool3d,
        }
        self.pool = pools[spatial](self.pool_size) if spatial else nn.Identity()
        in_features = shape[0] * (self.pool_size**spatial if spatial else 1)
        self.linear = nn.Linear(in_features, self.num_classes)
        generator = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this head (plain types, for checkpoints)."""
        return {"feature_shape": list(self.feature_shape), "num_classes": self.num_classes}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_classes]``."""
        if self.activation == "relu":
            features = torch.relu(features)
        return self.linear(self.pool(features).flatten(1))


def joint_exit_loss(
    head_logits: Sequence[torch.Tensor], labels: torch.Tensor, weights: Sequence[float]
) -> torch.Tensor:
    """``sum_i weights[i] * cross_entropy(head_logits[i], labels)`` (batch means).

    The final exit's loss is the module's own task loss (weight 1), so this is what the early
    exits add to it: BranchyNet's weighted joint objective.
    """
    total = head_logits[0].new_zeros(())
    for logits, weight in zip(head_logits, weights, strict=True):
        if weight:
            total = total + weight * F.cross_entropy(logits, labels)
    return total


def batch_labels(batch: Any) -> torch.Tensor:
    """The labels of a batch: ``batch[1]`` of ``(inputs, labels)``, or a ``labels`` key.

    Raises:
        ValueError: no labels found; names the keys there are.
    """
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "targets", "target", "y"):
            if key in batch:
                return batch[key]
        raise ValueError(
            f"EarlyExit trains its heads on the batch's labels, but a batch with keys "
            f"{sorted(batch)} has none; use (inputs, labels) or one of labels/label/targets/y."
        )
    raise ValueError(
        f"EarlyExit trains its heads on the batch's labels; a {type(batch).__name__} batch has "
        "none. Use (inputs, labels) tuples."
    )


def exit_mask(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which inputs leave at an exit: confidence ``>= threshold``; none when the exit is off."""
    if threshold >= 1.0:
        return torch.zeros_like(confidence, dtype=torch.bool)
    return confidence >= threshold


def cascade(
    confidence: torch.Tensor,
    exit_correct: torch.Tensor,
    final_correct: torch.Tensor,
    thresholds: Sequence[float],
) -> tuple[float, list[float]]:
    """Accuracy of the cascade, and the share of inputs leaving at each exit (the final last).

    Args:
        confidence: ``[exits, inputs]`` max softmax probability of each early head.
        exit_correct: ``[exits, inputs]`` whether each early head's argmax is right.
        final_correct: ``[inputs]`` whether the full model's argmax is right.
        thresholds: one per early exit.
    """
    count = final_correct.numel()
    remaining = torch.ones(count, dtype=torch.bool)
    correct = 0
    fractions: list[float] = []
    for index, threshold in enumerate(thresholds):
        leaving = remaining & exit_mask(confidence[index], threshold)
        correct += int((exit_correct[index] & leaving).sum())
        fractions.append(int(leaving.sum()) / max(count, 1))
        remaining &= ~leaving
    correct += int((final_correct & remaining).sum())
    fractions.append(int(remaining.sum()) / max(count, 1))
    return correct / max(count, 1), fractions


def calibrate_thresholds(
    confidence: torch.Tensor,
    exit_correct: torch.Tensor,
    final_correct: torch.Tensor,
    max_accuracy_drop: float,
) -> list[float]:
    """Per-exit thresholds that keep the cascade within ``max_accuracy_drop`` of the full model.

    What counts against the budget are the inputs the full model gets right and an exit that
    takes them gets wrong; inputs where an exit is right and the full model wrong are not
    credited (such flukes do not carry over to new data, and crediting them let thresholds fit
    the calibration split too closely), so the cascade's accuracy on these inputs is at least the
    full model's minus ``max_accuracy_drop``. Greedy from the first exit, whose inputs save the
    most compute: each exit takes the lowest threshold (the most inputs) whose losses fit in what
    is left of the budget. An exit that cannot take any input within it gets 1.0 (off).

    Args:
        confidence: ``[exits, inputs]`` max softmax probability of each early head.
        exit_correct: ``[exits, inputs]`` whether each early head's argmax is right.
        final_correct: ``[inputs]`` whether the full model's argmax is right.
        max_accuracy_drop: allowed accuracy loss as a fraction (0.005 = half a point), in [0, 1].

    Returns:
        One threshold per early exit, each in (0, 1].
    """
    count = final_correct.numel()
    # Inputs the cascade may lose; a hair of slack for the float product.
    budget = math.floor(max_accuracy_drop * count + 1e-9)
    remaining = torch.ones(count, dtype=torch.bool)
    thresholds: list[float] = []
    for index in range(confidence.shape[0]):
        candidates = remaining.nonzero().flatten()
        conf = confidence[index, candidates].double()
        order = torch.argsort(conf, descending=True, stable=True)
        conf_sorted = conf[order]
        lost = (final_correct[candidates] & ~exit_correct[index, candidates])[order].long()
        # Taking the k most confident inputs here loses lost[:k].
        losses = torch.cat([lost.new_zeros(1), lost.cumsum(0)])
        sizes = torch.arange(len(conf_sorted) + 1)
        # A threshold can only fall between distinct confidences: k valid when k == n or
        # conf[k - 1] > conf[k].
        valid = torch.ones(len(sizes), dtype=torch.bool)
        if len(conf_sorted) > 1:
            valid[1:-1] = conf_sorted[:-1] > conf_sorted[1:]
        feasible = valid & (losses <= budget)
        best = int(sizes[feasible].max())
        threshold = float(conf_sorted[best - 1]) if best else 1.0
        if threshold >= 1.0:
            # None, or only inputs at probability exactly 1 (in float), would leave; 1.0 means
            # "off", so take none rather than pretend.
            thresholds.append(1.0)
            continue
        thresholds.append(threshold)
        budget -= int(losses[best])
        leaving = torch.zeros(count, dtype=torch.bool)
        leaving[candidates[order[:best]]] = True
        remaining &= ~leaving
    return thresholds


def _model_kind(model: nn.Module) -> str:
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return f"{type(model).__name__} around {type(inner).__name__}"
    return type(model).__name__


class _ExitTracer(fx.Tracer):
    """Traces through every module but the exits (and torch's own layers), kept as one call."""

    def __init__(self, exits: Sequence[str]) -> None:
        super().__init__()
        self.exits = set(exits)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.exits or super().is_leaf_module(
            m, module_qualified_name
        )


def trace_with_cuts(model: nn.Module, exits: Sequence[str]) -> fx.GraphModule:
    """``model`` traced by ``torch.fx``, returning ``(output, *exit layer outputs)``.

    The exits are traced as single calls (a whole block is one step). Each exit must be a module
    called exactly once in the forward, the exits in the order the
    forward calls them, and a clean cut: nothing computed before (or at) the exit but its output
    is used after it. That holds for ``nn.Sequential``-like backbones, SmallCNN, MLP, LeNet5 and,
    at whole blocks (``model.layer2``), torchvision's ResNets; it fails inside a residual block,
    whose input skips past the layer. Models ``torch.fx`` cannot trace (data-dependent control
    flow) are refused.

    Raises:
        SegmentError: the model cannot be traced, an exit is not called once, the exits are out of
            order, or a value other than the exit's output crosses the cut; names the model type
            and the exit.
    """
    kind = _model_kind(model)
    try:
        tracer = _ExitTracer(exits)
        traced = fx.GraphModule(model, tracer.trace(model), kind)
    except Exception as err:  # fx raises many types; all mean "not traceable"
        raise SegmentError(
            f"EarlyExit cannot cut {kind} into stages: torch.fx cannot trace its forward "
            f"({type(err).__name__}: {err}). Stages need a traceable forward without "
            "data-dependent control flow (nn.Sequential-like backbones, SmallCNN, MLP, LeNet5, "
            "torchvision ResNets)."
        ) from err
    graph = traced.graph
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    cuts: list[fx.Node] = []
    for name in exits:
        calls = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            called = [str(n.target) for n in nodes if n.op == "call_module"]
            raise SegmentError(
                f"`exits`: {name!r} is called {len(calls)} times in the forward of {kind}; an "
                f"exit must be a layer the forward calls once. Layers it calls: {called}."
            )
        cuts.append(calls[0])
    for before, after, name in zip(cuts, cuts[1:], exits[1:], strict=False):
        if position[after] <= position[before]:
            raise SegmentError(
                f"`exits`: {name!r} runs before the exit listed ahead of it in {kind}'s forward; "
                "list the exits in the order the forward runs them."
            )
    output = nodes[-1]
    if output.op != "output" or not isinstance(output.args[0], fx.Node):
        raise SegmentError(
            f"EarlyExit cannot cut {kind} into stages: its forward returns "
            f"{type(output.args[0]).__name__}, not one tensor of logits."
        )
    for cut, name in zip(cuts, exits, strict=True):
        where = position[cut]
        crossing = [
            node.name
            for node in nodes[: where + 1]
            if node is not cut
            and node.op != "get_attr"
            and any(position[user] > where for user in node.users)
        ]
        if crossing:
            raise SegmentError(
                f"`exits`: {kind} cannot be cut after {name!r}: besides its output, "
                f"{crossing} computed before it are used after it (a skip or residual "
                "connection?). Choose a layer whose output is all the rest of the forward uses, "
                "e.g. a whole residual block."
            )
    output.args = ((output.args[0], *cuts),)
    traced.recompile()
    return traced
