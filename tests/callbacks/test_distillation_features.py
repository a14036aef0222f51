"""Feature distillation: named layers, learned projections, resume, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse import KnowledgeDistillation
from lightning_sparse.callbacks import MagnitudePruning
from lightning_sparse.callbacks.distillation import _projection_dim, feature_loss
from lightning_sparse.run.recipe import RecipeError, check_against_model, instantiate_recipe
from tests.callbacks.test_distillation import DistilModule
from tests.helpers import TinyData, TinyNet, fit_resumable, quiet_trainer, run_ddp_script

# TinyData: 80 samples, batch 8 -> 10 optimizer steps per epoch.
KEY = "KnowledgeDistillation"


def seeded_teacher(width: int = 16, seed: int = 7) -> TinyNet:
    """A TinyNet whose weights depend only on ``seed`` (a teacher_model that brings its weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyNet(width=width)


def _wide_kd(**kwargs: Any) -> KnowledgeDistillation:
    options: dict[str, Any] = {
        "teacher": None,
        "teacher_model": {"_target_": "tests.callbacks.test_distillation_features.seeded_teacher"},
        "features": {"model.conv1": "conv1", "model.fc1": "fc1"},
        "hardness": 0.5,
    }
    options.update(kwargs)
    return KnowledgeDistillation(**options)


def test_feature_loss_is_the_relative_squared_error() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, 5, 5, generator=generator)
    teacher = torch.randn(4, 3, 5, 5, generator=generator)
    expected = ((student - teacher) ** 2).sum() / (teacher**2).sum()
    torch.testing.assert_close(feature_loss(student, teacher), expected)
    # Scale-free: a layer with 100x larger activations weighs the same.
    torch.testing.assert_close(feature_loss(100 * student, 100 * teacher), expected)
    assert float(feature_loss(teacher, teacher)) == 0.0


def test_projection_maps_the_one_dimension_that_differs() -> None:
    assert _projection_dim(torch.Size([8, 4, 5, 5]), torch.Size([8, 4, 5, 5])) is None
    assert _projection_dim(torch.Size([8, 4, 5, 5]), torch.Size([8, 16, 5, 5])) == 1
    assert _projection_dim(torch.Size([8, 10, 32]), torch.Size([8, 10, 64])) == 2
    with pytest.raises(ValueError, match=r"differ in more than one dimension"):
        _projection_dim(torch.Size([8, 4, 5, 5]), torch.Size([8, 16, 3, 3]))


class FeatureRecorder(pl.Callback):
    """Per step: the term the callback gives and the same term from the layers by hand."""

    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.rows: list[tuple[float, float]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x = batch[0]
        with torch.no_grad():
            term = self.kd.loss_term(trainer, pl_module, batch, pl_module(x))
            teacher = self.kd.teacher
            assert isinstance(teacher, TinyNet)
            student_conv = pl_module.model.conv1(x)
            projected = self.kd.projections["model.conv1"](student_conv)
            expected = (
                feature_loss(projected, teacher.conv1(x))
                + feature_loss(
                    pl_module.model.fc1(torch.relu(student_conv).flatten(1)),
                    teacher.fc1(torch.relu(teacher.conv1(x)).flatten(1)),
                )
            ) / 2
        self.rows.append((float(term), float(expected)))


def test_features_only_term_matches_the_layers_and_trains_the_projection(tmp_path: Path) -> None:
    pl.seed_everything(0)
    kd = _wide_kd(hardness=0.0)  # features only: the term is exactly the feature term
    recorder = FeatureRecorder(kd)
    module = DistilModule()
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[kd, recorder], logger=CSVLogger(tmp_path, name="", version="")
    )
    start: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            if not start:  # after the first step, once the projection exists
                start.update({k: v.weight.detach().clone() for k, v in kd.projections.items()})

    trainer.callbacks.append(Snapshot())  # type: ignore[attr-defined]
    trainer.fit(module, TinyData())

    # conv1: 8 student channels -> 16 teacher channels; fc1 has the same width (32): no projection.
    assert set(kd.projections) == {"model.conv1"}
    weight = kd.projections["model.conv1"].weight
    assert weight.shape == (16, 8)
    assert not torch.equal(weight, start["model.conv1"])  # learned
    # The projection belongs to the callback: not in the model, its checkpoint or its optimizer.
    assert not any("proj" in key for key in module.state_dict())
    model_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(weight) not in model_params
    # The term the callback adds is the hand-computed mean over the two layers, every step.
    assert len(recorder.rows) == 30
    for term, expected in recorder.rows[1:]:  # step 0 builds the projection inside loss_term
        assert term == pytest.approx(expected, rel=1e-5)
    # Student and projection learn the teacher's features: the term falls epoch by epoch.
    metrics = _epoch_metrics(tmp_path / "metrics.csv")
    feature = [row[f"compression/{KEY}/feature_loss"] for row in metrics]
    assert feature[0] > feature[1] > feature[2]
    assert all(row[f"compression/{KEY}/logit_loss"] == 0.0 for row in metrics)
    # No hook is left on the model after fit.
    assert all(not layer._forward_hooks for layer in module.modules())


def _epoch_metrics(path: Path) -> list[dict[str, float]]:
    import csv

    with path.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(f"compression/{KEY}/loss")]
    return [{k: float(v) for k, v in row.items() if v} for row in rows]


def test_self_teacher_features_on_a_pruned_student() -> None:
    pl.seed_everything(0)
    kd = KnowledgeDistillation(teacher="self", start_epoch=1.0, features=["model.conv1"])
    pruning = MagnitudePruning(final_sparsity=0.8, start_epoch=1, end_epoch=2, update_frequency=0.5)
    module = DistilModule()
    quiet_trainer(max_epochs=3, callbacks=[pruning, kd]).fit(module, TinyData())
    assert kd.projections == {}  # the same architecture: no projection needed
    teacher = kd.teacher
    assert isinstance(teacher, DistilModule)
    # The student has no hook left after fit; the teacher copy carries only its own tap.
    assert all(not layer._forward_hooks for layer in module.modules())
    hooked = [name for name, layer in teacher.named_modules() if layer._forward_hooks]
    assert hooked == ["model.conv1"]
    assert len(teacher.model.conv1._forward_hooks) == 1
    x = torch.randn(5, 4, 4, 4)
    with torch.no_grad():  # pruned student, dense teacher: their conv1 features differ
        assert float(feature_loss(module.model.conv1(x), teacher.model.conv1(x))) > 0


def _resume_run(
    tmp_path: Path, crash_at: int | None, ckpt_path: str | None
) -> tuple[pl.LightningModule, KnowledgeDistillation]:
    pl.seed_everything(0)
    module = DistilModule()
    kd = _wide_kd(start_epoch=0.5)
    callbacks: list[pl.Callback] = [
        kd,
    ]
    fit_resumable(module, callbacks, tmp_path, crash_at, ckpt_path)
    return module, kd


def test_projections_and_their_optimizer_resume_exactly(tmp_path: Path) -> None:
    reference, ref_kd = _resume_run(tmp_path / "ref", None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        _resume_run(tmp_path / "crashed", 17, None)
    checkpoint = tmp_path / "crashed" / "step=15.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["callbacks"][KEY]["projections"]
    assert stored["layers"]["model.conv1"]["weight"].shape == (16, 8)
    assert stored["optimizer"]["state"]  # Adam moments travel with the checkpoint
    resumed, kd = _resume_run(tmp_path / "resumed", None, str(checkpoint))
    assert torch.equal(
        kd.projections["model.conv1"].weight, ref_kd.projections["model.conv1"].weight
    )
    for (name, expected), actual in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name


def test_missing_layers_are_named_before_training() -> None:
    recipe = {
        "distillation": {
            "_target_": "lightning_sparse.callbacks.KnowledgeDistillation",
            "teacher": "self",
            "features": ["model.conv9"],
        }
    }
    callbacks = instantiate_recipe(recipe, {"max_epochs": 3})
    with pytest.raises(
        RecipeError,
        match=r"`recipe\.distillation\.features`: the student has no layer 'model\.conv9'; "
        r"its layers are: model, model\.conv1, model\.fc1, model\.fc2",
    ):
        check_against_model(callbacks, DistilModule())
    # Another teacher's layers are checked when it is built, at setup.
    kd = _wide_kd(features={"model.conv1": "conv7"})
    with pytest.raises(ValueError, match=r"the teacher has no layer 'conv7'"):
        quiet_trainer(max_epochs=1, callbacks=[kd]).fit(DistilModule(), TinyData())


def test_shapes_that_no_projection_maps_are_an_error() -> None:
    kd = _wide_kd(features={"model.conv1": "fc1"})  # [8, 8, 4, 4] vs [8, 32]
    with pytest.raises(ValueError, match=r"`features`: 'model\.conv1' -> 'fc1': shapes"):
        quiet_trainer(max_epochs=1, callbacks=[kd]).fit(DistilModule(), TinyData())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": "model.conv1"}, r"`features`='model\.conv1' is not allowed; give a list"),
        ({"features": []}, r"`features`=\[\] is not allowed"),
        ({"features": ["model.conv1", ""]}, r"`features`: '' is not a layer name"),
        ({"features": ["model.conv1", "model.conv1"]}, r"'model\.conv1' is named twice"),
        ({"hardness": 0}, r"`hardness`=0 is not allowed; it must be a number > 0 \(or 0 with"),
        ({"features": ["a"], "feature_hardness": 0}, r"`feature_hardness`=0 is not allowed"),
        ({"features": ["a"], "projection_lr": -1.0}, r"`projection_lr`=-1.0 is not allowed"),
    ],
)
def test_feature_arguments_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillation(**kwargs)


@pytest.mark.slow
def test_projections_agree_across_ddp_ranks(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.callbacks.ddp_distillation_script", tmp_path)
    start0, start1 = rank0["start"], rank1["start"]
    assert torch.equal(start0, start1)  # the same seeded start on every rank
    final0, final1 = rank0["projection"], rank1["projection"]
    assert not torch.equal(final0, start0)  # it trained
    assert torch.equal(final0, final1)  # on averaged gradients: still identical
    for name, weight in rank0["final"].items():
        assert torch.equal(weight, rank1["final"][name]), name
