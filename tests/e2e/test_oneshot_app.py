"""Whole runs of ``python -m lightning_sparse.oneshot``: outputs, sparsity, criteria, bad input."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig

from lightning_sparse import oneshot
from lightning_sparse.models import SmallCNN
from lightning_sparse.run import training as train
from lightning_sparse.run.recipe import RecipeError, compose_config
from tests import forkserver
from tests.e2e.app import REPO
from tests.stage_helpers import write_mnist

pytestmark = pytest.mark.slow

QUIET = [
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=5",
]
LAYERS = ["model.conv1.weight", "model.conv2.weight", "model.fc1.weight", "model.fc2.weight"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_and_run(
    entry: Any, config_name: str, output_dir: Path, *overrides: str
) -> dict[str, Any]:
    """``entry.run`` on composed configs, as its app would, writing into ``output_dir``."""
    cfg = compose_config(
        [*QUIET, *overrides, f"output_dir='{output_dir}'"],
        config_name=config_name,
        return_hydra_config=True,
    )
    HydraConfig.instance().set_config(cfg)
    try:
        return entry.run(cfg)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


def run_oneshot(output_dir: Path, *overrides: str) -> dict[str, Any]:
    return compose_and_run(oneshot, "oneshot", output_dir, *overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense SmallCNN trained on the digits for 6 epochs: its run dir."""
    run_dir = tmp_path_factory.mktemp("trained")
    compose_and_run(
        train,
        "train",
        run_dir,
        "recipe=dense",
        "trainer.max_epochs=6",
        "~logger.csv",
        "export=false",
    )
    return run_dir


def assert_nothing_written(run_dir: Path) -> None:
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(run_dir.iterdir())


def test_app_prunes_fine_tunes_and_writes_everything(trained: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HYDRA_FULL_ERROR": "0",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    result = forkserver.run(
        [
            "-m",
            "lightning_sparse.oneshot",
            f"ckpt_path={trained}",
            "recipe=oneshot_wanda",
            "oneshot.pruning.sparsity=0.6",
            "oneshot.pruning.calibration_batches=4",
            "finetune_epochs=1",
            *QUIET,
            f"hydra.run.dir={tmp_path}",
        ],
        REPO,
        env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stage"] == "oneshot"
    assert summary["criterion"] == "wanda"
    assert summary["recipe"]["name"] == "oneshot_wanda"
    assert summary["source_checkpoint"] == str(trained / "checkpoints" / "last.ckpt")
    assert summary["before"]["sparsity"] == 0.0
    for stage in ("after_oneshot", "after_finetune"):
        assert summary[stage]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    for name in LAYERS:
        assert summary["sparsity_per_layer"][name] == pytest.approx(0.6, abs=1 / 288), name
    assert summary["before"]["test_acc"] > 0.8
    assert summary["steps"]["pruning"]["calibration_batches_used"] == 4
    assert summary["steps"]["pruning"]["calibration_samples"] == 4 * 64
    assert summary["epochs"] == 1
    assert "one-shot: oneshot_wanda (wanda)" in result.stdout  # the before/after table
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["oneshot"]["pruning"]["criterion"] == "wanda"
    assert recipe["recipe"]["hold"]["_target_"] == "lightning_sparse.callbacks.ConstantPruning"
    assert (tmp_path / "csv" / "metrics.csv").is_file()  # the fine-tune's metrics

    # The pruned checkpoint loads into the plain model, strict, and holds the zeros.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    model = SmallCNN()
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}, strict=True
    )
    zeros = sum(int((model.get_parameter(n[6:]) == 0).sum()) for n in LAYERS)
    total = sum(model.get_parameter(n[6:]).numel() for n in LAYERS)
    assert zeros / total == pytest.approx(summary["sparsity"])
    assert checkpoint["callbacks"]["oneshot"]["name"] == "oneshot_wanda"
    assert checkpoint["callbacks"]["recipe"]["recipe"] == recipe["recipe"]


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["oneshot.pruning.global_sparsity=true", "oneshot.pruning.sparsity=0.9"], "global"),
        (
            [
                "recipe=oneshot_wanda",
                "oneshot.pruning.mask_type='2:4'",
                "oneshot.pruning.sparsity=0.5",
                "oneshot.pruning.params=['re:model\\.(conv2|fc\\d)\\.weight']",
            ],
            "2:4",
        ),
    ],
)
def test_global_and_two_of_four_runs(
    trained: Path, tmp_path: Path, overrides: list[str], check: str
) -> None:
    summary = run_oneshot(tmp_path, f"ckpt_path='{trained}'", *overrides)
    layers = summary["sparsity_per_layer"]
    if check == "global":
        assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert max(layers.values()) - min(layers.values()) > 0.05
    else:
        assert set(layers) == set(LAYERS[1:])
        state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in layers:
            weight = state[name]
            weight = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
            assert bool(((weight.reshape(-1, 4) == 0).sum(dim=1) == 2).all()), name


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["model=mlp"], ValueError, "first mismatched key: 'model.fc1.weight' has shape"),
        (["model.model.width=16"], ValueError, "'model.conv1.weight' has shape [32, 1, 3, 3]"),
        (["data.classes=[0,1,2,3,4]", "data.num_classes=5"], ValueError, "'model.fc2.weight'"),
        (["ckpt_path=/no/such/run"], FileNotFoundError, "`ckpt_path`='/no/such/run'"),
        (
            ["recipe=oneshot_wanda", "oneshot.pruning.calibration_batches=0"],
            RecipeError,
            "oneshot.pruning: `calibration_batches`=0",
        ),
        (["oneshot.pruning.sparsity=1.2"], RecipeError, "oneshot.pruning: `sparsity`=1.2"),
        (["+oneshot.pruning.sparsty=0.5"], RecipeError, "unknown argument 'sparsty'"),
        (["recipe=gmp"], RecipeError, "the recipe has no one-shot steps"),
        (["~recipe.hold", "finetune_epochs=1"], ValueError, "would let 'model.conv1.weight'"),
        (["trainer=ddp_sim"], ValueError, "runs in one process"),
    ],
    ids=[
        "another-model",
        "another-width",
        "another-head",
        "missing-checkpoint",
        "empty-calibration",
        "bad-sparsity",
        "typo",
        "not-a-oneshot-recipe",
        "unheld-fine-tune",
        "ddp",
    ],
)
def test_bad_input_fails_before_any_work(
    trained: Path, tmp_path: Path, overrides: list[str], error: type, message: str
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(error) as info:
        run_oneshot(run_dir, f"ckpt_path='{trained}'", *overrides)
    assert message in str(info.value)
    assert_nothing_written(run_dir)


def test_real_data_format_and_torchvision_model(tmp_path: Path) -> None:
    """MNIST files (written here) and MobileNetV3: train briefly, then prune one-shot by Wanda.

    No export: MobileNetV3's ONNX export and int8 run are tests/deploy's (test_int8_residual).
    """
    write_mnist(tmp_path / "data", train=80, test=20)
    data = ["data=mnist", f"data.root='{tmp_path / 'data'}'", "data.download=false"]
    model = ["model=mobilenet_v3_small", "data.batch_size=16", "export=false"]
    compose_and_run(
        train,
        "train",
        tmp_path / "trained",
        *data,
        *model,
        "recipe=dense",
        "trainer.max_epochs=1",
        "~logger.csv",
    )
    summary = run_oneshot(
        tmp_path / "pruned",
        *data,
        *model,
        f"ckpt_path='{tmp_path / 'trained'}'",
        "recipe=oneshot_wanda",
        "oneshot.pruning.calibration_batches=2",
    )
    layers = summary["sparsity_per_layer"]
    assert len(layers) == 54  # every conv (depthwise too) and linear of MobileNetV3-small
    assert summary["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert all(value == pytest.approx(0.7, abs=0.02) for value in layers.values()), layers


def test_post_training_quantization_calibrates_evaluates_and_exports_int8(
    trained: Path, tmp_path: Path
) -> None:
    summary = run_oneshot(
        tmp_path,
        f"ckpt_path='{trained}'",
        "recipe=ptq_int8",
        "oneshot.quantization.calibration_batches=4",
    )
    report = summary["steps"]["quantization"]
    assert report["calibration_batches_used"] == 4
    assert report["quantized_layers"] == [name.removesuffix(".weight") for name in LAYERS]
    # no training: the weights are the trained ones, and PTQ costs at most a point of accuracy
    assert summary["epochs"] == 0
    assert summary["before"]["test_acc"] - summary["test_acc"] <= 0.01
    # ONNX Runtime runs the int8 model and agrees with the fp32 one within 0.5 points
    assert (tmp_path / "export" / "model_int8.onnx").is_file()
    assert abs(summary["onnx_int8_acc"] - summary["onnx_fp32_acc"]) <= 0.005
    # the checkpoint carries the calibrated scales, so the export entry can rebuild the int8 model
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["callbacks"]["oneshot"]["quantization"]["format"]


def test_post_training_quantization_after_pruning_keeps_the_zeros(
    trained: Path, tmp_path: Path
) -> None:
    summary = run_oneshot(
        tmp_path,
        f"ckpt_path='{trained}'",
        "recipe=ptq_int8",
        "+oneshot.pruning={_target_: lightning_sparse.posttrain.OneShotPruning, sparsity: 0.5}",
        "export=false",
    )
    # pruning runs first (before the fine-tune slot), quantization last; zeros survive int8
    assert list(summary["steps"]) == ["pruning", "quantization"]
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "onnx_int8_acc" not in summary


def test_post_training_quantization_needs_calibration_batches(
    trained: Path, tmp_path: Path
) -> None:
    with pytest.raises(RecipeError, match=r"`calibration_batches`=0 is not allowed"):
        run_oneshot(
            tmp_path,
            f"ckpt_path='{trained}'",
            "recipe=ptq_int8",
            "oneshot.quantization.calibration_batches=0",
        )
    assert_nothing_written(tmp_path)
