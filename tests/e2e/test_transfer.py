"""Sparse transfer learning through ``python -m lightning_sparse.train recipe=sparse_transfer``.

A model pruned on the digits 0-4 is transferred to the digits 5-9: a new head, every zero held.
A dense model trained and transferred the same way is the baseline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException

from lightning_sparse.run.recipe import compose_config
from lightning_sparse.run.training import ConfigError, run
from tests.stage_helpers import write_image_folder

pytestmark = pytest.mark.slow

COMMON = [
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=5",
    "~logger.csv",
    "export=false",  # what a transfer keeps is read from its checkpoint
]
LOWER = ["data.classes=[0,1,2,3,4]", "data.num_classes=5"]
UPPER = ["data.classes=[5,6,7,8,9]", "data.num_classes=5"]
SPARSE = [
    "recipe=gmp",
    "recipe.pruning.final_sparsity=0.8",
    "recipe.pruning.start_epoch=0",
    "recipe.pruning.end_epoch=2",
]
HEAD = "model.fc2"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(output_dir: Path, *overrides: str) -> dict[str, Any]:
    """``train.run`` on the composed configs, as the app would, writing into ``output_dir``."""
    cfg = compose_config(
        [*COMMON, *overrides, f"output_dir='{output_dir}'"], return_hydra_config=True
    )
    HydraConfig.instance().set_config(cfg)
    try:
        return run(cfg)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.endswith(".weight")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two models trained on digits 0-4 for 4 epochs: pruned to 80% zeros (GMP), and dense."""
    root = tmp_path_factory.mktemp("sources")
    train(root / "sparse", *LOWER, *SPARSE, "trainer.max_epochs=4")
    train(root / "dense", *LOWER, "recipe=dense", "trainer.max_epochs=4")
    return {"sparse": root / "sparse", "dense": root / "dense"}


def transfer(source: Path, output_dir: Path, *overrides: str) -> dict[str, Any]:
    return train(
        output_dir,
        *UPPER,
        "recipe=sparse_transfer",
        f"model.init_from='{source}'",
        "trainer.max_epochs=3",
        *overrides,
    )


def test_sparse_transfer_keeps_every_zero_and_is_compared_with_dense(
    sources: dict[str, Path], tmp_path: Path, record_property: Any
) -> None:
    results = {kind: transfer(path, tmp_path / kind) for kind, path in sources.items()}
    before, after = weights(sources["sparse"]), weights(tmp_path / "sparse")
    backbone = [name for name in before if not name.startswith(f"{HEAD}.")]
    assert backbone == ["model.conv1.weight", "model.conv2.weight", "model.fc1.weight"]
    for name in backbone:
        # Unchanged to the element: the same weights are zero, and no others.
        assert torch.equal(after[name] == 0, before[name] == 0), name
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    zeros = sum(int((before[n] == 0).sum()) for n in backbone)
    total = sum(before[n].numel() for n in backbone)
    assert zeros / total == pytest.approx(0.8, abs=1e-3)
    # The head was swapped: a fresh, dense one for the new classes.
    assert after[f"{HEAD}.weight"].shape == (5, 128)
    assert int((after[f"{HEAD}.weight"] == 0).sum()) == 0
    assert not torch.equal(after[f"{HEAD}.weight"], before[f"{HEAD}.weight"])
    # The dense model stayed dense.
    dense_after = weights(tmp_path / "dense")
    assert all(int((dense_after[n] == 0).sum()) == 0 for n in backbone)

    sparse_acc, dense_acc = results["sparse"]["test_acc"], results["dense"]["test_acc"]
    record_property("sparse_transfer_test_acc", sparse_acc)
    record_property("dense_transfer_test_acc", dense_acc)
    print(f"digits 0-4 -> 5-9: sparse (80%) {sparse_acc:.3f}, dense {dense_acc:.3f}")
    # Short runs (4 + 3 epochs): both must have learnt, well above chance (0.2); which one wins,
    # and by how much, is for the benchmark (docs/benchmarks.md, 3 seeds) to say.
    assert sparse_acc > 0.45
    assert dense_acc > 0.45
    assert results["sparse"]["recipe"]["name"] == "sparse_transfer"


def test_a_transfer_of_a_transfer_keeps_the_zeros(sources: dict[str, Path], tmp_path: Path) -> None:
    # The transferred run dir is itself a valid source, with the same class count (no swap).
    transfer(sources["sparse"], tmp_path / "first")
    train(
        tmp_path / "second",
        *UPPER,
        "recipe=sparse_transfer",
        f"model.init_from='{tmp_path / 'first'}'",
        "model.reset_head=false",
        "trainer.max_epochs=1",
    )
    first, second = weights(tmp_path / "first"), weights(tmp_path / "second")
    for name in first:
        assert torch.equal(second[name] == 0, first[name] == 0), name


def assert_nothing_written(run_dir: Path) -> None:
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(run_dir.iterdir())


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["model.model.width=16"], InstantiationException, "'model.conv1.weight' has shape"),
        (["model.num_classes=3"], InstantiationException, "`num_classes`=3 but the backbone's"),
        (
            ["model.init_from=/no/such/run"],
            FileNotFoundError,
            "`model.init_from`='/no/such/run': not found",
        ),
    ],
    ids=["another-model", "head-class-count", "missing-checkpoint"],
)
def test_bad_transfers_fail_before_any_work(
    sources: dict[str, Path], tmp_path: Path, overrides: list[str], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        transfer(sources["sparse"], tmp_path / "run", *overrides)
    assert_nothing_written(tmp_path / "run")


def test_a_transfer_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InstantiationException, match=r"needs `init_from`.*model.init_from="):
        train(tmp_path / "run", *UPPER, "recipe=sparse_transfer")
    assert_nothing_written(tmp_path / "run")


def test_a_head_for_other_data_fails_before_training(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(
        ConfigError, match=r"`data.num_classes`=5 but the model predicts `model.num_classes`=3"
    ):
        transfer(
            sources["sparse"], tmp_path / "run", "model.num_classes=3", "model.model.num_classes=3"
        )
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize(
    ("folder", "error", "message"),
    [
        ("missing", FileNotFoundError, r"`data.root`=.*missing': not found"),
        ("empty", InstantiationException, r"`root`=.*empty' holds no images"),
    ],
)
def test_bad_data_roots_fail_before_any_work(
    tmp_path: Path, folder: str, error: type, message: str
) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(error, match=message):
        train(
            tmp_path / "run",
            "data=image_folder",
            f"data.root='{tmp_path / folder}'",
            "data.num_classes=2",
        )
    assert_nothing_written(tmp_path / "run")


def test_image_folder_trains_end_to_end(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", ("cat", "dog", "emu"), per_class=8)
    summary = train(
        tmp_path / "run",
        "data=image_folder",
        f"data.root='{tmp_path / 'pets'}'",
        "data.num_classes=3",
        "data.input_shape=[3,8,8]",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "data.batch_size=4",
        *SPARSE,
        "recipe.pruning.end_epoch=1",
        "trainer.max_epochs=2",
    )
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["test_acc"] is not None
