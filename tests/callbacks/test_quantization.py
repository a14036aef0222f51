from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_sparse.callbacks import MagnitudePruning, QuantizationAwareTraining
from lightning_sparse.callbacks.base import check_timing, fractional_epoch
from lightning_sparse.callbacks.quantization import select_layers
from lightning_sparse.core.fake_quant import quantized_layers
from lightning_sparse.data import SyntheticDataModule
from lightning_sparse.posttrain.ptq import ptq, ptq_calibrate
from tests.helpers import (
    TinyData,
    TinyModule,
    TinyNet,
    fit_resumable,
    quiet_trainer,
    run_ddp_script,
)

# TinyData: 80 samples, batch 8 -> 10 optimizer steps per epoch.


class BNNet(TinyNet):
    """TinyNet with a BatchNorm after its conv, to freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class BNModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = BNNet()


class PhaseRecorder(pl.Callback):
    """Records, for every training batch, the clock and the phase the forward ran in."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat = qat
        self.rows: list[tuple[float, bool, bool, bool]] = []
        self.bn_training: list[bool] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        # the step has been taken: the batch ran at the clock before it
        epoch = (trainer.global_step - 1) / 10
        self.rows.append(
            (
                epoch,
                self.qat.fake_quant_enabled,
                self.qat.observer_enabled,
                self.qat.bn_stats_frozen,
            )
        )
        bns = [m for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)]
        self.bn_training.append(any(m.training for m in bns))


def _fit(
    callbacks: list[pl.Callback], module: pl.LightningModule | None = None, **kwargs: Any
) -> pl.LightningModule:
    pl.seed_everything(0)
    module = module or TinyModule()
    kwargs.setdefault("max_epochs", 4)
    quiet_trainer(callbacks=callbacks, **kwargs).fit(module, TinyData())
    return module


def test_phases_follow_the_fractional_epoch_clock_batch_by_batch() -> None:
    qat = QuantizationAwareTraining(
        start_epoch=1.5, disable_quantization_observer_epoch=2.5, freeze_bn_stats_epoch=3
    )
    recorder = PhaseRecorder(qat)
    module = _fit([qat, recorder], BNModule())
    assert len(recorder.rows) == 40
    for epoch, *phase in recorder.rows:
        assert tuple(phase) == qat.phase_at(epoch), epoch
    assert [row[1] for row in recorder.rows].index(True) == 15  # step 15 = epoch 1.5
    assert [row[2] for row in recorder.rows].count(True) == 10  # epochs 1.5 .. 2.5
    assert recorder.bn_training == [epoch < 3 for epoch, *_ in recorder.rows]
    assert qat.layer_names == ["model.conv1", "model.fc1", "model.fc2"]
    assert isinstance(module.model.conv1, nn.Conv2d)


def test_frozen_bn_statistics_and_scales_stop_moving() -> None:
    qat = QuantizationAwareTraining(
        start_epoch=0, disable_quantization_observer_epoch=1, freeze_bn_stats_epoch=1
    )
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            bn = pl_module.model.bn1
            state = qat.quantized.layers["model.fc1"]  # type: ignore[union-attr]
            snapshots[trainer.current_epoch] = {
                "mean": bn.running_mean.clone(),
                "scale": state.weight_scale.clone(),
                "input_max": state.input_max.clone(),
            }

    _fit([qat, Snapshot()], BNModule(), max_epochs=3)
    # epoch 0 moved them away from their initial values; from epoch 1 on they hold still
    assert not torch.equal(snapshots[0]["mean"], torch.zeros(8))
    assert snapshots[0]["input_max"] > 0
    for key in ("mean", "scale", "input_max"):
        assert torch.equal(snapshots[0][key], snapshots[1][key]), key
        assert torch.equal(snapshots[1][key], snapshots[2][key]), key


def test_phase_flags_are_logged_per_epoch(tmp_path: Path) -> None:
    qat = QuantizationAwareTraining(start_epoch=1, disable_quantization_observer_epoch=2)
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[qat], logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(TinyModule(), TinyData())
    lines = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
    prefix = "compression/QuantizationAwareTraining"
    assert [float(r[f"{prefix}/fake_quant_enabled"]) for r in rows] == [0.0, 1.0, 1.0]
    assert [float(r[f"{prefix}/observer_enabled"]) for r in rows] == [0.0, 1.0, 0.0]
    assert [float(r[f"{prefix}/bn_stats_frozen"]) for r in rows] == [0.0, 0.0, 0.0]


def test_composes_with_pruning_masks_hold_and_zeros_survive_quantization(tmp_path: Path) -> None:
    pruning = MagnitudePruning(final_sparsity=0.8, start_epoch=0, end_epoch=2, update_frequency=0.5)
    qat = QuantizationAwareTraining(start_epoch=1, disable_quantization_observer_epoch=3)

    class ZerosHold(pl.Callback):
        checked = 0

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            if not qat.fake_quant_enabled:
                return
            for name, mask in pruning.masks.items():
                layer = qat.quantized.layers[name.removesuffix(".weight")]  # type: ignore[union-attr]
                weight = layer.module.weight
                assert (weight[~mask] == 0).all(), name
                assert (layer.quantize_weight(weight)[~mask] == 0).all(), name
                assert (layer.integer_weight()[~mask] == 0).all(), name
            self.checked += 1

    holds = ZerosHold()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = _fit([pruning, qat, holds, checkpoint], enable_checkpointing=True)
    assert holds.checked == 30
    assert pruning.overall_sparsity() == pytest.approx(0.8, abs=2e-3)
    # parameter names never changed: the checkpoint loads into the plain network
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    plain = TinyNet()
    plain.load_state_dict(
        {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}, strict=True
    )
    state = saved["callbacks"]["QuantizationAwareTraining"]["quantization"]
    assert set(state["layers"]) == {"model.conv1", "model.fc1", "model.fc2"}
    assert list(module.state_dict()) == [f"model.{k}" for k in TinyNet().state_dict()]


def _qat_run(
    tmp_path: Path, crash_at: int | None, ckpt_path: str | None
) -> tuple[pl.LightningModule, QuantizationAwareTraining]:
    pl.seed_everything(0)
    module = TinyModule()
    qat = QuantizationAwareTraining(start_epoch=0.5, disable_quantization_observer_epoch=2.5)
    callbacks: list[pl.Callback] = [
        MagnitudePruning(final_sparsity=0.7, start_epoch=0, end_epoch=1, update_frequency=0.5),
        qat,
    ]
    fit_resumable(module, callbacks, tmp_path, crash_at, ckpt_path)
    return module, qat


@pytest.mark.parametrize("resume_step", [15, 25])  # observers on (1.5), then frozen (2.5)
def test_resume_mid_qat_restores_weights_and_scales_exactly(
    tmp_path: Path, resume_step: int
) -> None:
    reference, ref_qat = _qat_run(tmp_path / "ref", None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        _qat_run(tmp_path / "crashed", resume_step + 2, None)
    checkpoint = tmp_path / "crashed" / f"step={resume_step}.ckpt"
    assert torch.load(checkpoint, weights_only=True)["callbacks"]["QuantizationAwareTraining"]
    resumed, qat = _qat_run(tmp_path / "resumed", None, str(checkpoint))
    for (name, expected), actual in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name
    expected_state = ref_qat.state_dict()["quantization"]["layers"]
    for layer, values in qat.state_dict()["quantization"]["layers"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, expected_state[layer][key]), (layer, key)
            else:
                assert value == expected_state[layer][key], (layer, key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_epoch": -1}, r"`start_epoch`=-1 is not allowed; it must be a number >= 0"),
        ({"start_epoch": "1"}, r"`start_epoch`='1' is not a number; it must be a number >= 0"),
        (
            {"start_epoch": 2, "freeze_bn_stats_epoch": 1},
            r"`freeze_bn_stats_epoch`=1 is not allowed; it must be null or a number >= "
            r"`start_epoch`=2",
        ),
        (
            {"start_epoch": 2, "disable_quantization_observer_epoch": 2},
            r"`disable_quantization_observer_epoch`=2 is not after `start_epoch`=2",
        ),
        (
            {"num_bits": 16},
            r"`num_bits`=16 is not allowed; weights can be quantized to 8 or 4 bits",
        ),
        ({"num_bits": True}, r"`num_bits`=True is not allowed"),
        ({"symmetric": "yes"}, r"`symmetric`='yes' is not allowed; it must be true or false"),
        ({"per_channel": 1}, r"`per_channel`=1 is not allowed"),
        ({"ignore": [3]}, r"`ignore`=\[3\] is not allowed; give a list of layer names"),
        ({"exclude_first_last": "no"}, r"`exclude_first_last`='no' is not allowed"),
        ({"name": ""}, r"`name`='' must be a non-empty string"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_a_model_without_supported_layers_is_refused_at_setup() -> None:
    class NormOnly(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.LayerNorm(64))  # type: ignore[assignment]
            self.head = nn.Parameter(torch.zeros(64, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x) @ self.head

    with pytest.raises(ValueError, match=r"NormOnly has no layer that quantization supports"):
        _fit([QuantizationAwareTraining()], NormOnly())


def test_an_ignore_entry_matching_nothing_lists_the_layers() -> None:
    with pytest.raises(
        ValueError,
        match=r"`ignore` entry 'model.fc9' matches no quantizable layer by name or type. "
        r"Layers: model.conv1, model.fc1, model.fc2; types: Conv2d, Linear",
    ):
        _fit([QuantizationAwareTraining(ignore=["model.fc9"])])


def test_ignore_leaving_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"leave no layer to quantize"):
        select_layers(TinyModule(), ["Linear"], exclude_first_last=True)


@pytest.mark.parametrize(
    ("ignore", "exclude_first_last", "expected"),
    [
        ([], False, ["model.conv1", "model.fc1", "model.fc2"]),
        (["Linear"], False, ["model.conv1"]),
        (["model.fc2"], False, ["model.conv1", "model.fc1"]),
        (["re:model\\.fc"], False, ["model.conv1"]),
        (["model"], True, None),
        ([], True, ["model.fc1"]),
    ],
)
def test_ignore_and_exclude_first_last_select_layers(
    ignore: list[str], exclude_first_last: bool, expected: list[str] | None
) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="leave no layer"):
            select_layers(TinyModule(), ignore, exclude_first_last)
    else:
        assert select_layers(TinyModule(), ignore, exclude_first_last) == expected


def test_start_epoch_at_max_epochs_is_refused_at_setup() -> None:
    with pytest.raises(
        ValueError, match=r"`start_epoch`=4 is not before the trainer's max_epochs=4"
    ):
        _fit([QuantizationAwareTraining(start_epoch=4)])


def test_observers_frozen_while_pruning_goes_on_are_refused() -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=3)
    qat = QuantizationAwareTraining(start_epoch=1, disable_quantization_observer_epoch=2)
    message = (
        r"recipe.quantization.disable_quantization_observer_epoch=2 comes before "
        r"recipe.pruning.end_epoch=3, while recipe.pruning still changes the weights"
    )
    with pytest.raises(ValueError, match=message):
        check_timing({"recipe.pruning": pruning, "recipe.quantization": qat})
    # the same check guards plain-Python use, before any step
    with pytest.raises(ValueError, match=r"QuantizationAwareTraining.disable_quantization"):
        _fit([pruning, qat])
    # QAT that starts when pruning ends, or keeps observing past its end, is fine
    check_timing(
        {
            "p": pruning,
            "q1": QuantizationAwareTraining(start_epoch=3, disable_quantization_observer_epoch=4),
            "q2": QuantizationAwareTraining(start_epoch=1, disable_quantization_observer_epoch=3),
            "q3": QuantizationAwareTraining(start_epoch=1),
        }
    )


def test_ptq_calibrates_without_training() -> None:
    pl.seed_everything(0)
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    datamodule = SyntheticDataModule(
        num_classes=4, input_shape=(4, 4, 4), train_size=64, batch_size=8
    )
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    module.model.conv1.register_forward_pre_hook(count)
    handle = ptq(module, datamodule, num_batches=3, ignore=["model.fc2"])
    assert calls == 3
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert list(handle.layers) == ["model.conv1", "model.fc1"]
    assert handle.fake_quant_enabled
    assert not handle.observer_enabled
    assert all(q.input_observed for q in handle.layers.values())
    assert module.training  # given back in the mode it came in
    with pytest.raises(ValueError, match=r"ptq: layer 'model.conv1' is quantized already"):
        ptq(module, datamodule, num_batches=1)
    # the core takes any batches; none is an error that leaves the model as it was
    fresh = TinyModule()
    with pytest.raises(ValueError, match=r"saw no input in 0 calibration batches \(no calibration"):
        ptq_calibrate(fresh, [])
    assert quantized_layers(fresh) == {}
    handle = ptq_calibrate(fresh, [torch.randn(8, 4, 4, 4)], num_bits=4)
    assert handle.spec.num_bits == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_batches": 0}, r"`num_batches`=0 is not allowed; it must be an int >= 1"),
        ({"num_batches": 2, "num_bits": 2}, r"`num_bits`=2 is not allowed"),
        ({"num_batches": 2, "ignore": ["nope"]}, r"`ignore` entry 'nope' matches no quantizable"),
    ],
)
def test_ptq_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    datamodule = SyntheticDataModule(num_classes=4, input_shape=(4, 4, 4), train_size=16)
    with pytest.raises(ValueError, match=message):
        ptq(TinyModule(), datamodule, **kwargs)


def test_fractional_epoch_clock_is_the_one_pruning_uses() -> None:
    # the phase is a pure function of the clock both techniques share
    qat = QuantizationAwareTraining(start_epoch=0.25)
    seen: list[tuple[float, bool]] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            seen.append((fractional_epoch(trainer), qat.fake_quant_enabled))

    _fit([qat, Clock()], max_epochs=1, accumulate_grad_batches=2)
    # 10 batches, 5 optimizer steps per epoch: QAT starts after the second step (epoch 0.4)
    assert [on for _, on in seen] == [False] * 4 + [True] * 6


@pytest.mark.slow
def test_ddp_ranks_hold_identical_weights_and_scales(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.callbacks.ddp_quantization_script", tmp_path)
    # 40 samples per rank, batch 8: 5 steps per epoch; QAT from step 2 to the end (8 steps)
    assert len(rank0["history"]) == len(rank1["history"]) == 8
    for step, (ranges0, ranges1) in enumerate(zip(rank0["history"], rank1["history"], strict=True)):
        assert torch.equal(ranges0, ranges1), step  # each rank saw its own shard, then they synced
    for name, weight in rank0["final"].items():
        assert torch.equal(weight, rank1["final"][name]), name
    for layer, state in rank0["quantization"]["layers"].items():
        for key, value in state.items():
            other = rank1["quantization"]["layers"][layer][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
