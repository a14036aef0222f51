"""Hugging Face backbones from configs: names, layouts, checkpoints, save_pretrained folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_sparse.core.layers import Layout
from lightning_sparse.core.targets import ALL_PRUNABLE, resolve_params, weight_layouts
from lightning_sparse.models.transformers import bert_tiny, gpt2_tiny
from lightning_sparse.module import ClassificationModule

pytest.importorskip("transformers")

INPUTS = {
    "input_ids": torch.randint(1, 50, (2, 10)),
    "attention_mask": torch.ones(2, 10, dtype=torch.int64),
}


@pytest.mark.parametrize("build", [bert_tiny, gpt2_tiny])
@pytest.mark.parametrize(("task", "shape"), [("token", (2, 10, 3)), ("sequence", (2, 3))])
def test_logits_per_token_or_per_sequence(build: object, task: str, shape: tuple[int, ...]) -> None:
    module = ClassificationModule(build(num_classes=3, vocab_size=50, task=task), num_classes=3)  # type: ignore[operator]
    assert module(INPUTS).shape == shape
    assert module(INPUTS["input_ids"]).shape == shape  # ids alone, positionally


def test_gpt2_projections_are_conv1d_laid_out_in_out() -> None:
    module = ClassificationModule(gpt2_tiny(num_classes=3, hidden_size=32), num_classes=3)
    names = list(resolve_params(module, ALL_PRUNABLE))
    assert len(names) == 9
    layouts = weight_layouts(module, names)
    assert layouts["model.transformer.h.0.mlp.c_fc.weight"] == Layout(0, 1)
    assert layouts["model.classifier.weight"] == Layout(1, 0)
    assert module.head_name == "classifier"


def test_bert_prunes_its_linears_and_leaves_embeddings_to_names() -> None:
    module = ClassificationModule(bert_tiny(num_classes=3), num_classes=3)
    names = list(resolve_params(module, ALL_PRUNABLE))
    assert len(names) == 13  # 6 per encoder layer and the head
    assert not any("embeddings" in name for name in names)
    assert resolve_params(module, "re:model\\.bert\\.embeddings\\.word")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "qa"}, "`task`='qa'"),
        ({"hidden_size": 30, "num_heads": 4}, "not divisible by `num_heads`=4"),
        ({"num_layers": 0}, "`num_layers`=0"),
    ],
)
def test_bad_sizes_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bert_tiny(num_classes=3, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("build", [bert_tiny, gpt2_tiny])
def test_init_from_a_save_pretrained_folder(build: object, tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = build(num_classes=3, hidden_size=32)  # type: ignore[operator]
    saved.save_pretrained(tmp_path / "hf")
    torch.manual_seed(1)
    module = ClassificationModule(
        build(num_classes=3, hidden_size=32),  # type: ignore[operator]
        num_classes=3,
        init_from=str(tmp_path / "hf"),
    )
    for name, value in saved.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], value), name
    # another class count: the head is swapped, everything else loads
    torch.manual_seed(1)
    five = ClassificationModule(
        build(num_classes=5, hidden_size=32),  # type: ignore[operator]
        num_classes=5,
        init_from=str(tmp_path / "hf"),
    )
    assert five.model.classifier.out_features == 5


def test_a_checkpoint_loads_weights_only_into_a_fresh_model_strictly(tmp_path: Path) -> None:
    module = ClassificationModule(gpt2_tiny(num_classes=3, hidden_size=32), num_classes=3)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    fresh = ClassificationModule(gpt2_tiny(num_classes=3, hidden_size=32), num_classes=3)
    fresh.load_state_dict(state, strict=True)
