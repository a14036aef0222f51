from __future__ import annotations

import pytest
import torch

from lightning_sparse.core.batch import batch_size, model_inputs, to_device

X = torch.ones(4, 3)
Y = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "batch",
    [X, (X, Y), [X, Y, "extra"], {"image": X, "label": Y}, {"x": X, "y": Y}],
    ids=["tensor", "tuple", "list", "image-dict", "x-dict"],
)
def test_the_model_input_of_every_batch_form(batch: object) -> None:
    assert model_inputs(batch) is X
    assert batch_size(batch) == 4


def test_named_inputs_are_everything_but_the_labels() -> None:
    ids = torch.ones(2, 5, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "labels": Y[:2]}
    inputs = model_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].dtype == torch.long  # token ids stay integers
    assert batch_size(batch) == 2


def test_a_batch_of_labels_only_is_refused_naming_its_keys() -> None:
    with pytest.raises(ValueError, match=r"keys \['label'\] holds no model input"):
        model_inputs({"label": Y})


def test_to_device_keeps_the_structure() -> None:
    moved = to_device({"a": [X, (X,)], "b": 3}, torch.device("cpu"))
    assert isinstance(moved["a"], list)
    assert isinstance(moved["a"][1], tuple)
    assert moved["b"] == 3
