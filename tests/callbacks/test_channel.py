"""ChannelPruning: channels removed on the schedule, training going on, resume and reload exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sparse import ChannelPruning, QuantizationAwareTraining
from lightning_sparse.core.checkpoint import load_checkpoint
from lightning_sparse.core.structure import applied_changes, count_macs
from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.deploy.export import export_model
from lightning_sparse.models import SmallCNN, resnet18
from lightning_sparse.module import ClassificationModule, CompressionModule
from tests.helpers import Crash, TinyData, TinyModule, fit_resumable, quiet_trainer

EXAMPLE = torch.zeros(1, 4, 4, 4)
DENSE_MACS = count_macs(TinyModule(), EXAMPLE)


class TinyChannelModule(CompressionModule, TinyModule):
    """TinyModule (conv1 8 -> flatten -> fc1 32 -> fc2 4) with the mixin that replays structure."""


class Recorder(pl.Callback):
    """After each batch: the step, epoch, MACs share and every layer's weight shape."""

    def __init__(self, pruning: ChannelPruning) -> None:
        self.pruning = pruning
        self.steps: list[tuple[int, float, float, dict[str, tuple[int, ...]]]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        shapes = {
            n: tuple(p.shape) for n, p in pl_module.named_parameters() if n.endswith("weight")
        }
        share = count_macs(pl_module, EXAMPLE) / DENSE_MACS
        epoch = trainer.global_step / 10
        self.steps.append((trainer.global_step, epoch, share, shapes))


def _pruning(**kwargs: Any) -> ChannelPruning:
    options: dict[str, Any] = {
        "final_sparsity": 0.6,
        "init_sparsity": 0.2,
        "start_epoch": 0.5,
        "end_epoch": 2.0,
        "update_frequency": 0.5,
        "inter_func": "linear",
    }
    return ChannelPruning(**{**options, **kwargs})


def _fit(
    pruning: ChannelPruning, module: pl.LightningModule | None = None, **kwargs: Any
) -> tuple[pl.LightningModule, Recorder, pl.Trainer]:
    pl.seed_everything(0)
    module = module or TinyChannelModule()
    recorder = Recorder(pruning)
    options: dict[str, Any] = {"max_epochs": 3, "callbacks": [pruning, recorder]}
    trainer = quiet_trainer(**{**options, **kwargs})
    trainer.fit(module, TinyData())
    return module, recorder, trainer


def test_macs_follow_the_schedule_and_channels_only_go() -> None:
    pruning = _pruning()
    module, recorder, _ = _fit(pruning)
    # 10 steps per epoch: updates after steps 5, 10, 15 and 20
    for step, epoch, share, _ in recorder.steps:
        target = pruning.schedule.sparsity_at(epoch)
        assert share <= 1 - target + 1e-9, (step, share, target)
        # within one channel of fc1 (the finest group) of the target
        assert share >= 1 - target - 0.05, (step, share, target)
    widths = [shapes["model.conv1.weight"][0] for *_, shapes in recorder.steps]
    assert widths == sorted(widths, reverse=True)
    assert [s for s, *_ in recorder.steps if s in (4, 5, 10, 15, 20)] == [4, 5, 10, 15, 20]
    changed_at = [
        step
        for (step, *_, shapes), (*_, before) in zip(
            recorder.steps[1:], recorder.steps, strict=False
        )
        if shapes != before
    ]
    assert changed_at == [5, 10, 15, 20]
    assert pruning.macs is not None
    assert pruning.dense_macs == DENSE_MACS
    assert pruning.macs / pruning.dense_macs == pytest.approx(0.4, abs=0.05)
    assert len(pruning.structure_changes) == 4
    assert applied_changes(module) == pruning.structure_changes


def test_the_output_layer_keeps_every_class() -> None:
    pruning = _pruning(final_sparsity=0.8)
    module, recorder, _ = _fit(pruning)
    assert all(shapes["model.fc2.weight"][0] == 4 for *_, shapes in recorder.steps)
    assert module.model.fc2.out_features == 4
    assert module.model.fc2.in_features < 32  # its inputs went with fc1's outputs


def test_the_optimizer_steps_the_new_parameters() -> None:
    seen: dict[str, Any] = {}

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *_: Any) -> None:
            if trainer.global_step == 6:  # one step after the first removal
                seen["weight"] = pl_module.model.conv1.weight
                seen["before"] = pl_module.model.conv1.weight.detach().clone()
                seen["momentum"] = trainer.optimizers[0].state[pl_module.model.conv1.weight]

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *_: Any) -> None:
            if trainer.global_step == 7:
                seen["after"] = pl_module.model.conv1.weight.detach().clone()
                optimizer = trainer.optimizers[0]
                in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
                seen["same_params"] = in_optimizer == {id(p) for p in pl_module.parameters()}

    pruning = _pruning()
    pl.seed_everything(0)
    module = TinyChannelModule()
    with pytest.raises(RuntimeError, match="crash on purpose"):
        quiet_trainer(max_epochs=3, callbacks=[pruning, Check(), Crash(7)]).fit(module, TinyData())
    assert seen["before"].shape[0] < 8
    assert not torch.equal(seen["after"], seen["before"])
    assert seen["same_params"]
    # SGD's momentum followed the cut (one buffer per kept channel)
    assert seen["momentum"]["momentum_buffer"].shape == seen["before"].shape


@pytest.mark.parametrize(
    ("importance", "resume_step", "allocation"),
    [
        ("l1", 10, "uniform"),
        ("l1", 15, "uniform"),
        ("taylor", 10, "uniform"),
        ("bn_scale", 5, "uniform"),
        ("l1", 10, "global"),
    ],
)
def test_resume_after_a_crash_ends_bit_identical(
    tmp_path: Path, importance: str, resume_step: int, allocation: str
) -> None:
    def run(crash_at: int | None, ckpt_path: str | None) -> pl.LightningModule:
        pl.seed_everything(0)
        module = TinyChannelModule()
        pruning = _pruning(importance=importance, allocation=allocation)
        fit_resumable(module, [pruning], tmp_path / "ckpt", crash_at, ckpt_path)
        return module

    reference = run(None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        run(crash_at=resume_step + 2, ckpt_path=None)
    resumed = run(None, str(tmp_path / "ckpt" / f"step={resume_step}.ckpt"))
    assert applied_changes(resumed) == applied_changes(reference)
    reference_state = reference.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def test_resume_with_qat_after_the_removal_ends_bit_identical(tmp_path: Path) -> None:
    # QAT prepares the dense layers in `setup`; the resumed run's removal is replayed after that
    # (by the module, before the weights load), and its scales fit the smaller layers.
    def run(crash_at: int | None, ckpt_path: str | None) -> pl.LightningModule:
        pl.seed_everything(0)
        module = TinyChannelModule()
        callbacks = [
            QuantizationAwareTraining(start_epoch=1.5),
            _pruning(start_epoch=0.5, end_epoch=1.0),
        ]
        fit_resumable(module, callbacks, tmp_path / "ckpt", crash_at, ckpt_path)
        return module

    reference = run(None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        run(crash_at=22, ckpt_path=None)
    resumed = run(None, str(tmp_path / "ckpt" / "step=20.ckpt"))
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


def test_a_checkpoint_rebuilds_the_smaller_model_wherever_it_loads(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = _classifier()
    pruning = ChannelPruning(final_sparsity=0.5, start_epoch=0.5, end_epoch=1, update_frequency=0.5)
    trainer = quiet_trainer(max_epochs=2, callbacks=[pruning], limit_val_batches=0)
    trainer.fit(module, datamodule=_data())
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    assert module.model.conv2.out_channels < 16
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
    # only the callback's state holds the log when the module does not: still enough
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.pop("structure")
    torch.save(checkpoint, tmp_path / "callbacks_only.ckpt")
    again = _classifier()
    load_checkpoint(again, tmp_path / "callbacks_only.ckpt")
    assert again.model.conv2.out_channels == module.model.conv2.out_channels
    # the export writes the smaller model and times it next to the dense one
    summary = export_model(
        exported, _data(), tmp_path / "export", latency_runs=2, dense=_classifier()
    )
    assert summary["macs"] < summary["macs_dense"]
    assert summary["params"] < summary["params_dense"]
    assert summary["ort_dense_fp32_ms"] > 0
    assert summary["speedup_vs_dense"] == pytest.approx(
        summary["ort_dense_fp32_ms"] / summary["ort_fp32_ms"]
    )
    assert summary["onnx_fp32_max_abs_diff"] < 1e-4


def test_channel_removal_then_qat_exports_an_int8_smaller_model(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = _classifier()
    callbacks = [
        ChannelPruning(final_sparsity=0.5, start_epoch=0.25, end_epoch=1, update_frequency=0.25),
        QuantizationAwareTraining(start_epoch=1),
    ]
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(module, datamodule=_data())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    # the checkpoint's quantization state fits the smaller layers (scales per kept channel)
    rebuilt = _classifier()
    quantized = load_checkpoint(rebuilt, path)
    assert "model.conv2" in quantized
    summary = export_model(rebuilt, _data(), tmp_path / "export", latency_runs=2)
    assert summary["onnx_int8_path"] is not None
    assert summary["onnx_int8_agreement"] > 0.9
    assert summary["macs"] < count_macs(_classifier(), torch.zeros(1, 1, 8, 8))


def test_resnet18_shrinks_its_residual_stages_together() -> None:
    pruning = ChannelPruning(
        final_sparsity=0.5, start_epoch=0.5, end_epoch=1, update_frequency=0.5, round_to=4
    )
    pl.seed_everything(0)
    module = TinyChannelModule()
    module.model = resnet18(num_classes=4, in_channels=4)
    quiet_trainer(max_epochs=1, limit_train_batches=6, callbacks=[pruning]).fit(module, TinyData())
    net = module.model
    assert pruning.macs is not None
    assert pruning.dense_macs is not None
    assert pruning.macs <= 0.5 * pruning.dense_macs
    stem = net.conv1.out_channels
    assert stem < 64
    assert stem % 4 == 0
    # the stem's channels are every block's output in the first stage
    assert net.layer1[0].conv2.out_channels == net.layer1[1].conv2.out_channels == stem
    assert net.layer2[0].downsample[0].in_channels == stem
    assert net.fc.out_features == 4
    assert module(torch.zeros(2, 4, 4, 4)).shape == (2, 4)


def test_global_allocation_narrows_the_layers_whose_scales_are_small() -> None:
    # Network Slimming's threshold: layer3's |gamma| are a tenth of the others', so a global
    # ranking takes layer3's channels first (down to max_group_sparsity) and spares the rest
    pl.seed_everything(0)
    module = TinyChannelModule()
    module.model = resnet18(num_classes=4, in_channels=4)
    with torch.no_grad():
        for name, layer in module.model.named_modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.fill_(0.1 if name.startswith("layer3") else 1.0)
    pruning = ChannelPruning(
        final_sparsity=0.4,
        start_epoch=0.5,
        end_epoch=0.5,
        importance="bn_scale",
        allocation="global",
        max_group_sparsity=0.75,
    )
    quiet_trainer(max_epochs=1, limit_train_batches=4, callbacks=[pruning]).fit(module, TinyData())
    net = module.model
    assert pruning.macs is not None
    assert pruning.dense_macs is not None
    assert pruning.macs <= 0.6 * pruning.dense_macs
    assert net.layer3[0].conv1.out_channels == net.layer3[1].conv1.out_channels == 64  # 256 / 4
    assert net.layer3[0].downsample[0].out_channels == 64
    assert net.layer4[0].conv1.out_channels > 0.6 * 512  # more than a uniform 40% cut keeps
    assert module(torch.zeros(2, 4, 4, 4)).shape == (2, 4)


def test_macs_removed_is_logged_per_epoch() -> None:
    pruning = _pruning(name="channels")
    _, _, trainer = _fit(pruning)
    metrics = trainer.callback_metrics
    assert float(metrics["compression/channels/macs_removed"]) == pytest.approx(0.6, abs=0.05)
    assert float(metrics["compression/channels/target"]) == pytest.approx(0.6)
    assert "compression/channels/params" in metrics


def test_a_module_without_the_mixin_is_refused_at_setup() -> None:
    with pytest.raises(
        TypeError, match=r"does not mix in lightning_sparse\.module\.CompressionModule"
    ):
        _fit(_pruning(), TinyModule())


def test_masks_in_the_same_run_are_refused_at_setup() -> None:
    from lightning_sparse import MagnitudePruning

    gmp = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    with pytest.raises(ValueError, match=r"ChannelPruning .* and MagnitudePruning .* cannot train"):
        _fit(_pruning(), callbacks=[_pruning(), gmp])


def test_naming_the_output_layer_is_an_error_naming_it() -> None:
    with pytest.raises(
        ValueError, match=r"`params` entry 'model.fc2.weight' is the model's output"
    ):
        _fit(_pruning(params=["model.fc1.weight", "model.fc2.weight"]))
    with pytest.raises(ValueError, match=r"`head`='model.fc9' is not a Conv/Linear layer"):
        _fit(_pruning(head="model.fc9"))


def test_only_selected_layers_lose_outputs() -> None:
    pruning = _pruning(params=["model.fc1.weight"])
    module, _, _ = _fit(pruning)
    assert module.model.conv1.out_channels == 8
    assert module.model.fc1.out_features < 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_sparsity": 1.0}, r"`final_sparsity`=1.0 is not allowed; it must be in \[0, 1\)"),
        ({"init_sparsity": 0.7}, r"`init_sparsity`=0.7 is greater than `final_sparsity`=0.6"),
        ({"init_sparsity": -0.1}, r"`init_sparsity`=-0.1 is not allowed"),
        ({"end_epoch": None}, r"`end_epoch`=None is not allowed"),
        ({"update_frequency": 0}, r"`update_frequency`=0 is not allowed"),
        ({"inter_func": "exp"}, r"`inter_func`='exp' is not allowed"),
        (
            {"target": "flops"},
            r"`target`='flops' is not allowed; choose one of \('macs', 'channels'\)",
        ),
        ({"importance": "l3"}, r"`importance`='l3' is not allowed; choose one of"),
        ({"importance": "taylor", "start_epoch": 0}, r"`start_epoch`=0 leaves no step"),
        ({"round_to": 0}, r"`round_to`=0 is not allowed"),
        ({"params": []}, r"`params`=\[\] must be a parameter name"),
        ({"head": ""}, r"`head`='' is not allowed"),
        ({"allocation": "best"}, r"`allocation`='best' is not allowed; choose one of"),
        (
            {"allocation": "global", "max_group_sparsity": 1.0},
            r"`max_group_sparsity`=1.0 is not allowed; it must be in \[0, 1\)",
        ),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _pruning(**kwargs)


def test_schedule_past_max_epochs_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`end_epoch`=5 is past the trainer's max_epochs=3"):
        _fit(_pruning(end_epoch=5))


def test_declares_the_interface() -> None:
    pruning = _pruning()
    assert pruning.changes == {"structure"}
    assert pruning.changes_weights_until == ("end_epoch", 2.0)
    assert [limit.field for limit in pruning.schedule_limits()] == ["end_epoch"]
    assert list(pruning.resolve_targets(TinyModule())) == ["model.conv1.weight", "model.fc1.weight"]
    curve = pruning.target_curve([0.0, 1.0, 2.0])
    assert curve == {"target MACs removed": [0.0, pytest.approx(0.2 + 0.4 / 3), pytest.approx(0.6)]}
    pruning.check_model(TinyModule())
    with pytest.raises(ValueError, match="output layer"):
        _pruning(params="model.fc2.weight").check_model(TinyModule())
    assert pruning.masks == {}


def test_weights_only_state(tmp_path: Path) -> None:
    pruning = _pruning(importance="taylor")
    # stopped after step 7: one update (epoch 0.5) applied, taylor scores accumulating since
    with pytest.raises(RuntimeError, match="crash on purpose"):
        _fit(pruning, callbacks=[pruning, Crash(7)])
    torch.save(pruning.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["applied_index"] == 0
    assert state["structure"]["changes"] == pruning.structure_changes
    assert set(state["taylor"]) == {"model.conv1.weight", "model.fc1.weight", "model.fc2.weight"}
    restored = _pruning(importance="taylor")
    restored.load_state_dict(state)
    assert restored.structure_changes == pruning.structure_changes
    assert restored.applied_index == 0


def test_frozen_layers_lose_channels_too() -> None:
    # a head-only fine-tune keeps the body frozen: no gradient, no taylor score, still removed
    module = TinyChannelModule()
    for param in module.model.conv1.parameters():
        param.requires_grad_(False)
    pruning = _pruning(importance="taylor")
    _fit(pruning, module)
    assert module.model.conv1.out_channels < 8
    assert isinstance(module.model.conv1.weight, nn.Parameter)
    assert not module.model.conv1.weight.requires_grad
