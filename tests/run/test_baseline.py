"""The dense baseline: the snapshot before compression, and how the summary reports it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from rich.console import Console

from lightning_sparse.callbacks import MagnitudePruning, QuantizationAwareTraining
from lightning_sparse.run.baseline import DenseSnapshot, compression_start
from lightning_sparse.run.report import summary_table
from tests.helpers import TinyData, TinyModule, quiet_trainer

# TinyData: 80 samples, batch 8 -> 10 optimizer steps per epoch.


def _run(
    max_epochs: int, with_snapshot: bool, tmp_path: Path | None = None, ckpt: str | None = None
) -> tuple[TinyModule, DenseSnapshot]:
    pl.seed_everything(0)
    module = TinyModule()
    snapshot = DenseSnapshot(1.0)
    callbacks: list[pl.Callback] = [
        *([snapshot] if with_snapshot else []),
        MagnitudePruning(final_sparsity=0.8, start_epoch=1, end_epoch=2, update_frequency=0.5),
    ]
    if max_epochs < 2:  # the dense reference: one epoch, no technique
        callbacks = []
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True))
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=tmp_path is not None
    )
    trainer.fit(module, TinyData(), ckpt_path=ckpt)
    return module, snapshot


def test_snapshot_holds_the_weights_from_just_before_the_first_pruning_step(
    tmp_path: Path,
) -> None:
    # One dense epoch and nothing else: the weights the snapshot must hold.
    dense, _ = _run(1, with_snapshot=False)
    pruned, snapshot = _run(3, with_snapshot=True)
    assert snapshot.taken_at == 1.0
    assert snapshot.weights is not None
    for name, value in dense.state_dict().items():
        assert torch.equal(snapshot.weights[name], value), name
    # The trained model is sparse; the snapshot's model is the dense one, as a separate copy.
    assert float((pruned.model.fc1.weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    copy = snapshot.model(pruned)
    assert copy is not None
    assert copy is not pruned
    assert torch.equal(copy.model.fc1.weight, dense.model.fc1.weight)
    # Resumed after the snapshot: the checkpoint brings it back, nothing is taken again.
    _run(2, with_snapshot=True, tmp_path=tmp_path)
    _, resumed = _run(3, with_snapshot=True, ckpt=str(tmp_path / "last.ckpt"))
    assert resumed.taken_at == 1.0
    assert resumed.weights is not None
    for name, value in dense.state_dict().items():
        assert torch.equal(resumed.weights[name], value), name


def test_after_channels_went_the_snapshot_model_is_built_with_the_dense_architecture(
    tmp_path: Path,
) -> None:
    from lightning_sparse.callbacks import ChannelPruning
    from lightning_sparse.module import CompressionModule

    class Module(CompressionModule, TinyModule):
        pass

    def run(ckpt: str | None = None, max_epochs: int = 3) -> tuple[Module, DenseSnapshot]:
        pl.seed_everything(0)
        module, snapshot = Module(), DenseSnapshot(1.0)
        pruning = ChannelPruning(final_sparsity=0.5, start_epoch=1, end_epoch=2)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = quiet_trainer(
            max_epochs=max_epochs,
            callbacks=[snapshot, pruning, checkpoint],
            enable_checkpointing=True,
        )
        trainer.fit(module, TinyData(), ckpt_path=ckpt)
        return module, snapshot

    pruned, snapshot = run()
    assert pruned.model.conv1.out_channels < 8
    assert snapshot.structure_changes == 0
    assert snapshot.model(pruned) is None  # the pruned module cannot hold the dense weights
    dense = snapshot.model(pruned, build=Module)
    assert dense is not None
    assert dense.model.conv1.out_channels == 8
    assert snapshot.weights is not None
    assert torch.equal(dense.model.conv1.weight, snapshot.weights["model.conv1.weight"])
    # resumed after the removal: the weights come from the checkpoint, the architecture is built
    _, resumed = run(ckpt=str(tmp_path / "last.ckpt"), max_epochs=4)
    again = resumed.model(pruned, build=Module)
    assert again is not None
    assert torch.equal(again.model.conv1.weight, dense.model.conv1.weight)


def test_compression_starts_at_the_earliest_technique() -> None:
    callbacks = [
        MagnitudePruning(final_sparsity=0.5, start_epoch=3, end_epoch=6),
        QuantizationAwareTraining(start_epoch=2.5),
    ]
    assert compression_start(callbacks) == 2.5
    assert compression_start([]) == 0.0
    with pytest.raises(ValueError, match=r"`epoch`=0.0 is not allowed"):
        DenseSnapshot(0.0)


def _render(summary: dict[str, object]) -> str:
    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    return console.export_text()


@pytest.mark.parametrize(
    ("baseline", "label"),
    [
        ({"kind": "snapshot", "epoch": 5.0}, "dense acc. (snapshot, epoch 5.00)"),
        ({"kind": "train", "epochs": 30}, "dense acc. (dense run, same setup)"),
    ],
)
def test_summary_table_compares_with_dense(baseline: dict[str, object], label: str) -> None:
    text = _render(
        {
            "test_acc": 0.97,
            "onnx_int8_acc": 0.9675,
            "dense_test_acc": 0.975,
            "dense_baseline": baseline,
            "sparsity": 0.9,
        }
    )
    assert label in text
    assert "97.50%" in text
    assert "vs dense (test / int8)" in text
    assert "-0.50 / -0.75 pp" in text


def test_summary_table_without_a_dense_phase() -> None:
    text = _render(
        {"test_acc": 0.9, "dense_test_acc": None, "dense_baseline": {"kind": "snapshot"}}
    )
    assert "dense acc. (none: compressed from 0)" in text
    assert "vs dense" not in text
    assert "dense acc." not in _render({"test_acc": 0.9})  # baseline=null: no rows


def test_a_removal_at_the_snapshot_epoch_comes_after_the_snapshot() -> None:
    # A one-shot removal at epoch 1.0 acts right after the step that reaches it (the last batch
    # of epoch 0); the snapshot, due at the same epoch, must hold the weights from before it.
    from lightning_sparse.callbacks import ChannelPruning
    from lightning_sparse.module import CompressionModule

    class Module(CompressionModule, TinyModule):
        pass

    pl.seed_everything(0)
    module, snapshot = Module(), DenseSnapshot(1.0)
    pruning = ChannelPruning(final_sparsity=0.5, start_epoch=1, end_epoch=1)
    quiet_trainer(max_epochs=2, callbacks=[snapshot, pruning]).fit(module, TinyData())
    assert module.model.conv1.out_channels < 8
    assert snapshot.taken_at == 1.0
    assert snapshot.structure_changes == 0
    assert snapshot.weights is not None
    assert snapshot.weights["model.conv1.weight"].shape[0] == 8
