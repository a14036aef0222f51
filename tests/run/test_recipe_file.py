"""SparseML recipes in the app: ``recipe_file=``, the ``recipe`` facade and ``convert``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lightning_sparse.recipe as facade
from lightning_sparse.run import sparseml
from lightning_sparse.run.recipe import RecipeError, compose_config, instantiate_recipe
from lightning_sparse.run.recipe_file import apply_recipe_file
from lightning_sparse.run.training import run
from tests import forkserver

RECIPES = Path(__file__).parent / "sparseml_recipes"
RESNET = RECIPES / "resnet50_pruned_quant.md"
BERT = RECIPES / "bert_prune90_distill.md"
STAGED = RECIPES / "staged_2of4.yaml"
REPO = Path(__file__).resolve().parents[2]
QUIET = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "export=false",
    "baseline=null",
]


@pytest.fixture
def compose_app_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Compose as the app does (HydraConfig set, so the command line is known)."""

    def make(*overrides: str) -> DictConfig:
        cfg = compose_config(
            [*overrides, f"output_dir='{tmp_path / 'run'}'"], return_hydra_config=True
        )
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def test_the_facade_re_exports_the_importer() -> None:
    assert facade.load_file is sparseml.load_file
    assert facade.convert is sparseml.convert
    fragment = facade.load_file(STAGED)
    assert fragment["trainer"] == {"max_epochs": 15}


def test_recipe_file_replaces_the_recipe_group_and_the_command_line_still_wins(
    compose_app_cfg: Callable[..., DictConfig],
) -> None:
    cfg = compose_app_cfg(
        f"recipe_file={STAGED}",
        "model=mlp",
        "recipe.pruning.final_sparsity=0.25",
        "model.weight_decay=0.01",
    )
    applied, name = apply_recipe_file(cfg)
    assert name == "staged_2of4"
    assert list(applied.recipe) == ["pruning", "quantization"]
    assert applied.recipe.pruning.mask_type == "2:4"
    assert applied.recipe.pruning.final_sparsity == 0.25  # the command line wins
    # The file's training length and learning rate; the default recipe group's
    # (gmp_qat_distill: trainer.max_epochs=60) left no trace.
    assert applied.trainer.max_epochs == 15
    assert applied.model.lr == 0.001
    assert applied.model.weight_decay == 0.01
    instantiate_recipe(applied.recipe, applied.trainer)
    longer = compose_app_cfg(f"recipe_file={STAGED}", "model=mlp", "trainer.max_epochs=20")
    assert apply_recipe_file(longer)[0].trainer.max_epochs == 20


def test_recipe_variables_reach_the_file(compose_app_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_app_cfg(
        f"recipe_file={STAGED}", "model=mlp", "+recipe_variables.pruning_epochs=4.0"
    )
    applied, _ = apply_recipe_file(cfg)
    assert applied.trainer.max_epochs == 9
    assert applied.recipe.pruning.end_epoch == 2.0


def test_a_recipe_group_and_a_recipe_file_together_are_refused(
    compose_app_cfg: Callable[..., DictConfig],
) -> None:
    cfg = compose_app_cfg(f"recipe_file={STAGED}", "recipe=gmp")
    with pytest.raises(RecipeError, match=r"`recipe_file`=.* and 'recipe=gmp' both name"):
        apply_recipe_file(cfg)


def test_a_recipe_the_importer_refuses_stops_the_run_naming_the_modifier(
    compose_app_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("modifiers:\n  - !MovementPruningModifier\n    start_epoch: 0.0\n")
    cfg = compose_app_cfg(f"recipe_file={bad}")
    with pytest.raises(sparseml.RecipeImportError, match="MovementPruningModifier"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_convert_writes_a_recipe_that_composes_by_name(tmp_path: Path) -> None:
    out = tmp_path / "conf" / "recipe" / "staged.yaml"
    assert facade.main(["convert", str(STAGED), "-o", str(out), "--var", "pruning_epochs=4"]) == 0
    cfg = compose_config(
        [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "recipe=staged", "model=mlp"]
    )
    assert cfg.trainer.max_epochs == 9
    callbacks = instantiate_recipe(cfg.recipe, cfg.trainer)
    assert list(callbacks) == ["pruning", "quantization"]


def test_convert_from_the_command_line(tmp_path: Path) -> None:
    result = forkserver.run(
        ["-m", "lightning_sparse.recipe", "convert", str(STAGED)],
        REPO,
        {**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["trainer"] == {"max_epochs": 15}
    bad = tmp_path / "bad.yaml"
    bad.write_text("modifiers:\n  - !MovementPruningModifier\n    start_epoch: 0.0\n")
    refused = forkserver.run(
        ["-m", "lightning_sparse.recipe", "convert", str(bad)],
        REPO,
        {**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert refused.returncode == 2
    assert "MovementPruningModifier" in refused.stderr


def _train(cfg: DictConfig) -> dict[str, Any]:
    summary = run(cfg)
    assert summary["status"] == "ok"
    return summary


@pytest.mark.slow
def test_the_three_sparseml_recipes_train_through_recipe_file(
    compose_app_cfg: Callable[..., DictConfig],
) -> None:
    pytest.importorskip("transformers")
    staged = _train(
        compose_app_cfg(
            f"recipe_file={STAGED}", "model=mlp", "data=synthetic", "data.input_shape=[1,8,8]",
            "+recipe_variables={pruning_epochs: 3.0, quantization_epochs: 2.0}", *QUIET,
        )
    )  # fmt: skip
    assert staged["recipe"]["name"] == "staged_2of4"
    assert staged["sparsity"] == pytest.approx(0.5, abs=1e-3)
    bert = _train(
        compose_app_cfg(
            f"recipe_file={BERT}", "model=bert_tiny", "data=synthetic_text",
            "+recipe_variables={num_epochs: 3, pruning_start_epoch: 0, pruning_end_epoch: 2,"
            " update_frequency: 0.5, distill_hardness: 0.5}",
            *QUIET,
        )
    )  # fmt: skip
    assert bert["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert len(bert["sparsity_per_layer"]) == 12  # the encoder's projections, by `re:` pattern
    resnet = _train(
        compose_app_cfg(
            f"recipe_file={RESNET}", "data=synthetic", "data.input_shape=[1,8,8]",
            "data.num_classes=4", "~model.model",
            "+model.model={_target_: tests.run.test_sparseml.TinyResNet, num_classes: 4}",
            "+recipe_variables={num_epochs: 5.0, pruning_start_epoch: 0.0, pruning_end_epoch: 2.0,"
            " quantization_start_epoch: 3.0, disable_quantization_observer_epoch: 4.0,"
            " freeze_bn_stats_epoch: 4.0}",
            *QUIET,
        )
    )  # fmt: skip
    assert resnet["sparsity"] > 0.69
    checkpoint = torch.load(Path(resnet["checkpoint"]), weights_only=True)
    assert "quantization" in str(checkpoint["callbacks"])
