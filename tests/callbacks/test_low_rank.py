"""LowRankFactorization: layers factorized once on the clock, training on, resume and reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sparse import LowRankFactorization, MagnitudePruning, QuantizationAwareTraining
from lightning_sparse.core.checkpoint import load_checkpoint
from lightning_sparse.core.structure import applied_changes, count_macs
from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.deploy.export import export_model
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule, CompressionModule
from tests.helpers import Crash, TinyData, TinyModule, fit_resumable, quiet_trainer

EXAMPLE = torch.zeros(1, 4, 4, 4)


class TinyLowRankModule(CompressionModule, TinyModule):
    """TinyModule (conv1 4->8 3x3, fc1 128->32, fc2 32->4) with the mixin that replays structure."""


def _factorize(**kwargs: Any) -> LowRankFactorization:
    options: dict[str, Any] = {"start_epoch": 0.5, "rank_ratio": 0.5}
    return LowRankFactorization(**{**options, **kwargs})


def _fit(
    callback: LowRankFactorization, module: pl.LightningModule | None = None, **kwargs: Any
) -> tuple[pl.LightningModule, pl.Trainer]:
    pl.seed_everything(0)
    module = module or TinyLowRankModule()
    options: dict[str, Any] = {"max_epochs": 2, "callbacks": [callback]}
    trainer = quiet_trainer(**{**options, **kwargs})
    trainer.fit(module, TinyData())
    return module, trainer


def test_layers_become_two_factors_at_start_epoch_and_the_head_stays() -> None:
    shapes: list[tuple[int, bool]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *_: Any) -> None:
            shapes.append((trainer.global_step, isinstance(pl_module.model.fc1, nn.Sequential)))

    factorize = _factorize(name="lowrank")
    dense_macs = count_macs(TinyModule(), EXAMPLE)
    module, trainer = _fit(factorize, callbacks=[factorize, Record()])
    # 10 steps per epoch: factorized right after step 5, once
    assert next(step for step, factored in shapes if factored) == 5
    assert all(factored for step, factored in shapes if step >= 5)
    net = module.model
    # conv1: 8 x 36 at rank 4 (4 * 44 < 288); fc1: 32 x 128 at rank 16; fc2 (the head) stays
    assert factorize.ranks == {"model.conv1": 4, "model.fc1": 16}
    assert [tuple(p.shape) for p in net.conv1.parameters()] == [(4, 4, 3, 3), (8, 4, 1, 1), (8,)]
    assert [tuple(p.shape) for p in net.fc1.parameters()] == [(16, 128), (32, 16), (32,)]
    assert isinstance(net.fc2, nn.Linear)
    assert len(factorize.structure_changes) == 1
    assert applied_changes(module) == factorize.structure_changes
    assert factorize.dense_macs == dense_macs
    assert factorize.macs == count_macs(module, EXAMPLE) < dense_macs
    metrics = trainer.callback_metrics
    removed = 1 - factorize.macs / dense_macs
    assert float(metrics["compression/lowrank/macs_removed"]) == pytest.approx(removed)
    assert "compression/lowrank/params" in metrics


def test_full_energy_saves_nothing_and_leaves_the_model_alone() -> None:
    factorize = _factorize(rank_ratio=None, energy=1.0)
    module, _ = _fit(factorize)
    assert isinstance(module.model.fc1, nn.Linear)
    assert isinstance(module.model.conv1, nn.Conv2d)
    assert factorize.structure_changes == []
    assert factorize.state_dict()["done"]


def test_energy_picks_the_rank_from_the_spectrum() -> None:
    module = TinyLowRankModule()
    with torch.no_grad():  # fc1 of rank 3 exactly
        module.model.fc1.weight.copy_(torch.randn(32, 3) @ torch.randn(3, 128))
    factorize = _factorize(rank_ratio=None, energy=0.999, params=["model.fc1.weight"])
    _fit(factorize, module, max_epochs=1)
    assert factorize.ranks["model.fc1"] <= 3


def test_the_optimizer_steps_the_new_parameters() -> None:
    seen: dict[str, Any] = {}

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *_: Any) -> None:
            if trainer.global_step == 6:  # one step after the factorization
                seen["params"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                state = trainer.optimizers[0].state
                seen["bias_momentum"] = state[pl_module.model.fc1[1].bias]["momentum_buffer"]

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *_: Any) -> None:
            if trainer.global_step == 7:
                seen["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                optimizer = trainer.optimizers[0]
                in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
                seen["same_params"] = in_optimizer == {id(p) for p in pl_module.parameters()}

    pl.seed_everything(0)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        quiet_trainer(max_epochs=2, callbacks=[_factorize(), Check(), Crash(7)]).fit(
            TinyLowRankModule(), TinyData()
        )
    for name in ("model.conv1.0.weight", "model.conv1.1.weight", "model.fc1.0.weight"):
        assert not torch.equal(seen["after"][name], seen["params"][name]), name
    assert seen["same_params"]
    # the bias moved to the second factor unchanged: its momentum followed it
    assert seen["bias_momentum"].shape == (32,)


def test_resume_after_a_crash_ends_bit_identical(tmp_path: Path) -> None:
    def run(crash_at: int | None, ckpt_path: str | None) -> pl.LightningModule:
        pl.seed_everything(0)
        module = TinyLowRankModule()
        fit_resumable(module, [_factorize()], tmp_path / "ckpt", crash_at, ckpt_path, 2)
        return module

    reference = run(None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        run(crash_at=12, ckpt_path=None)
    resumed = run(None, str(tmp_path / "ckpt" / "step=10.ckpt"))
    assert applied_changes(resumed) == applied_changes(reference)
    reference_state = reference.state_dict()
    assert resumed.state_dict().keys() == reference_state.keys()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def test_resume_with_qat_after_the_factorization_ends_bit_identical(tmp_path: Path) -> None:
    # QAT prepares the dense layers in `setup`; the factorization replaces them (during training,
    # and on resume by the replay after `setup`), and QAT quantizes the factors instead.
    def run(crash_at: int | None, ckpt_path: str | None) -> pl.LightningModule:
        pl.seed_everything(0)
        module = TinyLowRankModule()
        qat = QuantizationAwareTraining(start_epoch=1.0)
        fit_resumable(module, [qat, _factorize()], tmp_path / "ckpt", crash_at, ckpt_path, 2)
        assert "model.fc1.0" in qat.layer_names
        assert "model.fc1" not in qat.layer_names
        return module

    reference = run(None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        run(crash_at=17, ckpt_path=None)
    resumed = run(None, str(tmp_path / "ckpt" / "step=15.ckpt"))
    reference_state = reference.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def _classifier() -> ClassificationModule:
    return ClassificationModule(
        SmallCNN(in_channels=1, num_classes=3, width=8, input_size=8), num_classes=3
    )


def _data() -> SyntheticDataModule:
    return SyntheticDataModule(
        num_classes=3, train_size=64, val_size=16, test_size=32, batch_size=16
    )


def _trained(tmp_path: Path, callbacks: list[pl.Callback]) -> tuple[ClassificationModule, Path]:
    pl.seed_everything(0)
    module = _classifier()
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(module, datamodule=_data())
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_a_checkpoint_rebuilds_the_factorized_model_wherever_it_loads(tmp_path: Path) -> None:
    module, path = _trained(tmp_path, [LowRankFactorization(start_epoch=0.5, rank_ratio=0.25)])
    assert isinstance(module.model.conv2, nn.Sequential)
    trained = module.state_dict()
    exported = _classifier()
    load_checkpoint(exported, path)  # what `python -m lightning_sparse.export` does
    started = ClassificationModule(
        SmallCNN(in_channels=1, num_classes=3, width=8, input_size=8),
        num_classes=3,
        init_from=tmp_path / "run",
    )
    for rebuilt in (exported, started):
        assert rebuilt.state_dict().keys() == trained.keys()
        for key, value in rebuilt.state_dict().items():
            assert torch.equal(value, trained[key]), key
    # the export counts the factors' MACs and times the model next to the dense one
    summary = export_model(
        exported, _data(), tmp_path / "export", latency_runs=2, dense=_classifier()
    )
    assert summary["macs"] < summary["macs_dense"]
    assert summary["params"] < summary["params_dense"]
    assert summary["onnx_fp32_max_abs_diff"] < 1e-4


def test_factorization_then_qat_exports_an_int8_model_that_runs_in_ort(tmp_path: Path) -> None:
    callbacks: list[pl.Callback] = [
        LowRankFactorization(start_epoch=0.5, rank_ratio=0.25),
        QuantizationAwareTraining(start_epoch=1),
    ]
    _, path = _trained(tmp_path, callbacks)
    rebuilt = _classifier()
    quantized = load_checkpoint(rebuilt, path)
    assert {"model.conv2.0", "model.conv2.1"} <= set(quantized)
    summary = export_model(rebuilt, _data(), tmp_path / "export", latency_runs=2)
    assert summary["onnx_int8_path"] is not None
    assert summary["ort_int8_ms"] > 0
    assert summary["onnx_int8_agreement"] > 0.9
    assert summary["macs"] < count_macs(_classifier(), torch.zeros(1, 1, 8, 8))


def test_masks_in_the_same_run_are_refused_at_setup() -> None:
    gmp = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    with pytest.raises(
        ValueError, match=r"LowRankFactorization .* and MagnitudePruning .* cannot train"
    ):
        _fit(_factorize(), callbacks=[_factorize(), gmp])


def test_a_module_without_the_mixin_is_refused_at_setup() -> None:
    with pytest.raises(TypeError, match=r"does not mix in"):
        _fit(_factorize(), TinyModule())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_ratio": 0}, r"`rank_ratio`=0 is not allowed; it must be in \(0, 1\]"),
        ({"rank_ratio": 1.5}, r"`rank_ratio`=1.5 is not allowed; it must be in \(0, 1\]"),
        ({"rank_ratio": "half"}, r"`rank_ratio`='half' is not a number"),
        (
            {"rank_ratio": None, "energy": 0.0},
            r"`energy`=0.0 is not allowed; it must be in \(0, 1\]",
        ),
        ({"energy": 0.9}, r"`energy`=0.9 and `rank_ratio`=0.5: set exactly one"),
        ({"rank_ratio": None}, r"`energy`=None and `rank_ratio`=None: set exactly one"),
        ({"start_epoch": -1}, r"`start_epoch`=-1 is not allowed"),
        ({"params": []}, r"`params`=\[\] must be a parameter name"),
        ({"head": ""}, r"`head`='' is not allowed"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _factorize(**kwargs)


def test_start_past_max_epochs_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`start_epoch`=2 is not before the trainer's max_epochs"):
        _fit(_factorize(start_epoch=2))


def test_targets_are_checked_against_the_model() -> None:
    model = TinyModule()
    assert list(_factorize().resolve_targets(model)) == ["model.conv1.weight", "model.fc1.weight"]
    with pytest.raises(ValueError, match=r"`params` entry 'model.fc9.weight'"):
        _factorize(params=["model.fc9.weight"]).check_model(model)
    with pytest.raises(ValueError, match="output layer"):
        _factorize(params="model.fc2.weight").check_model(model)
    model.model.conv1 = nn.Conv1d(4, 8, 3)
    with pytest.raises(ValueError, match=r"'model.conv1.weight' \(Conv1d\) does not factorize"):
        _factorize(params=["model.conv1.weight"]).check_model(model)


def test_declares_the_interface(tmp_path: Path) -> None:
    factorize = _factorize()
    assert factorize.changes == {"structure"}
    assert factorize.changes_weights_until == ("start_epoch", 0.5)
    assert [limit.field for limit in factorize.schedule_limits()] == ["start_epoch"]
    assert factorize.masks == {}
    _fit(factorize)
    torch.save(factorize.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    restored = _factorize()
    restored.load_state_dict(state)
    assert restored.structure_changes == factorize.structure_changes
    assert restored.ranks == factorize.ranks
