from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_sparse.core.channels import (
    ChannelGroup,
    Member,
    change_for,
    channel_scores,
    comparable_scores,
    dense_widths,
    global_keep_counts,
    global_order,
    keep_counts,
    plan_removal,
    predict_macs,
)
from lightning_sparse.core.pruning_backend import channel_groups
from lightning_sparse.core.structure import apply_change, count_macs, layer_costs
from lightning_sparse.models import resnet18
from tests.helpers import TinyNet


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def _groups(model: nn.Module, example: torch.Tensor, keep: list[str]) -> dict[str, ChannelGroup]:
    return {g.root: g for g in channel_groups(copy.deepcopy(model).eval(), example, keep)}


def test_coupled_layers_form_one_group_and_the_head_none() -> None:
    model = TinyNet(width=8)
    groups = _groups(model, torch.zeros(1, 4, 4, 4), ["fc2"])
    assert set(groups) == {"conv1", "fc1"}
    conv = {(m.layer, m.side): m for m in groups["conv1"].members}
    assert set(conv) == {("conv1", "out"), ("fc1", "in")}
    # a channel of conv1 is 16 inputs of fc1 after the flatten
    assert len(conv[("fc1", "in")].idxs) == 8 * 16
    assert conv[("fc1", "in")].root_idxs[:17] == (0,) * 16 + (1,)
    assert {(m.layer, m.side) for m in groups["fc1"].members} == {("fc1", "out"), ("fc2", "in")}


def test_a_resnet_stage_shares_its_channels_with_the_stem_and_the_shortcut() -> None:
    model = resnet18(num_classes=3, in_channels=3)
    groups = _groups(model, torch.zeros(1, 3, 8, 8), ["fc"])
    stem = {(m.layer, m.side) for m in groups["conv1"].members}
    assert {
        ("conv1", "out"),
        ("bn1", "out"),
        ("layer1.0.bn2", "out"),
        ("layer1.1.bn2", "out"),
    } <= stem
    assert ("layer1.0.conv2", "out") in stem
    assert ("layer2.0.downsample.0", "in") in stem
    assert ("layer1.1.conv1", "in") in stem
    # inside a block, conv1's channels reach only bn1 and conv2's inputs
    inner = {(m.layer, m.side) for m in groups["layer1.0.conv1"].members}
    assert inner == {
        ("layer1.0.conv1", "out"),
        ("layer1.0.bn1", "out"),
        ("layer1.0.conv2", "in"),
    }
    assert "fc" not in groups
    # 1 stem group + 8 inner block groups + 3 stage groups (layer2..4 with their shortcuts)
    assert len(groups) == 12


def test_a_layer_left_out_takes_its_whole_group_with_it() -> None:
    model = resnet18(num_classes=3, in_channels=3)
    groups = _groups(model, torch.zeros(1, 3, 8, 8), ["fc", "layer1.0.conv2"])
    assert "conv1" not in groups  # layer1.0.conv2's outputs are the stem group's
    assert "layer1.0.conv1" in groups


def test_l1_bn_scale_and_taylor_rank_the_channels() -> None:
    model = ConvBN()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([1.0, 0.1, 2.0, 3.0]).reshape(4, 1, 1, 1))
        model.bn.weight.copy_(torch.tensor([0.5, 4.0, 0.1, 1.0]))
        model.head.weight.zero_()
    group = _groups(model, torch.zeros(1, 2, 2, 2), ["head"])["conv"]
    l1 = channel_scores(model, group, "l1")
    assert torch.sort(l1).indices.tolist() == [1, 0, 2, 3]
    assert torch.sort(channel_scores(model, group, "l2")).indices.tolist() == [1, 0, 2, 3]
    assert torch.sort(channel_scores(model, group, "bn_scale")).indices.tolist() == [2, 0, 3, 1]
    taylor = {
        "conv.weight": torch.tensor([5.0, 1.0, 0.5, 2.0]).reshape(4, 1, 1, 1).expand(4, 2, 1, 1)
    }
    assert torch.sort(channel_scores(model, group, "taylor", taylor)).indices.tolist() == [
        2,
        1,
        3,
        0,
    ]
    # without accumulated scores taylor falls back to l1
    assert torch.equal(channel_scores(model, group, "taylor", {}), l1)


def test_keep_counts_round_up_and_never_grow() -> None:
    group = ChannelGroup("a", 10, (Member("a", "out", tuple(range(10)), tuple(range(10))),))
    small = ChannelGroup("b", 3, (Member("b", "out", (0, 1, 2), (0, 1, 2)),))
    dense = {"a": 10, "b": 8}  # b already lost 5 channels
    assert keep_counts([group, small], dense, 0.25) == {"a": 8, "b": 3}
    assert keep_counts([group, small], dense, 0.75, round_to=4) == {"a": 4, "b": 3}
    assert keep_counts([group], dense, 0.999) == {"a": 1}
    history = [{"kind": "remove_channels", "layers": {"b": {"out": [0, 1, 2, 3, 4]}}}]
    assert dense_widths([group, small], history) == {"a": 10, "b": 8}


@pytest.mark.parametrize("model_name", ["tiny", "resnet18"])
def test_predicted_macs_are_the_measured_macs_after_the_change(model_name: str) -> None:
    torch.manual_seed(0)
    if model_name == "tiny":
        model: nn.Module = TinyNet(width=8)
        example, head = torch.randn(1, 4, 4, 4), "fc2"
    else:
        model, example, head = resnet18(num_classes=3, in_channels=3), torch.randn(1, 3, 8, 8), "fc"
    model.eval()
    groups = list(_groups(model, example, [head]).values())
    dense = count_macs(model, example)
    for sparsity in (0.3, 0.6):
        plan = plan_removal(
            model,
            example,
            groups,
            sparsity=sparsity,
            target="macs",
            importance="l1",
            dense_macs=dense,
        )
        changed = copy.deepcopy(model)
        apply_change(changed, plan.change)
        measured = count_macs(changed, example)
        assert measured == pytest.approx(plan.macs_after, rel=1e-9)
        assert measured <= (1 - sparsity) * dense
        assert plan.reached
        # the smallest uniform ratio: a little less removal would miss the target
        looser = keep_counts(groups, dense_widths(groups, []), plan.ratio - 0.02)
        assert predict_macs(layer_costs(model, example), groups, looser) > (1 - sparsity) * dense
        assert changed(example).shape[1] == model(example).shape[1]


def test_later_updates_are_nested_and_reach_the_channel_target() -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=3, in_channels=3).eval()
    example = torch.randn(1, 3, 8, 8)
    dense = count_macs(model, example)
    history: list[dict] = []
    dense_channels = None
    for sparsity in (0.25, 0.5):
        groups = list(_groups(model, example, ["fc"]).values())
        plan = plan_removal(
            model,
            example,
            groups,
            sparsity=sparsity,
            target="channels",
            importance="l1",
            dense_macs=dense,
            history=history,
        )
        dense_channels = dense_channels or plan.channels_dense
        assert plan.channels_dense == dense_channels  # widths are measured against the dense model
        assert plan.channels_after <= (1 - sparsity) * dense_channels
        apply_change(model, plan.change)
        history.append({**plan.change, "seq": len(history)})
    assert model.conv1.out_channels == 32  # 64 -> 48 -> 32: half of every group's channels


def test_change_for_maps_root_channels_to_every_member() -> None:
    group = ChannelGroup(
        "conv",
        2,
        (
            Member("conv", "out", (0, 1), (0, 1)),
            Member("fc", "in", (0, 1, 2, 3), (0, 0, 1, 1)),
        ),
    )
    change = change_for([group], {"conv": [1]})
    assert change == {
        "kind": "remove_channels",
        "layers": {"conv": {"out": [1]}, "fc": {"in": [2, 3]}},
    }


class ConvBNConv(nn.Module):
    """conv1 (BatchNorm) -> conv2 (no BatchNorm) -> head: one group of each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.bn(self.conv1(x))).mean(dim=(2, 3)))


def _scaled_resnet(small: str = "layer3") -> nn.Module:
    """ResNet-18 whose BatchNorm scales are in [0.5, 1], a tenth of that in ``small``."""
    torch.manual_seed(0)
    model = resnet18(num_classes=3, in_channels=3).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.0)
                if name.startswith(small):
                    module.weight.mul_(0.1)
    return model


def test_comparable_scores_put_every_group_on_one_scale() -> None:
    model = ConvBNConv()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 6.0]).reshape(4, 1, 1, 1))
        model.bn.weight.copy_(torch.tensor([0.2, 0.4, 0.6, 0.8]))
        model.conv2.weight.copy_(torch.diag(torch.tensor([1.0, 3.0, 4.0, 4.0])).reshape(4, 4, 1, 1))
        model.head.weight.zero_()
    groups = list(_groups(model, torch.zeros(1, 2, 2, 2), ["head"]).values())
    assert {g.root for g in groups} == {"conv1", "conv2"}
    l1 = comparable_scores(model, groups, "l1")
    for group in groups:  # a share of the group's mean
        assert float(l1[group.root].mean()) == pytest.approx(1.0)
    bn = comparable_scores(model, groups, "bn_scale")
    # |gamma| as it is; conv2 has no BatchNorm: its l1 share times the mean |gamma| (0.5)
    assert bn["conv1"].tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert bn["conv2"].tolist() == pytest.approx([0.5 * v / 3.0 for v in (1.0, 3.0, 4.0, 4.0)])
    # a residual group: the mean over its BatchNorms, not their sum
    resnet = _scaled_resnet()
    stem = _groups(resnet, torch.zeros(1, 3, 8, 8), ["fc"])["conv1"]
    summed = channel_scores(resnet, stem, "bn_scale")
    assert torch.allclose(comparable_scores(resnet, [stem], "bn_scale")["conv1"], summed / 3)


def test_global_allocation_removes_the_small_scales_wherever_they_are() -> None:
    model = _scaled_resnet("layer3")
    example = torch.randn(1, 3, 8, 8)
    groups = list(_groups(model, example, ["fc"]).values())
    dense = count_macs(model, example)
    common = {"sparsity": 0.5, "target": "macs", "importance": "bn_scale", "dense_macs": dense}
    uniform = plan_removal(model, example, groups, **common)
    plan = plan_removal(model, example, groups, allocation="global", **common)
    assert plan.reached
    changed = copy.deepcopy(model)
    apply_change(changed, plan.change)
    measured = count_macs(changed, example)
    assert measured == pytest.approx(plan.macs_after, rel=1e-9)
    assert measured <= 0.5 * dense
    widths = {g.root: g.channels for g in groups}
    # layer3's scales are a tenth of the others': its groups go down to the floor (10% of 256)
    assert plan.keep["layer3.0.conv1"] == plan.keep["layer3.1.conv1"] == 26
    assert plan.keep["layer3.0.downsample.0"] == 26
    # ... and the other layers keep more than the uniform share
    assert plan.keep["layer4.0.conv1"] > uniform.keep["layer4.0.conv1"]
    assert plan.keep["layer2.0.conv1"] > uniform.keep["layer2.0.conv1"]
    shares = [uniform.keep[r] / widths[r] for r in widths]
    assert max(shares) - min(shares) < 0.02  # uniform: one share, rounded up per group
    # the fewest channels that reach the goal: one channel fewer removed misses it
    scores = comparable_scores(model, groups, "bn_scale")
    order = global_order(groups, widths, scores, 0.9)
    removed = sum(widths.values()) - plan.channels_after
    costs = layer_costs(model, example)
    fewer = global_keep_counts(groups, order, removed - 1)
    assert predict_macs(costs, groups, fewer) > 0.5 * dense
    # the channels removed are each group's smallest |gamma|
    gamma = model.layer2[0].bn1.weight.detach()
    gone = plan.change["layers"]["layer2.0.conv1"]["out"]
    kept = sorted(set(range(128)) - set(gone))
    assert not gone or gamma[gone].max() <= gamma[kept].min()


def test_global_allocation_with_equal_scores_removes_one_channel_at_a_time() -> None:
    # an untrained model's |gamma| are all 1: a threshold would take every channel above the
    # floors at once; the order still stops at the target
    model = resnet18(num_classes=3, in_channels=3).eval()
    example = torch.randn(1, 3, 8, 8)
    groups = list(_groups(model, example, ["fc"]).values())
    dense = count_macs(model, example)
    plan = plan_removal(
        model,
        example,
        groups,
        sparsity=0.3,
        target="macs",
        importance="bn_scale",
        dense_macs=dense,
        allocation="global",
    )
    assert plan.reached
    assert 0.65 * dense < plan.macs_after <= 0.7 * dense


def test_no_group_loses_more_than_max_group_sparsity() -> None:
    model = _scaled_resnet("layer4")
    example = torch.randn(1, 3, 8, 8)
    groups = list(_groups(model, example, ["fc"]).values())
    dense = count_macs(model, example)
    widths = {g.root: g.channels for g in groups}
    plan = plan_removal(
        model,
        example,
        groups,
        sparsity=0.95,
        target="macs",
        importance="bn_scale",
        dense_macs=dense,
        allocation="global",
        max_group_sparsity=0.5,
    )
    # keeping half of every group leaves ~25% of the MACs: the target is out of reach
    assert not plan.reached
    assert plan.keep == {root: width // 2 for root, width in widths.items()}


def test_global_updates_are_nested_and_floors_are_of_the_dense_width() -> None:
    model = _scaled_resnet("layer2")
    example = torch.randn(1, 3, 8, 8)
    dense = count_macs(model, example)
    history: list[dict] = []
    for sparsity in (0.3, 0.6):
        groups = list(_groups(model, example, ["fc"]).values())
        plan = plan_removal(
            model,
            example,
            groups,
            sparsity=sparsity,
            target="macs",
            importance="bn_scale",
            dense_macs=dense,
            history=history,
            allocation="global",
            max_group_sparsity=0.75,
        )
        assert plan.reached
        apply_change(model, plan.change)
        history.append({**plan.change, "seq": len(history)})
        assert count_macs(model, example) <= (1 - sparsity) * dense
    # layer2 (128 wide) went to its floor, a quarter of its dense width, not of its width now
    assert model.layer2[0].conv1.out_channels == 32
    assert model.layer2[1].conv1.out_channels == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allocation": "best"}, r"`allocation`='best' is not allowed; choose one of"),
        ({"max_group_sparsity": 1.0}, r"`max_group_sparsity`=1.0 is not allowed"),
    ],
)
def test_plan_removal_refuses_an_unknown_allocation(kwargs: dict, message: str) -> None:
    model = TinyNet(width=8)
    example = torch.zeros(1, 4, 4, 4)
    groups = list(_groups(model, example, ["fc2"]).values())
    with pytest.raises(ValueError, match=message):
        plan_removal(
            model,
            example,
            groups,
            sparsity=0.5,
            target="macs",
            importance="l1",
            dense_macs=count_macs(model, example),
            **kwargs,
        )
