from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_sparse.data import DigitsDataModule
from lightning_sparse.data.resumable import ResumableSampler


def _labels(split: torch.utils.data.TensorDataset) -> np.ndarray:
    return split.tensors[1].numpy()


def test_shapes_dtypes_and_scale() -> None:
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    assert datamodule.num_classes == 10
    assert datamodule.input_shape == (1, 8, 8)
    assert datamodule.train_set is not None
    inputs, labels = datamodule.train_set.tensors
    assert inputs.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert inputs.shape[1:] == (1, 8, 8)
    assert inputs.min() >= 0.0
    assert inputs.max() <= 1.0
    assert set(labels.tolist()) == set(range(10))


def test_split_sizes_stratified_and_disjoint() -> None:
    datamodule = DigitsDataModule(val_fraction=0.1, test_fraction=0.2)
    datamodule.setup()
    splits = [datamodule.train_set, datamodule.val_set, datamodule.test_set]
    sizes = [len(s) for s in splits if s is not None]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(0.2 * 1797, abs=1)
    assert sizes[1] == pytest.approx(0.1 * 1797, abs=1)
    # Stratified: every split has each class in about the data set's proportion (~10%).
    for split in splits:
        assert split is not None
        shares = np.bincount(_labels(split), minlength=10) / len(split)
        assert np.all(np.abs(shares - 0.1) < 0.02)
    # A partition: together the splits hold every image of the data set exactly once.
    everything = torch.cat([s.tensors[0] for s in splits if s is not None]).flatten(1)
    full = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).flatten(1)
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, full.tolist()))


def test_split_is_fixed_by_split_seed_not_by_run_seed() -> None:
    def test_inputs(**kwargs: int) -> torch.Tensor:
        datamodule = DigitsDataModule(**kwargs)
        datamodule.setup()
        assert datamodule.test_set is not None
        return datamodule.test_set.tensors[0]

    base = test_inputs(seed=0, split_seed=0)
    assert torch.equal(base, test_inputs(seed=7, split_seed=0))
    assert not torch.equal(base, test_inputs(seed=0, split_seed=1))


def test_loaders_resumable_train_and_ordered_eval_without_drop_last() -> None:
    datamodule = DigitsDataModule(batch_size=100)
    datamodule.setup()
    train = datamodule.train_dataloader()
    assert isinstance(train.sampler, ResumableSampler)
    assert train.sampler.shuffle
    assert train.sampler.seed == 0
    assert not train.drop_last
    assert sum(len(labels) for _, labels in train) == len(datamodule.train_set or [])
    test = datamodule.test_dataloader()
    assert not test.drop_last
    seen = torch.cat([labels for _, labels in test])
    assert datamodule.test_set is not None
    assert torch.equal(seen, datamodule.test_set.tensors[1])  # unshuffled


def test_train_order_depends_on_run_seed() -> None:
    def first_batch(seed: int) -> torch.Tensor:
        datamodule = DigitsDataModule(seed=seed)
        return next(iter(datamodule.train_dataloader()))[1]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_fewer_classes() -> None:
    datamodule = DigitsDataModule(num_classes=3)
    datamodule.setup()
    assert datamodule.train_set is not None
    assert set(_labels(datamodule.train_set).tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "`val_fraction`=0.0"),
        ({"test_fraction": 1.0}, "`test_fraction`=1.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training data"),
        ({"input_shape": (1, 28, 28)}, "`input_shape`=[1, 28, 28]"),
        ({"num_classes": 11}, "`num_classes`=11"),
        ({"batch_size": 0}, "`batch_size`=0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DigitsDataModule(**kwargs)


def test_max_shift_is_a_pure_function_of_seed_epoch_and_sample() -> None:
    def epoch_batches(seed: int, epoch: int, skip: int = 0) -> list[torch.Tensor]:
        datamodule = DigitsDataModule(batch_size=100, seed=seed, max_shift=1)
        loader = datamodule.train_dataloader()
        assert isinstance(loader.sampler, ResumableSampler)
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_once(skip * 100)  # what a mid-epoch resume does
        return [inputs for inputs, _ in loader]

    full = epoch_batches(seed=0, epoch=3)
    # A resume after 4 batches sees exactly the batches the uninterrupted epoch did.
    for expected, actual in zip(full[4:], epoch_batches(seed=0, epoch=3, skip=4), strict=True):
        assert torch.equal(expected, actual)
    assert not torch.equal(full[0], epoch_batches(seed=0, epoch=4)[0])
    assert not torch.equal(full[0], epoch_batches(seed=1, epoch=3)[0])
    plain = DigitsDataModule(batch_size=100)
    plain.setup()
    assert plain.train_set is not None
    assert sum(batch.sum() for batch in full) < plain.train_set.tensors[0].sum()  # zeros moved in
    # Evaluation images are never moved.
    shifted = DigitsDataModule(max_shift=1)
    shifted.setup()
    assert shifted.val_set is not None
    assert plain.val_set is not None
    assert torch.equal(shifted.val_set.tensors[0], plain.val_set.tensors[0])
