from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sparse.core.structure import (
    FACTORIZE,
    KINDS,
    REMOVE_CHANNELS,
    ParamChange,
    StructureError,
    applied_changes,
    apply_change,
    changes_in_checkpoint,
    count_macs,
    layer_costs,
    register_kind,
    remap_optimizer,
    replay,
    structure_state,
)


class Net(nn.Module):
    """conv - bn - depthwise conv - bn - flatten - linear - linear(head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.dw(torch.relu(self.bn(self.conv(x)))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


# Channels 1 and 4 of `conv` go everywhere they reach; then output 0 of `fc` (and `head`'s input 0).
FIRST = {
    "kind": REMOVE_CHANNELS,
    "layers": {
        "conv": {"out": [1, 4]},
        "bn": {"out": [1, 4]},
        "dw": {"out": [1, 4], "in": [1, 4]},
        "bn2": {"out": [1, 4]},
        "fc": {"in": [4, 5, 6, 7, 16, 17, 18, 19]},
    },
}
SECOND = {"kind": REMOVE_CHANNELS, "layers": {"fc": {"out": [0]}, "head": {"in": [0]}}}


def _changed() -> Net:
    torch.manual_seed(0)
    net = Net()
    apply_change(net, FIRST)
    apply_change(net, SECOND)
    return net


def test_remove_channels_cuts_every_named_layer() -> None:
    torch.manual_seed(0)
    original = Net()
    net = copy.deepcopy(original)
    apply_change(net, FIRST)
    assert net.conv.weight.shape == (4, 3, 3, 3)
    assert net.conv.out_channels == 4
    assert net.bn.running_mean.shape == (4,)
    assert net.bn.num_features == 4
    assert (net.dw.in_channels, net.dw.out_channels, net.dw.groups) == (4, 4, 4)
    assert net.fc.weight.shape == (5, 16)
    # the kept channels keep their values, in order
    kept = [0, 2, 3, 5]
    assert torch.equal(net.conv.weight, original.conv.weight[kept])
    assert torch.equal(net.dw.weight, original.dw.weight[kept])
    features = [i for i in range(24) if i not in FIRST["layers"]["fc"]["in"]]
    assert torch.equal(net.fc.weight, original.fc.weight[:, features])
    assert net(torch.zeros(2, 3, 2, 2)).shape == (2, 2)


def test_replay_rebuilds_the_architecture_and_the_weights_load_strictly() -> None:
    changed = _changed()
    fresh = Net()
    assert replay(fresh, applied_changes(changed)) == 2
    fresh.load_state_dict(changed.state_dict(), strict=True)
    x = torch.randn(3, 3, 2, 2)
    changed.eval()
    fresh.eval()
    assert torch.equal(fresh(x), changed(x))
    # state_dict keys are those of the plain model: nothing of the log in it
    assert list(fresh.state_dict()) == list(Net().state_dict())
    # replaying again is a no-op; a prefix is completed
    assert replay(fresh, applied_changes(changed)) == 0
    partial = Net()
    replay(partial, applied_changes(changed)[:1])
    assert replay(partial, applied_changes(changed)) == 1


def test_replay_refuses_a_model_changed_otherwise() -> None:
    other = Net()
    apply_change(other, SECOND)
    with pytest.raises(StructureError, match="not where the checkpoint's"):
        replay(other, applied_changes(_changed()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "merge_layers"}, "structure change 'merge_layers' is not known"),
        ({"kind": REMOVE_CHANNELS, "seq": 3, "layers": {}}, "has seq=3, but 0 changes"),
        ({"kind": REMOVE_CHANNELS, "layers": {"nope": {"out": [0]}}}, "layer 'nope'"),
        ({"kind": REMOVE_CHANNELS, "layers": {"conv": {"out": [6]}}}, "of 'conv', which has 6"),
        (
            {"kind": REMOVE_CHANNELS, "layers": {"head": {"out": [0, 1]}}},
            "would remove all 2 out channels of 'head'",
        ),
        ({"kind": REMOVE_CHANNELS, "layers": {"conv": {"side": [0]}}}, "unknown sides"),
    ],
)
def test_bad_changes_name_what_is_wrong(change: dict, message: str) -> None:
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(StructureError, match=message):
        apply_change(net, change)
    assert applied_changes(net) == []
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_grouped_and_transposed_convolutions_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.ConvTranspose2d(4, 4, 1))
    with pytest.raises(StructureError, match="grouped convolution"):
        apply_change(model, {"kind": REMOVE_CHANNELS, "layers": {"0": {"out": [0]}}})
    with pytest.raises(StructureError, match="transposed convolution"):
        apply_change(model, {"kind": REMOVE_CHANNELS, "layers": {"1": {"out": [0]}}})


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_the_optimizer_follows_and_keeps_the_kept_channels_state(optimizer_name: str) -> None:
    torch.manual_seed(0)
    net = Net()
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 3, 2, 2)).sum().backward()
    optimizer.step()
    old_weight = net.conv.weight
    old_state = {k: v.clone() for k, v in optimizer.state[old_weight].items()}
    replaced = apply_change(net, FIRST)
    # conv weight and bias, both norms' weight and bias, dw and fc weights (not the BN buffers)
    assert remap_optimizer(optimizer, replaced) == 8
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(net.conv.weight) in params
    assert id(old_weight) not in params
    assert {id(p) for p in net.parameters()} == params
    new_state = optimizer.state[net.conv.weight]
    for key, value in old_state.items():
        if value.shape == old_weight.shape:
            assert torch.equal(new_state[key], value[[0, 2, 3, 5]])
        else:
            assert torch.equal(new_state[key], value)  # Adam's step count
    # the next step moves the new parameters
    before = net.conv.weight.detach().clone()
    optimizer.zero_grad()
    net(torch.randn(4, 3, 2, 2)).sum().backward()
    optimizer.step()
    assert not torch.equal(net.conv.weight, before)


def test_the_checkpoint_log_is_gathered_from_module_and_callbacks() -> None:
    changes = applied_changes(_changed())
    checkpoint = {
        "structure": structure_state(changes),
        "callbacks": {
            "ChannelPruning": {"structure": structure_state(changes[1:])},
            "Other": {"masks": {}},
        },
    }
    assert changes_in_checkpoint(checkpoint) == changes
    only_callbacks = {"callbacks": {"A": {"structure": structure_state(changes)}}}
    assert changes_in_checkpoint(only_callbacks) == changes
    assert changes_in_checkpoint({"state_dict": {}}) == []
    gap = {"structure": structure_state(changes[1:])}
    with pytest.raises(StructureError, match="gaps"):
        changes_in_checkpoint(gap)
    conflict = {
        "structure": structure_state(changes),
        "callbacks": {"A": {"structure": structure_state([{**changes[0], "layers": {}}])}},
    }
    with pytest.raises(StructureError, match="two different structure changes with seq=0"):
        changes_in_checkpoint(conflict)
    newer = {"structure": {**structure_state(changes), "version": 99}}
    with pytest.raises(StructureError, match="version 99"):
        changes_in_checkpoint(newer)


def test_the_log_is_plain_data_a_weights_only_load_reads(tmp_path: Path) -> None:
    net = _changed()
    torch.save({"structure": structure_state(applied_changes(net))}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert changes_in_checkpoint(loaded) == applied_changes(net)


def test_macs_are_counted_per_sample_and_shrink_with_the_channels() -> None:
    net = Net()
    x = torch.zeros(3, 3, 2, 2)
    costs = layer_costs(net, x)
    assert costs["conv"].macs == 6 * 4 * 3 * 9
    assert costs["dw"].macs == 6 * 4 * 9
    assert costs["fc"].macs == 5 * 24
    assert count_macs(net, x) == sum(c.macs for c in costs.values())
    assert net.training  # the count leaves the training flag as it was
    changed = _changed()
    assert layer_costs(changed, x)["conv"].macs == 4 * 4 * 3 * 9
    assert count_macs(changed, x) < count_macs(net, x)


def test_a_registered_kind_replays_and_one_parameter_may_become_several() -> None:
    # How low-rank factorization plugs in: a kind of its own, one ParamChange per new parameter.
    def split(model: nn.Module, change: dict) -> list[ParamChange]:
        name = change["layer"]
        old = model.get_submodule(name)
        assert isinstance(old, nn.Linear)
        rank = int(change["rank"])
        new = nn.Sequential(
            nn.Linear(old.in_features, rank, bias=False), nn.Linear(rank, old.out_features)
        )
        model.register_module(name, new)
        first, second = new
        return [
            ParamChange(f"{name}.0.weight", old.weight, first.weight, {}),
            ParamChange(f"{name}.1.weight", old.weight, second.weight, {}),
            ParamChange(f"{name}.1.bias", old.bias, second.bias, {}),
        ]

    register_kind("split_test", split)
    try:
        torch.manual_seed(0)
        net = Net()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
        net(torch.randn(2, 3, 2, 2)).sum().backward()
        optimizer.step()
        replaced = apply_change(net, {"kind": "split_test", "layer": "fc", "rank": 2})
        assert remap_optimizer(optimizer, replaced) == 2
        in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in in_optimizer} == {id(p) for p in net.parameters()}
        assert net.fc[0].weight not in optimizer.state  # no state could follow
        fresh = Net()
        replay(fresh, applied_changes(net))
        fresh.load_state_dict(net.state_dict(), strict=True)
        assert isinstance(fresh.fc, nn.Sequential)
    finally:
        KINDS.pop("split_test")


def test_factorize_splits_layers_and_replay_rebuilds_their_shapes() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 2, 2)
    before = net.eval()(x)
    full = {"kind": FACTORIZE, "layers": {"conv": {"rank": 6}, "fc": {"rank": 5}}}
    changes = apply_change(net, full)
    # full rank reproduces the layers; the bias moved to the second factor with its state
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    assert [c.name for c in changes] == [
        "conv.0.weight",
        "conv.1.weight",
        "conv.1.bias",
        "fc.0.weight",
        "fc.1.weight",
        "fc.1.bias",
    ]
    assert [bool(c.keep) for c in changes] == [False, False, True] * 2
    fresh = Net()
    assert replay(fresh, applied_changes(net)) == 1
    fresh.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"fc": {"rank": 0}}, r"factorize of 'fc' has rank=0; .* \[1, 5\]"),
        ({"fc": {"rank": 6}}, r"rank=6"),
        ({"dw": {"rank": 2}}, r"'dw' \(Conv2d\), which is not a Linear or an ungrouped Conv2d"),
        ({"bn": {"rank": 2}}, r"'bn' \(BatchNorm2d\)"),
        ({"nope": {"rank": 2}}, r"names layer 'nope', which the model does not have"),
    ],
)
def test_bad_factorize_changes_name_the_layer(layers: dict, message: str) -> None:
    net = Net()
    with pytest.raises(StructureError, match=message):
        apply_change(net, {"kind": FACTORIZE, "layers": {"conv": {"rank": 2}, **layers}})
    assert isinstance(net.conv, nn.Conv2d)  # nothing applied
    assert applied_changes(net) == []
