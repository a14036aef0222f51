"""The token classification task: batches, labels, padding, determinism, validation."""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.data import SyntheticTextDataModule


def _first_batch(**kwargs: object) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    data = SyntheticTextDataModule(train_size=64, val_size=16, test_size=16, **kwargs)  # type: ignore[arg-type]
    data.setup()
    inputs, labels = next(iter(data.test_dataloader()))
    return inputs, labels


def test_batches_are_int64_dicts_with_padding_marked() -> None:
    inputs, labels = _first_batch(seq_length=12, min_length=4)
    assert set(inputs) == {"input_ids", "attention_mask"}
    for tensor in (*inputs.values(), labels):
        assert tensor.dtype == torch.int64
        assert tensor.shape == (16, 12)
    padding = inputs["attention_mask"] == 0
    assert bool(padding.any())
    assert bool((inputs["input_ids"][padding] == 0).all())
    assert bool((labels[padding] == -100).all())
    assert bool((labels[~padding] >= 0).all())
    assert bool((inputs["attention_mask"].sum(dim=1) >= 4).all())


def test_labels_follow_the_token_and_its_predecessor() -> None:
    data = SyntheticTextDataModule(num_classes=3, vocab_size=20, train_size=256, min_length=16)
    data.setup()
    assert data.train_set is not None
    inputs, labels = data.train_set[0]
    ids = inputs["input_ids"]
    # one group per token, recovered from position 0 of many samples (label = group there)
    groups: dict[int, int] = {}
    for index in range(256):
        sample, sample_labels = data.train_set[index]
        groups[int(sample["input_ids"][0])] = int(sample_labels[0])
    for t in range(1, 16):
        expected = (groups[int(ids[t])] + groups[int(ids[t - 1])]) % 3
        assert int(labels[t]) == expected


def test_the_data_depend_on_data_seed_only() -> None:
    a, _ = _first_batch(seed=1)
    b, _ = _first_batch(seed=2)
    c, _ = _first_batch(data_seed=5)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 4, "num_classes": 4}, "`vocab_size`=4"),
        ({"seq_length": 8, "min_length": 9}, "`min_length`=9"),
        ({"context": 16}, "`context`=16"),
        ({"input_shape": [8]}, "`input_shape`=\\[8\\]"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticTextDataModule(**kwargs)  # type: ignore[arg-type]
