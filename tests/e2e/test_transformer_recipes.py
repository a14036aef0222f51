"""Every recipe on ``model=bert_tiny`` and ``model=gpt2_tiny`` with ``data=synthetic_text``.

Training recipes run with their own schedules on two batches an epoch; one-shot recipes and sparse
transfer start from a dense run of each model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from lightning_sparse import oneshot
from lightning_sparse.run import training
from lightning_sparse.run.recipe import compose_config

pytest.importorskip("transformers")

MODELS = ["bert_tiny", "gpt2_tiny"]
# Two batches an epoch, one to validate and test, nothing printed.
QUICK = [
    "data=synthetic_text",
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    # the exports time ONNX Runtime 3 times, not 50 (what is timed is not asserted here)
    "latency_runs=3",
]
TRAINING_RECIPES = [
    "dense",
    "distill",
    "gmp",
    "gmp_2of4",
    "gmp_distill",
    "gmp_global",
    "gmp_qat",
    "gmp_qat_distill",
    "qat",
]
# A layer of each kind that __ALL_PRUNABLE__ must reach: BERT's Linear, GPT-2's Conv1D.
PROJECTION = {
    "bert_tiny": "model.bert.encoder.layer.0.attention.self.query.weight",
    "gpt2_tiny": "model.transformer.h.0.attn.c_attn.weight",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_and_run(
    entry: Any, config: str, output_dir: Path, *overrides: str, quick: bool = True
) -> dict[str, Any]:
    cfg = compose_config(
        [*(QUICK if quick else []), *overrides, f"output_dir='{output_dir}'"],
        config_name=config,
        return_hydra_config=True,
    )
    HydraConfig.instance().set_config(cfg)
    try:
        return entry.run(cfg)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for model in MODELS:
        run_dir = tmp_path_factory.mktemp(f"dense_{model}")
        compose_and_run(
            training, "train", run_dir, f"model={model}", "recipe=dense",
            "trainer.max_epochs=2", "export=false",
        )  # fmt: skip
        runs[model] = run_dir
    return runs


def test_all_prunable_picks_up_conv1d_in_the_shipped_recipes() -> None:
    from hydra.utils import instantiate

    from lightning_sparse.core.targets import resolve_params

    cfg = compose_config(["model=gpt2_tiny", "data=synthetic_text", "recipe=gmp"])
    module = instantiate(cfg.model)
    names = list(resolve_params(module, cfg.recipe.pruning.params))
    assert len(names) == 9  # 4 Conv1D per layer, 2 layers, and the Linear head
    assert PROJECTION["gpt2_tiny"] in names
    assert not any("wte" in name or "wpe" in name for name in names)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("recipe", TRAINING_RECIPES)
def test_every_training_recipe_runs(recipe: str, model: str, tmp_path: Path) -> None:
    # One export per model: the main recipe's (fp32 and int8); the others' export is the same path.
    export = "true" if recipe == "gmp_qat_distill" else "false"
    summary = compose_and_run(
        training, "train", tmp_path, f"model={model}", f"recipe={recipe}", f"export={export}"
    )
    assert summary["status"] == "ok"
    assert summary["test_acc"] is not None
    assert summary["unknown_layer_weights"] == {}
    layers = summary["sparsity_per_layer"]
    assert PROJECTION[model] in layers
    if recipe.startswith("gmp"):
        target = 0.5 if recipe == "gmp_2of4" else 0.9
        assert summary["sparsity"] == pytest.approx(target, abs=2e-3)
    else:
        assert summary["sparsity"] < 0.01
    if recipe == "gmp_qat_distill":
        assert summary["onnx_fp32_max_abs_diff"] < 1e-4
        assert summary["onnx_int8_agreement"] > 0.97
    if recipe == "gmp_2of4":
        state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        weight = state["state_dict"][PROJECTION[model]]
        # groups of 4 along the input dimension: dim 1 of Linear's [out, in], dim 0 of Conv1D's
        rows = weight if model == "bert_tiny" else weight.t()
        kept = (rows.reshape(rows.shape[0], -1, 4) != 0).sum(dim=-1)
        assert int(kept.max()) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_sparse_transfer_holds_the_zeros(
    model: str, dense_runs: dict[str, Path], tmp_path: Path
) -> None:
    pruned = tmp_path / "pruned"
    compose_and_run(
        training, "train", pruned, f"model={model}", "recipe=gmp", "export=false",
        "trainer.max_epochs=2", "recipe.pruning.start_epoch=0", "recipe.pruning.end_epoch=1",
        "recipe.pruning.final_sparsity=0.8",
    )  # fmt: skip
    summary = compose_and_run(
        training, "train", tmp_path / "transfer", f"model={model}", "recipe=sparse_transfer",
        f"model.init_from='{pruned}'", "data.data_seed=1", "trainer.max_epochs=2",
        "export=false",
    )  # fmt: skip
    assert summary["status"] == "ok"
    # every zero held; only the new head (reset for the new task) is dense
    for name, value in summary["sparsity_per_layer"].items():
        assert value == pytest.approx(0.0 if "classifier" in name else 0.8, abs=5e-3), name


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("recipe", ["oneshot_wanda", "oneshot_magnitude"])
def test_oneshot_recipes(
    recipe: str, model: str, dense_runs: dict[str, Path], tmp_path: Path
) -> None:
    summary = compose_and_run(
        oneshot, "oneshot", tmp_path, f"model={model}", f"recipe={recipe}",
        f"ckpt_path='{dense_runs[model]}'", "oneshot.pruning.calibration_batches=2",
        "finetune_epochs=1", "export=false",
    )  # fmt: skip
    assert summary["sparsity"] == pytest.approx(0.7, abs=2e-3)
    assert PROJECTION[model] in summary["sparsity_per_layer"]


@pytest.mark.slow
def test_a_pruned_and_quantized_gpt2_run_resumes(tmp_path: Path) -> None:
    first = tmp_path / "first"
    compose_and_run(
        training, "train", first, "model=gpt2_tiny", "recipe=gmp_qat", "export=false",
        "trainer.max_epochs=3", "recipe.pruning.start_epoch=0", "recipe.pruning.end_epoch=1",
        "recipe.quantization.disable_quantization_observer_epoch=null",
    )  # fmt: skip
    resumed = compose_and_run(
        training, "train", tmp_path / "resumed", f"resume='{first}'", "trainer.max_epochs=4",
        "export=true", quick=False,
    )  # fmt: skip
    assert resumed["status"] == "ok"
    assert resumed["epochs"] == 4
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert resumed["onnx_int8_agreement"] > 0.97


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_post_training_int8(model: str, dense_runs: dict[str, Path], tmp_path: Path) -> None:
    summary = compose_and_run(
        oneshot, "oneshot", tmp_path, f"model={model}", "recipe=ptq_int8",
        f"ckpt_path='{dense_runs[model]}'", "oneshot.quantization.calibration_batches=2",
    )  # fmt: skip
    assert summary["onnx_int8_agreement"] > 0.97
    assert summary["onnx_fp32_max_abs_diff"] < 1e-4
