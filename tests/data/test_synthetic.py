from __future__ import annotations

import pytest
import torch

from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.data.resumable import ResumableSampler


def test_shapes_sizes_and_classes() -> None:
    datamodule = SyntheticDataModule(
        num_classes=4, input_shape=(3, 6, 6), train_size=40, val_size=12, test_size=8
    )
    datamodule.setup()
    assert datamodule.num_classes == 4
    assert datamodule.input_shape == (3, 6, 6)
    sets = (datamodule.train_set, datamodule.val_set, datamodule.test_set)
    assert [len(s) for s in sets if s is not None] == [40, 12, 8]
    assert datamodule.train_set is not None
    inputs, labels = datamodule.train_set.tensors
    assert inputs.shape == (40, 3, 6, 6)
    assert inputs.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert int(labels.max()) < 4


def test_data_depend_on_data_seed_only() -> None:
    def train_inputs(**kwargs: int) -> torch.Tensor:
        datamodule = SyntheticDataModule(train_size=16, **kwargs)
        datamodule.setup()
        assert datamodule.train_set is not None
        return datamodule.train_set.tensors[0]

    assert torch.equal(train_inputs(seed=0), train_inputs(seed=5))
    assert not torch.equal(train_inputs(data_seed=0), train_inputs(data_seed=1))


def test_building_data_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    SyntheticDataModule().setup()
    assert torch.equal(torch.rand(3), expected)


def test_train_loader_uses_resumable_sampler_and_keeps_last_batch() -> None:
    datamodule = SyntheticDataModule(train_size=70, batch_size=32)
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler)
    assert [len(y) for _, y in loader] == [32, 32, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "`num_classes`=1"),
        ({"input_shape": (0, 8)}, "`input_shape`"),
        ({"train_size": 0}, "`train_size`=0"),
        ({"test_size": 0}, "`test_size`=0"),
        ({"noise": -1.0}, "`noise`=-1.0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticDataModule(**kwargs)
