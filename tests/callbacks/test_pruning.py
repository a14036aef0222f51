from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse import ConstantPruning, MagnitudePruning
from lightning_sparse.callbacks.base import fractional_epoch
from tests.helpers import TinyData, TinyModule, TinyNet, fit_resumable, quiet_trainer

# TinyData: 80 samples, batch 8 -> 10 batches per epoch.


class Recorder(pl.Callback):
    """Records, after every optimizer step, the clock and the sparsity of the pruned weights."""

    def __init__(self, pruning: MagnitudePruning | ConstantPruning) -> None:
        self.pruning = pruning
        self.steps: list[tuple[int, float, float]] = []
        self.per_layer: list[dict[str, float]] = []
        self.epoch_sparsity: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append(
            (trainer.global_step, fractional_epoch(trainer), self.pruning.overall_sparsity())
        )
        self.per_layer.append(self.pruning.sparsity_per_layer())
        # after every step every pruned weight is exactly zero, while the masks are enforced
        enforced = self.pruning.masks if self.pruning.enforcing(trainer) else {}
        for name, mask in enforced.items():
            weight = self.pruning.targets[name]
            assert (weight[~mask] == 0).all(), f"{name} regrew at step {trainer.global_step}"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_sparsity.append(self.pruning.overall_sparsity())


def _fit(
    pruning: MagnitudePruning | ConstantPruning,
    module: pl.LightningModule | None = None,
    **trainer_kwargs: Any,
) -> Recorder:
    pl.seed_everything(0)
    recorder = Recorder(pruning)
    trainer_kwargs.setdefault("max_epochs", 5)
    trainer = quiet_trainer(callbacks=[pruning, recorder], **trainer_kwargs)
    trainer.fit(module or TinyModule(), TinyData())
    return recorder


@pytest.mark.parametrize("inter_func", ["linear", "cubic", "inverse_cubic"])
def test_sparsity_per_epoch_follows_the_schedule(inter_func: str) -> None:
    pruning = MagnitudePruning(
        final_sparsity=0.8, start_epoch=1, end_epoch=4, update_frequency=1, inter_func=inter_func
    )
    recorder = _fit(pruning)
    # the update due at epoch e is applied after the optimizer step that completes epoch e
    expected = [pruning.schedule.sparsity_at(epoch) for epoch in (1, 2, 3, 4, 5)]
    assert recorder.epoch_sparsity == pytest.approx(expected, abs=2e-3)
    assert recorder.epoch_sparsity[-1] == pytest.approx(0.8, abs=2e-3)


@pytest.mark.parametrize(
    ("mask_type", "params"),
    [
        ("unstructured", "__ALL_PRUNABLE__"),
        ("channel", "__ALL_PRUNABLE__"),
        ("block4", ["re:model\\.fc"]),
        ("2:4", ["model.conv1.weight", "re:model\\.fc"]),
    ],
)
def test_every_target_has_its_scheduled_sparsity_after_each_update(
    mask_type: str, params: Any
) -> None:
    pruning = MagnitudePruning(
        final_sparsity=0.5,
        init_sparsity=0.1,
        start_epoch=0,
        end_epoch=2,
        update_frequency=0.5,
        mask_type=mask_type,
        params=params,
    )
    recorder = _fit(pruning, max_epochs=3)
    assert len(recorder.per_layer) == 30
    for (step, epoch, _), per_layer in zip(recorder.steps, recorder.per_layer, strict=False):
        target = pruning.schedule.sparsity_at(epoch)
        for name, sparsity in per_layer.items():
            weight = pruning.targets[name]
            # groups are exact by construction; one group is the only slack
            granularity = {"channel": weight[0].numel(), "block4": 4}.get(mask_type, 1)
            error = abs(sparsity * weight.numel() - round(target * weight.numel()))
            assert error <= granularity, (step, name, sparsity, target)
    # the trajectory rises along the updates and never falls
    sparsities = [s for _, _, s in recorder.steps]
    assert sparsities == sorted(sparsities)
    assert sparsities[0] == pytest.approx(0.1, abs=0.02)  # init_sparsity at start_epoch=0
    assert sparsities[-1] == pytest.approx(0.5, abs=0.02)


def test_clock_counts_optimizer_steps_under_accumulation_and_limits() -> None:
    # 10 batches, limit 0.7 -> 7 batches, accumulate 3 -> steps after batches 3, 6, 7: 3 per epoch
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=1, end_epoch=1, update_frequency=1)
    recorder = _fit(pruning, max_epochs=2, limit_train_batches=0.7, accumulate_grad_batches=3)
    first_pruned = next(step for step, _, sparsity in recorder.steps if sparsity > 0)
    assert first_pruned == 3
    assert recorder.steps[-1][:2] == (6, pytest.approx(2.0))


def test_clock_with_max_steps() -> None:
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0.5, end_epoch=1.5, update_frequency=0.5
    )
    recorder = _fit(pruning, max_epochs=-1, max_steps=15)
    # steps 5, 10, 15 are epochs 0.5, 1.0, 1.5; the final target arrives at step 15
    sparsity_at = {step: sparsity for step, _, sparsity in recorder.steps}
    assert sparsity_at[4] == 0.0
    assert sparsity_at[5] == pytest.approx(0.0, abs=1e-3)  # init_sparsity 0 at start_epoch
    assert sparsity_at[10] == pytest.approx(pruning.schedule.sparsity_at(1.0), abs=2e-3)
    assert sparsity_at[15] == pytest.approx(0.5, abs=2e-3)


def test_schedule_past_max_steps_is_refused_before_the_first_step() -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=2)
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"`end_epoch`=2 is 20 optimizer steps, past the trainer's max_steps=15"
    ):
        _fit(pruning, module, max_epochs=-1, max_steps=15)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_schedule_past_max_epochs_is_refused_before_training() -> None:
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"`end_epoch`=6 is past the trainer's max_epochs=5"):
        _fit(MagnitudePruning(final_sparsity=0.5, end_epoch=6), module, max_epochs=5)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_params_matching_nothing_list_candidates_at_setup() -> None:
    with pytest.raises(
        ValueError, match=r"'model.fc9.weight' matches no .* Candidates: model.conv1"
    ):
        _fit(MagnitudePruning(final_sparsity=0.5, end_epoch=1, params=["model.fc9.weight"]))


def test_n_of_m_that_does_not_tile_a_layer_is_refused_at_setup() -> None:
    class OddNet(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.model.fc2 = torch.nn.Linear(30, 4)
            self.model.fc1 = torch.nn.Linear(128, 30)

    with pytest.raises(
        ValueError, match=r"`model.fc2.weight` has input dimension 30 .* not divisible by 4"
    ):
        _fit(MagnitudePruning(final_sparsity=0.5, end_epoch=1, mask_type="2:4"), OddNet())


def test_channel_masks_leave_the_output_layer_whole() -> None:
    # Zeroing a row of the classifier head would remove a class: channel masks pass over it.
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, update_frequency=1, mask_type="channel"
    )
    module = TinyModule()
    _fit(pruning, module, max_epochs=2)
    assert pruning.target_names == ["model.conv1.weight", "model.fc1.weight"]
    head = module.model.fc2.weight
    assert bool((head.abs().sum(dim=1) > 0).all())
    assert pruning.overall_sparsity() == pytest.approx(0.5, abs=0.02)
    # another head can be named; unstructured masks still prune the last layer
    named = MagnitudePruning(final_sparsity=0.5, end_epoch=1, mask_type="channel", head="model.fc1")
    assert list(named.resolve_targets(TinyModule())) == ["model.conv1.weight", "model.fc2.weight"]
    unstructured = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    assert "model.fc2.weight" in unstructured.resolve_targets(TinyModule())


def test_naming_the_output_layer_for_channel_masks_is_an_error_naming_it() -> None:
    pruning = MagnitudePruning(
        final_sparsity=0.5, end_epoch=1, mask_type="channel", params=["model.fc2.weight"]
    )
    with pytest.raises(
        ValueError, match=r"`params` entry 'model.fc2.weight' is the model's output"
    ):
        _fit(pruning)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_sparsity": 1.0}, r"`final_sparsity`=1.0 is not allowed; it must be in \[0, 1\)"),
        ({"final_sparsity": -0.1}, r"`final_sparsity`=-0.1 is not allowed"),
        # `=abc` on a command line: say what it is, not only where numbers should be.
        ({"final_sparsity": "abc"}, r"`final_sparsity`='abc' is not a number; it must be in"),
        (
            {"final_sparsity": 0.5, "start_epoch": "x"},
            r"`start_epoch`='x' is not a number; it must be a number >= 0",
        ),
        (
            {"final_sparsity": 0.5, "update_frequency": "often"},
            r"`update_frequency`='often' is not a number",
        ),
        (
            {"final_sparsity": 0.5, "init_sparsity": 0.7},
            r"`init_sparsity`=0.7 is greater than `final_sparsity`=0.5",
        ),
        (
            {"final_sparsity": 0.5, "start_epoch": 3, "end_epoch": 2},
            r"`end_epoch`=2 is before `start_epoch`=3",
        ),
        (
            {"final_sparsity": 0.5, "start_epoch": -1},
            r"`start_epoch`=-1 is not allowed; it must be a number >= 0",
        ),
        (
            {"final_sparsity": 0.5, "update_frequency": 0},
            r"`update_frequency`=0 is not allowed; it must be > 0",
        ),
        (
            {"final_sparsity": 0.5, "inter_func": "exp"},
            r"`inter_func`='exp' is not allowed; choose one of "
            r"\['cubic', 'inverse_cubic', 'linear'\]",
        ),
        (
            {"final_sparsity": 0.5, "mask_type": "3x3"},
            r"`mask_type`='3x3' is not a mask type; allowed:",
        ),
        (
            {"final_sparsity": 0.9, "mask_type": "2:4"},
            r"`final_sparsity`=0.9 is more than `mask_type`='2:4' can hold: at most 0.5",
        ),
        ({"final_sparsity": 0.5, "params": []}, r"`params` is empty"),
        ({"final_sparsity": 0.5, "params": [3]}, r"`params`=\[3\] must be a parameter name"),
        ({"final_sparsity": 0.5, "name": ""}, r"`name`='' must be a non-empty string"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


def test_leave_enabled_false_lets_weights_regrow_after_end_epoch() -> None:
    pruning = MagnitudePruning(final_sparsity=0.7, start_epoch=0, end_epoch=2, leave_enabled=False)
    pruning_recorder = _fit(pruning, max_epochs=4)
    assert pruning_recorder.epoch_sparsity[1] == pytest.approx(0.7, abs=2e-3)
    assert pruning_recorder.epoch_sparsity[-1] < 0.1


def test_pruned_checkpoint_loads_into_the_plain_model(tmp_path: Path) -> None:
    pl.seed_everything(0)
    pruning = MagnitudePruning(final_sparsity=0.75, start_epoch=0, end_epoch=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[pruning, checkpoint], enable_checkpointing=True
    )
    trainer.fit(TinyModule(), TinyData())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}
    plain = TinyNet()
    plain.load_state_dict(state, strict=True)
    assert (plain.fc1.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1e-3)
    callback_state = saved["callbacks"]["MagnitudePruning"]
    assert callback_state["applied_index"] == pruning.schedule.num_updates - 1
    assert set(callback_state["masks"]) == set(pruning.target_names)
    assert all(m.dtype == torch.bool for m in callback_state["masks"].values())


def _resume_run(tmp_path: Path, crash_at: int | None, ckpt_path: str | None) -> torch.nn.Module:
    pl.seed_everything(0)
    module = TinyModule()
    pruning = MagnitudePruning(
        final_sparsity=0.8, start_epoch=0.5, end_epoch=3.5, update_frequency=0.5
    )
    callbacks: list[pl.Callback] = [
        pruning,
    ]
    fit_resumable(module, callbacks, tmp_path, crash_at, ckpt_path, max_epochs=5)
    return module


@pytest.mark.parametrize("resume_step", [15, 20])  # mid-epoch (1.5) and an epoch boundary
def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path: Path, resume_step: int) -> None:
    reference = _resume_run(tmp_path / "ref", None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        _resume_run(tmp_path / "crashed", resume_step + 2, None)
    resumed = _resume_run(
        tmp_path / "resumed", None, str(tmp_path / "crashed" / f"step={resume_step}.ckpt")
    )
    for (name, expected), actual in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=False
    ):
        assert torch.equal(expected, actual), name


def test_constant_pruning_holds_existing_zeros_to_the_element() -> None:
    pl.seed_everything(0)
    module = TinyModule()
    with torch.no_grad():
        for param in (module.model.conv1.weight, module.model.fc1.weight):
            param[torch.rand_like(param) < 0.6] = 0.0
    zeros_before = {n: p == 0 for n, p in module.named_parameters() if n.endswith("weight")}
    holding = ConstantPruning(params=["model.conv1.weight", "re:model\\.fc1"])
    _fit(holding, module, max_epochs=3)
    for name in holding.target_names:
        assert torch.equal(dict(module.named_parameters())[name] == 0, zeros_before[name]), name
    # fc2 was not held: its weights trained freely
    assert not (module.model.fc2.weight == 0).any()


def test_two_named_instances_coexist_in_one_checkpoint(tmp_path: Path) -> None:
    convs = MagnitudePruning(
        final_sparsity=0.5, end_epoch=1, params=["re:model\\.conv"], name="convs"
    )
    linears = MagnitudePruning(
        final_sparsity=0.9, end_epoch=1, params=["re:model\\.fc"], name="linears"
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[convs, linears, checkpoint], enable_checkpointing=True
    )
    trainer.fit(TinyModule(), TinyData())
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert set(states) >= {"MagnitudePruning[convs]", "MagnitudePruning[linears]"}
    assert list(states["MagnitudePruning[convs]"]["masks"]) == ["model.conv1.weight"]
    assert convs.overall_sparsity() == pytest.approx(0.5, abs=1e-2)
    assert linears.overall_sparsity() == pytest.approx(0.9, abs=1e-3)


def test_sparsity_and_target_are_logged_per_epoch(tmp_path: Path) -> None:
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=2, update_frequency=1)
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[pruning], logger=CSVLogger(tmp_path, name="csv")
    )
    trainer.fit(TinyModule(), TinyData())
    lines = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
    overall = [float(r["compression/MagnitudePruning/sparsity"]) for r in rows]
    target = [float(r["compression/MagnitudePruning/target_sparsity"]) for r in rows]
    assert target == pytest.approx([pruning.schedule.sparsity_at(e) for e in (1, 2, 3)])
    assert overall == pytest.approx(target, abs=2e-3)
    assert "compression/MagnitudePruning/sparsity/model.fc1.weight" in header


def test_sharding_strategies_are_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_sparse.callbacks.base import check_strategy

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(ValueError, match="MagnitudePruning does not support strategy FSDPStrategy"):
        check_strategy(FakeTrainer(), "MagnitudePruning")  # type: ignore[arg-type]


def test_fast_dev_run_smoke_tests_a_long_schedule() -> None:
    pruning = MagnitudePruning(final_sparsity=0.9, start_epoch=0, end_epoch=15)
    recorder = _fit(pruning, fast_dev_run=2)
    # fast_dev_run=2 limits an epoch to 2 batches: two steps are one epoch of the schedule
    assert [epoch for _, epoch, _ in recorder.steps] == [0.5, 1.0]
    assert pruning.applied_sparsity == pytest.approx(pruning.schedule.sparsity_at(1.0))
    assert 0 < recorder.steps[-1][2] < 0.9


class _WithUnknownLayer(TinyModule):
    """TinyModule plus a layer type nobody registered (a raw 2-D parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Module()
        self.extra.kernel = torch.nn.Parameter(torch.randn(4, 4))


def test_all_prunable_says_which_weights_of_unknown_types_it_leaves_dense() -> None:
    module = _WithUnknownLayer()
    callback = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1)
    with pytest.warns(UserWarning, match=r"leaves 1 weights dense .*extra\.kernel"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, datamodule=TinyData())
    assert "extra.kernel" not in callback.target_names
    assert bool((module.extra.kernel != 0).all())
