"""``ClassificationModule(init_from=...)``: start from a run's weights, swap the head, or refuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from lightning_sparse.data import DigitsDataModule, SyntheticDataModule
from lightning_sparse.models import MLP, SmallCNN, resnet18
from lightning_sparse.module import ClassificationModule, find_head, load_weights
from tests.stage_helpers import one_thread, quiet_trainer

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _module(num_classes: int = 10, width: int = 8, **kwargs: object) -> ClassificationModule:
    backbone = SmallCNN(num_classes=num_classes, width=width)
    return ClassificationModule(backbone, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]


def _save(module: ClassificationModule, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict()}, path)
    return path


def _sparse(module: ClassificationModule) -> ClassificationModule:
    with torch.no_grad():
        for param in module.parameters():
            param.masked_fill_(torch.rand_like(param) < 0.7, 0.0)
    return module


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run dir as `train` leaves it: a real Lightning checkpoint at checkpoints/last.ckpt."""
    torch.manual_seed(0)
    module = _sparse(_module())
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=SyntheticDataModule(train_size=16, batch_size=16))
    trainer.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    return tmp_path / "run"


def _backbone(module: ClassificationModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.startswith("model.fc2.")}


def test_init_from_a_run_dir_or_its_checkpoint_loads_every_weight(run_dir: Path) -> None:
    source = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for init_from in (run_dir, run_dir / "checkpoints" / "last.ckpt", str(run_dir)):
        module = _module(init_from=init_from)
        for key, value in module.state_dict().items():
            assert torch.equal(value, source[key]), key
    assert module.hparams["init_from"] == str(run_dir)


def test_head_is_swapped_when_the_class_count_differs(run_dir: Path) -> None:
    torch.manual_seed(1)
    fresh = _module(num_classes=5)
    torch.manual_seed(1)
    module = _module(num_classes=5, init_from=run_dir)
    source = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in _backbone(module).items():
        assert torch.equal(value, source[key]), key  # zeros included
    assert module.model.fc2.weight.shape == (5, 128)
    torch.testing.assert_close(module.model.fc2.weight, fresh.model.fc2.weight)  # as initialised


def test_reset_head_keeps_a_fresh_head_with_as_many_classes(run_dir: Path) -> None:
    source = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    module = _module(init_from=run_dir, reset_head=True)
    assert not torch.equal(module.model.fc2.weight, source["model.fc2.weight"])
    assert torch.equal(module.model.fc1.weight, source["model.fc1.weight"])


def test_a_plain_torchvision_state_dict_gets_a_new_head(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    module = ClassificationModule(
        resnet18(num_classes=10, small_inputs=False), num_classes=10, init_from=path
    )
    assert module.head_name == "fc"
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    source = torch.load(path, weights_only=True)
    assert torch.equal(module.model.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])
    # The CIFAR stem has another shape than the ImageNet one: the first mismatched key is named.
    with pytest.raises(ValueError, match=r"'model.conv1.weight' has shape \[64, 3, 7, 7\]"):
        ClassificationModule(resnet18(num_classes=10), num_classes=10, init_from=path)


def test_a_checkpoint_of_another_model_names_the_first_mismatched_key(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="does not match the model") as info:
        _module(width=16, init_from=run_dir)
    message = str(info.value)
    assert f"`init_from`={str(run_dir)!r} does not match the model" in message
    assert "'model.conv1.weight' has shape [8, 1, 3, 3] in the checkpoint but [16, 1, 3, 3]" in (
        message
    )
    assert "mismatched keys in all" in message


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, run_dir: Path) -> None:
    mlp = ClassificationModule(MLP(hidden=[16]), num_classes=10)
    with pytest.raises(ValueError, match=r"'model.fc1.weight' has shape"):
        load_weights(mlp, run_dir, head="model.fc2")
    state = _module().state_dict()
    del state["model.conv2.bias"]
    with pytest.raises(ValueError, match=r"'model.conv2.bias' is missing from the checkpoint"):
        _module(init_from=_save_raw(state, tmp_path / "missing.pt"))
    state = {**_module().state_dict(), "model.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"'model.extra.weight' is in the checkpoint but not"):
        _module(init_from=_save_raw(state, tmp_path / "extra.pt"))


def _save_raw(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_a_head_of_another_width_is_not_a_class_count_swap(tmp_path: Path) -> None:
    # Same class count, other hidden width before the head: fc1 and fc2 differ, fc1 is named.
    state = _module().state_dict()
    state["model.fc2.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=r"'model.fc2.weight' has shape \[10, 64\]"):
        _module(init_from=_save_raw(state, tmp_path / "head.pt"))


def test_one_shot_loading_allows_no_head_swap(run_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"'model.fc2.weight' has shape \[10, 128\]"):
        load_weights(_module(num_classes=5), run_dir, head=None, field="checkpoint")


def test_head_with_a_wrong_class_count_fails_at_construction() -> None:
    message = "`num_classes`=5 but the backbone's head `fc2` has 10 outputs"
    with pytest.raises(ValueError, match=re.escape(message)):
        ClassificationModule(SmallCNN(num_classes=10), num_classes=5)


def test_data_with_another_class_count_fails_at_setup(run_dir: Path) -> None:
    module = _module(num_classes=10)
    with pytest.raises(ValueError, match=r"`num_classes`=10 but the data module .* has 5 classes"):
        quiet_trainer(max_steps=1).fit(module, datamodule=DigitsDataModule(classes=[5, 6, 7, 8, 9]))


def _truncated(path: Path) -> Path:
    """A real checkpoint cut short, as a copy interrupted mid-way leaves it."""
    torch.save({"state_dict": SmallCNN().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    return path


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p: p / "nope", FileNotFoundError, "`init_from`=.*nope': not found"),
        (lambda p: p, FileNotFoundError, "the directory has no checkpoints/last.ckpt"),
        (
            lambda p: (p / "junk.ckpt", (p / "junk.ckpt").write_text("junk"))[0],
            ValueError,
            "junk.ckpt': not a checkpoint: truncated or not a torch file",
        ),
        (
            lambda p: _truncated(p / "cut.ckpt"),
            ValueError,
            "cut.ckpt': not a checkpoint: truncated or not a torch file",
        ),
        (
            lambda p: _save_raw({"epoch": 3}, p / "empty.ckpt"),  # type: ignore[dict-item]
            ValueError,
            "holds no weights",
        ),
    ],
    ids=["missing", "dir-without-checkpoint", "not-a-checkpoint", "truncated", "no-weights"],
)
def test_bad_init_from(tmp_path: Path, make: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _module(init_from=make(tmp_path))  # type: ignore[operator]


def test_reset_head_needs_init_from() -> None:
    with pytest.raises(ValueError, match="`reset_head`=True needs `init_from`"):
        _module(reset_head=True)


def test_find_head() -> None:
    assert find_head(SmallCNN()) is not None
    assert find_head(SmallCNN())[0] == "fc2"  # type: ignore[index]
    assert find_head(torchvision.models.squeezenet1_1()) is None
    with pytest.raises(ValueError, match=r"`head`='conv1' is not an nn.Linear"):
        find_head(SmallCNN(), "conv1")


def test_restoring_with_load_from_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    module = _module(num_classes=5, init_from=run_dir)
    path = _save(module, tmp_path / "transferred.ckpt")
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=SyntheticDataModule(num_classes=5, train_size=8))
    trainer.save_checkpoint(path)
    restored = ClassificationModule.load_from_checkpoint(
        path, model=SmallCNN(num_classes=5, width=8), init_from=None, weights_only=True
    )
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------
# A checkpoint of a model whose channels were removed rebuilds its architecture wherever it loads.

# conv2 (16 channels) loses 0..3, and fc1 the inputs they feed (16 pooled positions each).
_REMOVAL = {
    "kind": "remove_channels",
    "layers": {
        "model.conv2": {"out": [0, 1, 2, 3]},
        "model.fc1": {"in": list(range(64))},
    },
}


@pytest.fixture
def changed_run(tmp_path: Path) -> tuple[ClassificationModule, Path]:
    from lightning_sparse.core.structure import apply_change

    torch.manual_seed(0)
    module = _module()
    apply_change(module, _REMOVAL)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=SyntheticDataModule(train_size=16, batch_size=16))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return module, tmp_path / "run"


def test_init_from_and_load_checkpoint_replay_the_removed_channels(
    changed_run: tuple[ClassificationModule, Path],
) -> None:
    from lightning_sparse.core.checkpoint import load_checkpoint
    from lightning_sparse.core.structure import applied_changes

    trained, run = changed_run
    # the module's hook wrote its log into the checkpoint, beside the weights
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["structure"]["changes"] == applied_changes(trained)
    started = _module(init_from=run)
    exported = _module()
    load_checkpoint(exported, run / "checkpoints" / "last.ckpt")
    for module in (started, exported):
        assert module.model.conv2.weight.shape == (12, 8, 3, 3)
        assert module.model.fc1.weight.shape == (128, 12 * 16)
        for key, value in module.state_dict().items():
            assert torch.equal(value, trained.state_dict()[key]), key
        assert applied_changes(module) == applied_changes(trained)
    # a new head on the smaller body (sparse transfer of a pruned model)
    transfer = ClassificationModule(
        SmallCNN(num_classes=5, width=8), num_classes=5, init_from=run, reset_head=True
    )
    assert transfer.model.fc1.weight.shape == (128, 12 * 16)
    assert transfer.model.fc2.weight.shape == (5, 128)


def test_lightning_resume_rebuilds_the_structure_before_the_weights_load(
    changed_run: tuple[ClassificationModule, Path],
) -> None:
    _, run = changed_run
    module = _module()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(
        module,
        datamodule=SyntheticDataModule(train_size=16, batch_size=16),
        ckpt_path=run / "checkpoints" / "last.ckpt",
    )
    assert module.model.conv2.weight.shape == (12, 8, 3, 3)
    assert trainer.global_step == 2
