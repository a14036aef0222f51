"""Layer kinds: the registry, and masks, QAT scales and Wanda norms laid out by it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sparse.callbacks.quantization import QuantizationAwareTraining
from lightning_sparse.core import layers
from lightning_sparse.core.criteria import criterion_scores
from lightning_sparse.core.fake_quant import QuantSpec, install
from lightning_sparse.core.layers import (
    Layout,
    kind_of,
    layer_kind,
    register_layer_kind,
    unknown_layer_weights,
)
from lightning_sparse.core.masks import compute_masks, parse_mask_type
from lightning_sparse.core.targets import (
    ALL_PRUNABLE,
    prunable_parameters,
    resolve_params,
    unknown_weights_note,
    weight_layouts,
)

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
Conv1D = pytorch_utils.Conv1D


class Gpt2Like(nn.Module):
    """Embedding, two Conv1D layers ([in, out] weights) and a Linear head, as in GPT-2."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.c_fc = Conv1D(16, 8)  # nf=16 outputs, nx=8 inputs: weight [8, 16]
        self.c_proj = Conv1D(8, 16)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        return self.head(self.c_proj(torch.relu(self.c_fc(x))))


class Bilinear(nn.Module):
    """A layer type nobody registered: a raw 2-D parameter used as x @ kernel."""

    def __init__(self, features: int = 8, out: int = 4) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(features, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in a test stay in that test."""
    monkeypatch.setattr(layers, "_KINDS", dict(layers._KINDS))


def test_built_in_kinds_and_layouts() -> None:
    assert layer_kind(nn.Linear).layout == Layout(1, 0)  # type: ignore[union-attr]
    assert layer_kind(nn.Conv2d).layout == Layout(1, 0)  # type: ignore[union-attr]
    conv1d = layer_kind(Conv1D)
    assert conv1d is not None
    assert conv1d.layout == Layout(0, 1)
    assert conv1d.all_prunable
    embedding = layer_kind(nn.Embedding)
    assert embedding is not None
    assert not embedding.all_prunable
    assert not embedding.quantizable
    assert layer_kind(nn.LayerNorm) is None
    # a subclass inherits its base's kind
    assert layer_kind(type("MyLinear", (nn.Linear,), {})) == layer_kind(nn.Linear)


def test_all_prunable_takes_conv1d_and_leaves_embeddings_to_names() -> None:
    model = Gpt2Like()
    assert list(resolve_params(model, ALL_PRUNABLE)) == [
        "c_fc.weight",
        "c_proj.weight",
        "head.weight",
    ]
    assert list(resolve_params(model, "re:wte")) == ["wte.weight"]
    assert weight_layouts(model) == {
        "wte.weight": Layout(0, 1),
        "c_fc.weight": Layout(0, 1),
        "c_proj.weight": Layout(0, 1),
        "head.weight": Layout(1, 0),
    }
    assert unknown_layer_weights(model) == {}
    assert unknown_weights_note(model) is None


def test_unknown_types_are_reported_and_named_in_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 8), Bilinear())
    assert unknown_layer_weights(model) == {"1.kernel": f"{__name__}.Bilinear"}
    note = unknown_weights_note(model)
    assert note is not None
    assert "1.kernel" in note
    assert "register_layer_kind" in note
    assert list(prunable_parameters(model)) == ["0.weight"]
    with pytest.raises(ValueError, match=r"matches only weights of layer types") as err:
        resolve_params(model, "re:1\\.")
    assert f"{__name__}.Bilinear" in str(err.value)
    assert "register_layer_kind" in str(err.value)
    with pytest.raises(ValueError, match="matches no prunable weight"):
        resolve_params(model, "re:nothing")


@pytest.mark.usefixtures("registry")
def test_a_registered_type_is_pruned_and_quantized_along_its_layout() -> None:
    register_layer_kind(Bilinear, weight="kernel", input_dim=0, output_dim=1)
    model = nn.Sequential(nn.Linear(4, 8), Bilinear())
    assert list(resolve_params(model, ALL_PRUNABLE)) == ["0.weight", "1.kernel"]
    assert unknown_layer_weights(model) == {}
    handle = install(model, ["1"], QuantSpec())
    handle.set_phase(fake_quant=True, observe=True)
    model.train()
    out = model(torch.randn(5, 4))
    assert out.shape == (5, 4)
    assert handle.layers["1"].weight_scale.shape == (4,)  # one per output column


@pytest.mark.usefixtures("registry")
def test_qat_names_a_registered_kinds_weight_by_its_own_name() -> None:
    register_layer_kind(Bilinear, weight="kernel", input_dim=0, output_dim=1)
    model = nn.Sequential(nn.Linear(4, 8), Bilinear())
    qat = QuantizationAwareTraining(start_epoch=0.0)
    assert list(qat.resolve_targets(model)) == ["0.weight", "1.kernel"]
    qat._quantized = install(model, ["0", "1"], QuantSpec())
    assert qat.target_names == ["0.weight", "1.kernel"]


@pytest.mark.usefixtures("registry")
def test_registration_is_validated() -> None:
    with pytest.raises(ValueError, match="`input_dim` and `output_dim` are both 0"):
        register_layer_kind(Bilinear, input_dim=0, output_dim=0)
    with pytest.raises(ValueError, match="`output_dim`=-1"):
        register_layer_kind(Bilinear, output_dim=-1)
    # by dotted name, without importing the type
    register_layer_kind(f"{__name__}.Bilinear", weight="kernel", input_dim=0, output_dim=1)
    assert kind_of(Bilinear()) is not None


def test_two_of_four_runs_along_conv1d_inputs() -> None:
    model = Gpt2Like()
    weight = model.c_fc.weight.detach()  # [in=8, out=16]
    masks = compute_masks({"w": weight}, 0.5, parse_mask_type("2:4"), layouts={"w": Layout(0, 1)})
    # every output column keeps exactly 2 of each 4 consecutive inputs
    groups = masks["w"].reshape(2, 4, 16).sum(dim=1)
    assert bool((groups == 2).all())
    # the same weight as a Linear ([out, in]) gets the transposed mask
    linear = compute_masks({"w": weight.t().contiguous()}, 0.5, parse_mask_type("2:4"))
    assert torch.equal(linear["w"].t(), masks["w"])


def test_channel_masks_remove_conv1d_output_columns() -> None:
    weight = torch.randn(8, 16)
    masks = compute_masks(
        {"w": weight}, 0.25, parse_mask_type("channel"), layouts={"w": Layout(0, 1)}
    )
    kept_columns = masks["w"].all(dim=0)
    assert int((~masks["w"]).any(dim=0).sum()) == 4
    assert int(kept_columns.sum()) == 12


def test_a_conv1d_with_inputs_not_divisible_by_m_is_refused() -> None:
    with pytest.raises(ValueError, match="input dimension 6"):
        compute_masks(
            {"w": torch.randn(6, 8)}, 0.5, parse_mask_type("2:4"), layouts={"w": Layout(0, 1)}
        )


def test_qat_on_conv1d_has_per_output_column_scales_and_matches_linear() -> None:
    torch.manual_seed(0)
    conv1d = Conv1D(6, 8)
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    q1 = install(nn.Sequential(conv1d), ["0"], QuantSpec())
    q2 = install(nn.Sequential(linear), ["0"], QuantSpec())
    x = torch.randn(4, 5, 8)
    outputs = []
    for handle, layer in ((q1, conv1d), (q2, linear)):
        handle.set_phase(fake_quant=True, observe=True)
        layer.train()
        outputs.append(layer(x))
        assert handle.layers["0"].weight_scale.shape == (6,)
    assert torch.allclose(q1.layers["0"].weight_scale, q2.layers["0"].weight_scale)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.equal(q1.layers["0"].integer_weight().t(), q2.layers["0"].integer_weight())


def test_wanda_norms_follow_the_conv1d_input_dimension() -> None:
    torch.manual_seed(0)
    model = Gpt2Like()
    batches = [torch.randint(0, 20, (4, 6)) for _ in range(3)]
    scores = criterion_scores(model, {"c_fc.weight": model.c_fc.weight}, "wanda", batches)
    ratio = scores["c_fc.weight"] / model.c_fc.weight.detach().abs()
    # one input norm per row (input feature), equal across the output columns
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    with pytest.raises(ValueError, match=r"`wte.weight` \(torch.nn.modules.sparse.Embedding\)"):
        criterion_scores(model, {"wte.weight": model.wte.weight}, "wanda", batches)
