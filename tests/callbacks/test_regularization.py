"""SparsityRegularization: the term per phase, its strength per epoch, shrinking groups, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lightning_sparse.callbacks import SparsityRegularization
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule
from lightning_sparse.recipe import load
from tests.helpers import TinyData, TinyModule, TinyNet, fit_resumable, quiet_trainer

STEPS_PER_EPOCH = 10  # TinyData: 80 samples, batches of 8
KEY = "compression/SparsityRegularization"


class MemoryLogger(Logger):
    """Keeps every logged row, so tests read trajectories without files."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def per_epoch(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]


class Recording(SparsityRegularization):
    """Keeps (step, term, hand-computed term) for every training step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.terms: list[tuple[int, float, float]] = []

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        term = super().loss_term(trainer, pl_module, batch, outputs)
        self.terms.append(
            (trainer.global_step, float(term.detach()), self.by_hand(trainer, pl_module))
        )
        return term

    def by_hand(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        epoch = trainer.global_step / STEPS_PER_EPOCH
        # The schedule these tests use: start 1, ramp 1, end 3 (or as configured).
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            factor = 0.0
        elif self.ramp_epochs:
            factor = min(1.0, (epoch - self.start_epoch) / self.ramp_epochs)
        else:
            factor = 1.0
        total = 0.0
        for name in self.target_names:
            weight = pl_module.get_parameter(name).detach().double()
            rows = weight.reshape(weight.shape[0], -1)
            total += sum(math.sqrt(rows.shape[1]) * float(row.pow(2).sum().sqrt()) for row in rows)
        return self.strength * factor * total


def tiny_module(**kwargs: Any) -> ClassificationModule:
    return ClassificationModule(TinyNet(), num_classes=4, **kwargs)


def test_term_equals_hand_computation_in_every_phase_and_strength_per_epoch() -> None:
    torch.manual_seed(0)
    callback = Recording(
        strength=1e-3,
        start_epoch=1.0,
        ramp_epochs=1.0,
        end_epoch=3.0,
        params="re:model\\.(conv1|fc1)",
    )
    logger = MemoryLogger()
    trainer = quiet_trainer(max_epochs=4, callbacks=[callback], logger=logger)
    trainer.fit(tiny_module(), TinyData())
    assert callback.target_names == ["model.conv1.weight", "model.fc1.weight"]
    assert [step for step, _, _ in callback.terms] == list(range(40))
    for step, term, hand in callback.terms:
        assert term == pytest.approx(hand, rel=1e-5, abs=1e-12), step
    terms = {step: term for step, term, _ in callback.terms}
    # Off before start_epoch, ramping, held, off from end_epoch.
    assert all(terms[s] == 0 for s in range(0, 11))
    assert 0 < terms[11] < terms[15] < terms[19]
    assert all(terms[s] > 0 for s in range(20, 30))
    assert all(terms[s] == 0 for s in range(30, 40))
    # The strength per epoch is the epoch mean of the per-step strength.
    ramp_mean = sum(s / 10 for s in range(10)) / 10
    key = "compression/Recording"
    assert logger.per_epoch(f"{key}/strength") == pytest.approx([0.0, 1e-3 * ramp_mean, 1e-3, 0.0])
    assert len(logger.per_epoch(f"{key}/penalty/model.conv1.weight")) == 4
    assert len(logger.per_epoch(f"{key}/below_threshold/model.fc1.weight")) == 4


def below_per_epoch(strength: float | None) -> list[float]:
    torch.manual_seed(0)
    callbacks: list[pl.Callback] = []
    logger = MemoryLogger()
    # Measured by an instance whose strength is negligible when the run has no penalty.
    measure = SparsityRegularization(
        strength=strength or 1e-12, threshold=0.02, params="model.conv1.weight"
    )
    callbacks.append(measure)
    module = tiny_module(optimizer="sgd", lr=0.05)
    quiet_trainer(max_epochs=3, callbacks=callbacks, logger=logger).fit(module, TinyData())
    return logger.per_epoch(f"{KEY}/below_threshold/model.conv1.weight")


def test_group_lasso_drives_whole_channels_below_the_threshold() -> None:
    plain = below_per_epoch(None)
    regularized = below_per_epoch(0.1)
    assert plain[-1] == 0.0
    assert regularized[0] < regularized[-1]
    assert regularized[-1] >= 0.5


def test_resumed_run_adds_the_same_term_as_an_uninterrupted_one(tmp_path: Path) -> None:
    settings = {"strength": 1e-3, "ramp_epochs": 2.0, "params": "model.conv1.weight"}
    torch.manual_seed(0)
    whole = Recording(**settings)
    fit_resumable(tiny_module(), [whole], tmp_path / "a", crash_at=None, ckpt_path=None)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        fit_resumable(tiny_module(), [Recording(**settings)], tmp_path / "b", 13, None)
    torch.manual_seed(1)  # a fresh model: the weights come from the checkpoint
    resumed = Recording(**settings)
    checkpoint = str(tmp_path / "b" / "step=10.ckpt")
    fit_resumable(tiny_module(), [resumed], tmp_path / "c", crash_at=None, ckpt_path=checkpoint)
    expected = {step: term for step, term, _ in whole.terms}
    assert [step for step, _, _ in resumed.terms] == list(range(10, 30))
    for step, term, _ in resumed.terms:
        assert term == expected[step], step
    state = torch.load(checkpoint, weights_only=True)["callbacks"]["Recording"]
    assert state == {"version": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"penalty": "l2"}, "`penalty`='l2' is not allowed; choose one of"),
        ({"strength": 0.0}, "`strength`=0.0 is not allowed"),
        ({"params": []}, "`params`=\\[\\] is not allowed"),
        ({"groups": "rows"}, "`groups`='rows' is not allowed"),
        ({"ramp_epochs": -1}, "`ramp_epochs`=-1 is not allowed"),
        ({"threshold": -0.1}, "`threshold`=-0.1 is not allowed"),
        ({"start_epoch": 2, "end_epoch": 2}, "`end_epoch`=2 is not allowed"),
        ({"start_epoch": 1, "end_epoch": 2, "ramp_epochs": 2}, "`ramp_epochs`=2 runs past"),
    ],
)
def test_errors_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsityRegularization(**kwargs)


def test_setup_refuses_a_module_without_the_mixin_and_params_that_match_nothing() -> None:
    with pytest.raises(TypeError, match=r"does not mix in .*CompressionModule"):
        quiet_trainer(max_epochs=1, callbacks=[SparsityRegularization()]).fit(
            TinyModule(), TinyData()
        )
    with pytest.raises(ValueError, match=r"`params` entry 'model\.nope\.weight' matches no"):
        SparsityRegularization(params="model.nope.weight").check_model(tiny_module())
    with pytest.raises(ValueError, match="`end_epoch`=5 is past the trainer's max_epochs=2"):
        quiet_trainer(max_epochs=2, callbacks=[SparsityRegularization(end_epoch=5)]).fit(
            tiny_module(), TinyData()
        )


def test_recipe_sparsity_reg_regularizes_then_masks_whole_channels() -> None:
    callbacks = load(
        "sparsity_reg",
        [
            "recipe.pruning.start_epoch=1",
            "recipe.pruning.end_epoch=2",
            "recipe.regularization.ramp_epochs=0.5",
            "trainer.max_epochs=3",
        ],
    )
    regularization, pruning = callbacks
    assert regularization.end_epoch == pruning.start_epoch == 1.0
    torch.manual_seed(0)
    module = ClassificationModule(
        SmallCNN(in_channels=4, num_classes=4, width=4, input_size=4), num_classes=4
    )
    logger = MemoryLogger()
    quiet_trainer(max_epochs=3, callbacks=callbacks, logger=logger).fit(module, TinyData())
    strength = logger.per_epoch(f"{KEY}/strength")
    assert strength[0] > 0
    assert strength[1:] == [0.0, 0.0]
    for layer in ("conv1", "conv2", "fc1"):
        weight = module.get_parameter(f"model.{layer}.weight").detach()
        zero_rows = (weight.reshape(weight.shape[0], -1) == 0).all(dim=1)
        assert zero_rows.float().mean().item() == pytest.approx(0.5), layer
    assert (module.model.fc2.weight != 0).all()


class BnTerms(SparsityRegularization):
    """Keeps (step, term, strength * sum |gamma| of the BatchNorm scales the model holds)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(penalty="bn_scale", **kwargs)
        self.terms: list[tuple[int, float, float]] = []

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> torch.Tensor:
        term = super().loss_term(trainer, pl_module, batch, outputs)
        scales = [m.weight for m in pl_module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        by_hand = self.strength_at(trainer.global_step / STEPS_PER_EPOCH) * float(
            sum(s.detach().abs().sum() for s in scales)
        )
        self.terms.append((trainer.global_step, float(term.detach()), by_hand))
        return term


def test_penalty_follows_the_scales_a_channel_removal_replaces() -> None:
    from lightning_sparse.callbacks import ChannelPruning

    torch.manual_seed(0)
    regularization = BnTerms(strength=1e-2)
    channel = ChannelPruning(
        final_sparsity=0.5, start_epoch=1.0, end_epoch=1.0, importance="bn_scale"
    )
    model = SmallCNN(in_channels=4, num_classes=4, width=4, input_size=4, batch_norm=True)
    module = ClassificationModule(model, num_classes=4)
    quiet_trainer(max_epochs=2, callbacks=[regularization, channel]).fit(module, TinyData())
    assert model.bn2.num_features < 8  # channels were removed at epoch 1
    # The penalty acts on the parameters the model holds now, not on the cut-away ones ...
    for name in regularization.target_names:
        assert module.get_parameter(name) is regularization.follow_model(module)[name]
    assert len(regularization.terms) == 20
    for step, term, by_hand in regularization.terms:
        assert term == pytest.approx(by_hand, rel=1e-5), step
    # ... so its gradient still reaches them: with Adam every scale moves after the removal.
    before = model.bn2.weight.detach().clone()
    quiet_trainer(max_epochs=3, callbacks=[regularization]).fit(module, TinyData())
    assert (model.bn2.weight.detach() != before).all()


def _bn_module(**kwargs: Any) -> ClassificationModule:
    model = SmallCNN(in_channels=4, num_classes=4, width=4, input_size=4, batch_norm=True)
    return ClassificationModule(model, num_classes=4, **kwargs)


def test_a_penalty_phase_too_short_for_the_optimizer_is_warned_about() -> None:
    # Adam at lr 1e-3 for 15 steps (epochs 0.5-2): no |gamma| can move more than ~0.015
    torch.manual_seed(0)
    module = _bn_module(lr=1e-3)
    before = [
        m.weight.detach().clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    regularization = SparsityRegularization(penalty="bn_scale", strength=1e-2, start_epoch=0.5)
    with pytest.warns(
        UserWarning, match=r"in 15 optimizer steps \(epochs 0.5-2\) Adam .* at most 0.015"
    ):
        quiet_trainer(max_epochs=2, callbacks=[regularization]).fit(module, TinyData())
    after = [m.weight.detach() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    moved = max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))
    assert 0 < moved <= 0.015 + 1e-6  # the bound the warning states holds


def test_a_phase_long_enough_is_not_warned_about(recwarn: pytest.WarningsRecorder) -> None:
    torch.manual_seed(0)
    regularization = SparsityRegularization(penalty="bn_scale", strength=1e-2, start_epoch=0.5)
    quiet_trainer(max_epochs=2, callbacks=[regularization]).fit(_bn_module(lr=0.1), TinyData())
    assert not [w for w in recwarn if "cannot drive them" in str(w.message)]


def test_penalty_reach_per_optimizer() -> None:
    from lightning_sparse.core.regularization import penalty_reach

    weight = torch.nn.Parameter(torch.ones(3))
    other = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([{"params": [weight], "lr": 1e-3}, {"params": [other], "lr": 1.0}])
    # Adam: lr per step whatever the strength, from the group that holds the weight
    assert penalty_reach(adam, [weight], 100, strength=5.0) == pytest.approx(0.1)
    sgd = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    assert penalty_reach(sgd, [weight], 100, strength=1e-3) == pytest.approx(0.1)
    assert penalty_reach(torch.optim.SGD([weight], lr=0.1), [weight], 100, 1e-3) == pytest.approx(
        0.01
    )
    assert penalty_reach(torch.optim.LBFGS([weight]), [weight], 100, 1e-3) is None
    assert penalty_reach(torch.optim.SGD([other], lr=0.1), [weight], 100, 1e-3) is None
