from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse import KnowledgeDistillation
from lightning_sparse.callbacks import MagnitudePruning, QuantizationAwareTraining
from lightning_sparse.callbacks.base import fractional_epoch
from lightning_sparse.callbacks.distillation import distillation_loss
from lightning_sparse.core.batch import token_mask
from lightning_sparse.module import CompressionModule
from lightning_sparse.run.recipe import RecipeError, instantiate_recipe, load
from tests.helpers import TinyData, TinyModule, TinyNet, fit_resumable, quiet_trainer

# TinyData: 80 samples, batch 8 -> 10 optimizer steps per epoch.


class DistilModule(CompressionModule, TinyModule):
    """TinyModule that adds the compression loss, as a user's module would (one line)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y) + self.compression_loss(batch, logits)


class TermRecorder(pl.Callback):
    """Per step: the clock, the term the callback gives and the hand formula's value."""

    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.rows: list[tuple[float, float, float | None]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Runs after the distillation callback's own batch start: the term this step adds.
        with torch.no_grad():
            logits = pl_module(batch[0])
            term = self.kd.loss_term(trainer, pl_module, batch, logits)
            expected = None
            if self.kd.teacher is not None:
                expected = float(
                    distillation_loss(logits, self.kd.teacher(batch[0]), 2.0, self.kd.hardness)
                )
        self.rows.append((fractional_epoch(trainer), float(term), expected))


def test_loss_term_matches_a_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=generator)
    teacher = torch.randn(5, 4, generator=generator)
    temperature, hardness = 3.0, 0.7
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    p_student = torch.softmax(student / temperature, dim=1)
    kl_per_sample = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1)
    expected = hardness * temperature**2 * kl_per_sample.mean()
    actual = distillation_loss(student, teacher, temperature, hardness)
    torch.testing.assert_close(actual, expected)
    # Identical logits: nothing to learn.
    assert float(distillation_loss(teacher, teacher, temperature)) == pytest.approx(0, abs=1e-7)


def test_per_token_loss_averages_over_real_tokens_and_ignores_padding() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 7, generator=generator)
    teacher = torch.randn(2, 5, 7, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = distillation_loss(
        torch.cat([student[0, :3], student[1]]), torch.cat([teacher[0, :3], teacher[1]]), 2.0
    )
    actual = distillation_loss(student, teacher, 2.0, mask=mask)
    torch.testing.assert_close(actual, expected)
    # Whatever the padding positions hold, the term is the same.
    noisy = student.clone()
    noisy[0, 3:] = 100 * torch.randn(2, 7, generator=generator)
    torch.testing.assert_close(distillation_loss(noisy, teacher, 2.0, mask=mask), expected)
    # Without a mask every position counts, averaged over tokens (not summed per sample).
    flat = distillation_loss(student.reshape(-1, 7), teacher.reshape(-1, 7), 2.0)
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), flat)


def test_token_mask_comes_from_a_hugging_face_batch_of_matching_shape() -> None:
    logits = torch.zeros(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    found = token_mask({"input_ids": torch.zeros(2, 4), "attention_mask": mask}, logits)
    assert found is not None
    assert found.dtype == torch.bool
    assert found.tolist() == mask.bool().tolist()
    # One prediction per sample, or a tuple batch: no mask.
    assert token_mask({"attention_mask": mask}, torch.zeros(2, 3)) is None
    assert token_mask((torch.zeros(2, 4), mask), logits) is None


def test_term_is_active_only_inside_its_epochs() -> None:
    pl.seed_everything(0)
    kd = KnowledgeDistillation(teacher="self", start_epoch=1.0, end_epoch=2.0, temperature=2.0)
    recorder = TermRecorder(kd)
    trainer = quiet_trainer(max_epochs=3, callbacks=[kd, recorder])
    trainer.fit(DistilModule(), TinyData())
    assert len(recorder.rows) == 30
    for epoch, term, expected in recorder.rows:
        if 1.0 <= epoch < 2.0:
            assert expected is not None
            assert term == pytest.approx(expected, rel=1e-5), epoch
            if epoch > 1.0:
                assert term > 0, epoch  # the student has moved away from its copy
        else:
            assert term == 0.0, epoch
    assert [kd.active_at(e) for e in (0.99, 1.0, 1.9, 2.0)] == [False, True, True, False]


def test_teacher_is_frozen_eval_and_not_part_of_the_model(tmp_path: Path) -> None:
    pl.seed_everything(0)
    kd = KnowledgeDistillation(teacher="self", start_epoch=0.5)
    module = DistilModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[kd, checkpoint], enable_checkpointing=True, logger=logger
    )
    trainer.fit(module, TinyData())
    teacher = kd.teacher
    assert teacher is not None
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher not in list(module.modules())
    model_params = {id(p) for p in module.parameters()}
    assert not any(id(p) in model_params for p in teacher.parameters())
    optimizer_params = {
        id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]
    }
    assert not any(id(p) in optimizer_params for p in teacher.parameters())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert list(saved["state_dict"]) == [f"model.{k}" for k in TinyNet().state_dict()]
    stored = saved["callbacks"]["KnowledgeDistillation"]["teacher"]
    assert set(stored) == set(module.state_dict())
    # The teacher is the model as it was at epoch 0.5, not as it ended.
    assert not torch.equal(stored["model.fc1.weight"], module.state_dict()["model.fc1.weight"])
    for key, value in teacher.state_dict().items():
        assert torch.equal(stored[key], value), key
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "compression/KnowledgeDistillation/loss" in metrics
    assert "compression/KnowledgeDistillation/active" in metrics


class TeacherTakes(pl.Callback):
    """Counts the self-teacher copies a run takes."""

    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.taken_at: list[int] = []
        self._had = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.kd.teacher_taken and not self._had:
            self.taken_at.append(trainer.global_step)
        self._had = self.kd.teacher_taken


def _kd_run(
    tmp_path: Path, crash_at: int | None, ckpt_path: str | None
) -> tuple[pl.LightningModule, KnowledgeDistillation, TeacherTakes]:
    pl.seed_everything(0)
    module = DistilModule()
    kd = KnowledgeDistillation(teacher="self", start_epoch=1.0, hardness=1.0)
    takes = TeacherTakes(kd)
    callbacks: list[pl.Callback] = [
        MagnitudePruning(final_sparsity=0.7, start_epoch=1, end_epoch=2, update_frequency=0.5),
        kd,
        takes,
    ]
    fit_resumable(module, callbacks, tmp_path, crash_at, ckpt_path)
    return module, kd, takes


def test_self_teacher_taken_once_and_restored_on_resume(tmp_path: Path) -> None:
    reference, ref_kd, ref_takes = _kd_run(tmp_path / "ref", None, None)
    assert ref_takes.taken_at == [11]  # first batch at epoch 1.0 (step 10), seen after it
    with pytest.raises(RuntimeError, match="crash on purpose"):
        _kd_run(tmp_path / "crashed", 17, None)
    checkpoint = tmp_path / "crashed" / "step=15.ckpt"
    assert torch.load(checkpoint, weights_only=True)["callbacks"]["KnowledgeDistillation"][
        "teacher"
    ]
    resumed, kd, takes = _kd_run(tmp_path / "resumed", None, str(checkpoint))
    assert takes.taken_at == [16]  # restored at the first resumed batch, not taken anew
    assert ref_kd.teacher is not None
    assert kd.teacher is not None
    for key, value in ref_kd.teacher.state_dict().items():
        assert torch.equal(kd.teacher.state_dict()[key], value), key
    for (name, expected), actual in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name


def test_module_without_the_mixin_is_an_error_at_setup() -> None:
    kd = KnowledgeDistillation(teacher="self")
    trainer = quiet_trainer(max_epochs=1, callbacks=[kd])
    with pytest.raises(
        TypeError, match=r"does not mix in lightning_sparse\.module\.CompressionModule"
    ):
        trainer.fit(TinyModule(), TinyData())


def test_missing_teacher_checkpoint_names_teacher(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=r"`teacher`=.*nope\.ckpt.: not found"):
        KnowledgeDistillation(teacher=str(missing))
    with pytest.raises(FileNotFoundError, match=r"`teacher_ckpt`=.*nope\.ckpt.: not found"):
        KnowledgeDistillation(teacher_ckpt=str(missing))
    # Through a recipe: before anything trains, naming the entry and the field.
    recipe = {
        "distillation": {
            "_target_": "lightning_sparse.callbacks.KnowledgeDistillation",
            "teacher": str(missing),
        }
    }
    with pytest.raises(RecipeError, match=r"recipe\.distillation: `teacher`="):
        instantiate_recipe(recipe, {"max_epochs": 3})


def test_teacher_from_a_checkpoint_and_from_a_model_config(tmp_path: Path) -> None:
    pl.seed_everything(1)
    trained = DistilModule()
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)
    for kd in (
        KnowledgeDistillation(teacher=str(path)),
        KnowledgeDistillation(teacher_ckpt=str(path)),
        KnowledgeDistillation(
            teacher=str(path), teacher_model={"_target_": "tests.helpers.TinyNet"}
        ),
    ):
        student = DistilModule()
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[kd])
        trainer.fit(student, TinyData())
        assert kd.teacher is not None
        x = torch.randn(3, 4, 4, 4)
        torch.testing.assert_close(kd.teacher(x), trained(x))
        # Not the student's weights, and not saved with the callback (config rebuilds it).
        assert kd.state_dict()["teacher"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"teacher": 3}, r"`teacher`=3 is not allowed"),
        ({"teacher": ""}, r"`teacher`='' is not allowed"),
        ({"teacher": None}, r"`teacher`=None needs `teacher_model`"),
        ({"teacher_model": {"model": 1}}, r"`teacher_model`=.* is not allowed; give a model"),
        (
            {"teacher_model": {"_target_": "tests.helpers.TinyNet"}},
            r"`teacher_model` is not allowed with `teacher`='self'",
        ),
        ({"hardness": 0}, r"`hardness`=0 is not allowed; it must be a number > 0"),
        ({"temperature": "hot"}, r"`temperature`='hot' is not a number; it must be a number > 0"),
        ({"hardness": "1"}, r"`hardness`='1' is not a number"),
        ({"temperature": -1.0}, r"`temperature`=-1.0 is not allowed; it must be a number > 0"),
        ({"temperature": float("nan")}, r"`temperature`=nan is not allowed"),
        ({"start_epoch": -1}, r"`start_epoch`=-1 is not allowed; it must be a number >= 0"),
        (
            {"start_epoch": 2, "end_epoch": 2},
            r"`end_epoch`=2 is not allowed; it must be null or a number > `start_epoch`=2",
        ),
        ({"name": ""}, r"`name`='' must be a non-empty string or None"),
        (
            {"teacher": "a.ckpt", "teacher_ckpt": "b.ckpt"},
            r"`teacher`='a\.ckpt' and `teacher_ckpt`='b\.ckpt' name two teachers",
        ),
    ],
)
def test_constructor_errors_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillation(**kwargs)


def test_start_epoch_past_max_epochs_is_an_error_at_setup() -> None:
    kd = KnowledgeDistillation(start_epoch=3)
    with pytest.raises(ValueError, match=r"`start_epoch`=3 is not before the trainer's max_epochs"):
        quiet_trainer(max_epochs=3, callbacks=[kd]).fit(DistilModule(), TinyData())


def test_recipe_load_builds_the_main_job() -> None:
    callbacks = load(
        "gmp_qat_distill", ["recipe.pruning.start_epoch=2", "recipe.pruning.end_epoch=9"]
    )
    by_type = {type(cb): cb for cb in callbacks}
    assert set(by_type) == {MagnitudePruning, QuantizationAwareTraining, KnowledgeDistillation}
    kd = by_type[KnowledgeDistillation]
    assert isinstance(kd, KnowledgeDistillation)
    assert kd.teacher_source == "self"
    assert kd.start_epoch == 2.0  # follows pruning by interpolation
    qat = by_type[QuantizationAwareTraining]
    assert isinstance(qat, QuantizationAwareTraining)
    assert qat.start_epoch == 9.0
    dropped = load("gmp_qat_distill", ["~recipe.distillation"])
    assert KnowledgeDistillation not in {type(cb) for cb in dropped}
