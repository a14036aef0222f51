"""DDP through the real app: 2 CPU processes over gloo (``trainer=ddp_sim``), and what is refused.

The run writes ``ranks/rank<r>.json`` from every rank (``debug.rank_report=true``): digests of
its masks and of its module's state, the metrics it sees and the files it wrote. Equal digests
mean the ranks hold the same masks and weights; the checkpoint is then evaluated in one plain
process and must reproduce the accuracy the DDP run reported. The first run's rank 1 is started
by Lightning's launcher (as `trainer=ddp_sim` does for a user); the others' ranks are started as
torchrun or srun start them, each told its rank by the environment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors import safe_open

from lightning_sparse.deploy.export import export_model
from lightning_sparse.run.recipe import compose_config
from lightning_sparse.run.report import weights_digest
from lightning_sparse.run.training import ConfigError, _check_launch, check_strategy, run
from tests.e2e.app import QUICK, QUICK_PRUNING, run_app, run_app_ranks

ComposeRunCfg = Callable[..., DictConfig]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_ddp_ranks_agree_and_the_checkpoint_matches_one_process(tmp_path: Path) -> None:
    overrides = [*QUICK, *QUICK_PRUNING, "recipe.pruning.final_sparsity=0.8"]
    result = run_app(
        *overrides, "trainer=ddp_sim", "debug.rank_report=true", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_json(tmp_path / "summary.json")
    rank0 = read_json(tmp_path / "ranks" / "rank0.json")
    rank1 = read_json(tmp_path / "ranks" / "rank1.json")
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2

    # Masks identical on both ranks: one digest per pruned weight, equal across ranks.
    assert set(rank0["masks"]) == {f"pruning/{name}" for name in summary["sparsity_per_layer"]}
    assert rank0["masks"] == rank1["masks"]
    # Weights identical, and they are what the checkpoint holds.
    assert rank0["state_dict"] == rank1["state_dict"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert weights_digest(checkpoint["state_dict"]) == rank0["state_dict"]
    # Metrics synchronized: each rank tested half of the test set, yet both report the same
    # accuracy, the one in the summary.
    assert rank0["metrics"]["test/acc"] == rank1["metrics"]["test/acc"] == summary["test_acc"]
    assert rank0["val_acc"] == rank1["val_acc"] == summary["val_acc"]
    # Text and files from rank zero only.
    assert rank0["wrote"] == ["recipe.yaml", "environment.json", "export", "summary.json"]
    assert rank1["wrote"] == []
    assert result.stdout.count("test accuracy") == 1  # one summary table
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)

    # One process, no DDP: the checkpoint's weights give the accuracy the DDP run reported.
    cfg = compose_config(overrides)
    module: pl.LightningModule = instantiate(cfg.model)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    module.eval()
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    datamodule.setup("test")
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in datamodule.test_dataloader():
            correct += int((module(inputs).argmax(dim=1) == labels).sum())
            total += labels.numel()
    assert correct / total == pytest.approx(summary["test_acc"], abs=1e-6)

    # ... and exporting those weights in one process gives the DDP run's export: the same
    # accuracy, size and stored tensors (the header's key order is not fixed, so not its bytes).
    single = export_model(module, datamodule, tmp_path / "single_export", latency_runs=1)
    assert single["onnx_fp32_acc"] == summary["onnx_fp32_acc"]
    assert single["compressed_bytes"] == summary["compressed_bytes"]
    stored = [
        safe_open(str(path / "compressed.safetensors"), "pt")
        for path in (tmp_path / "export", tmp_path / "single_export")
    ]
    assert stored[0].metadata() == stored[1].metadata()
    keys = sorted(stored[0].keys())
    assert keys == sorted(stored[1].keys())
    for key in keys:
        assert torch.equal(stored[0].get_tensor(key), stored[1].get_tensor(key)), key


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_2", "fsdp_cpu_offload"])
def test_sharding_strategies_are_refused_before_anything_runs(
    compose_run_cfg: ComposeRunCfg, strategy: str
) -> None:
    cfg = compose_run_cfg(*QUICK, "trainer=ddp_sim", f"trainer.strategy={strategy}")
    with pytest.raises(ConfigError) as info:
        run(cfg)
    message = str(info.value)
    assert f"trainer.strategy='{strategy}'" in message
    assert "needs every parameter whole on each process" in message
    assert "supported: auto, ddp" in message
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize("strategy", ["auto", "ddp", "ddp_spawn", "single_device", "not-known"])
def test_whole_parameter_strategies_pass_the_check(strategy: str) -> None:
    check_strategy({"strategy": strategy})  # unknown names are Lightning's to report


def test_local_ddp_processes_inside_a_multirun_are_refused(
    compose_run_cfg: ComposeRunCfg,
) -> None:
    # Checked on the trainer alone: fitting it would re-run this command (pytest) as rank 1.
    compose_run_cfg(*QUICK, "hydra.mode=MULTIRUN")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ConfigError, match="cannot run inside a Hydra multirun"):
        _check_launch(trainer)
    spawn = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    _check_launch(spawn)  # processes started by multiprocessing, not by re-running the command


def test_multi_node_overrides_compose() -> None:
    cfg = compose_config(["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"])
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices) == ("ddp", 2, 4)


@pytest.mark.slow
def test_ddp_runs_the_main_recipe_with_every_technique_in_agreement(tmp_path: Path) -> None:
    # gmp_qat_distill, squeezed: dense to epoch 0.5, then distil (logits and conv2's features)
    # and prune to epoch 1, QAT from epoch 1, 3 epochs. The ranks are started as torchrun or srun
    # start them (the README's multi-node commands): every rank runs the app with the same run
    # dir, and Lightning joins them instead of launching rank 1.
    results = run_app_ranks(
        *QUICK,
        "recipe=gmp_qat_distill",
        "recipe.pruning.start_epoch=0.5",
        "recipe.pruning.end_epoch=1",
        "recipe.distillation.features=[model.conv2]",
        "trainer.max_epochs=3",
        "trainer=ddp_sim",
        "debug.rank_report=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]
    # the summary table is printed once, by rank 0
    assert "sparsity" in results[0].stdout
    assert "sparsity" not in results[1].stdout
    summary = read_json(tmp_path / "summary.json")
    rank0 = read_json(tmp_path / "ranks" / "rank0.json")
    rank1 = read_json(tmp_path / "ranks" / "rank1.json")
    # Every technique's state agrees across ranks: masks, quantization scales, the teacher.
    assert set(rank0["states"]) == {"pruning", "quantization", "distillation"}
    assert rank0["states"] == rank1["states"]
    assert rank0["masks"] == rank1["masks"]
    assert rank0["state_dict"] == rank1["state_dict"]
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert summary["onnx_int8_acc"] is not None
    assert (tmp_path / "export" / "model_int8.onnx").is_file()
    # The dense snapshot (taken where pruning began) was tested by both ranks together.
    assert summary["dense_baseline"] == {"kind": "snapshot", "epoch": 0.5}
    assert 0.0 < summary["dense_test_acc"] <= 1.0
    assert rank0["metrics"]["test/acc"] == rank1["metrics"]["test/acc"]


@pytest.mark.slow
def test_ddp_prunes_gpt2_two_of_four_along_conv1d_inputs_in_agreement(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    results = run_app_ranks(
        "model=gpt2_tiny",
        "data=synthetic_text",
        "data.train_size=128",
        "data.test_size=64",
        "recipe=gmp_2of4",
        "recipe.pruning.start_epoch=0",
        "recipe.pruning.end_epoch=1",
        "trainer.max_epochs=2",
        "trainer.enable_model_summary=false",
        "trainer=ddp_sim",
        "debug.rank_report=true",
        "export=false",
        f"hydra.run.dir={tmp_path}",
    )
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]
    summary = read_json(tmp_path / "summary.json")
    rank0 = read_json(tmp_path / "ranks" / "rank0.json")
    rank1 = read_json(tmp_path / "ranks" / "rank1.json")
    assert rank0["masks"] == rank1["masks"]
    assert rank0["state_dict"] == rank1["state_dict"]
    assert "pruning/model.transformer.h.0.attn.c_attn.weight" in rank0["masks"]
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    weight = state["model.transformer.h.0.mlp.c_fc.weight"]  # Conv1D: [in, out]
    kept = (weight.t().reshape(weight.shape[1], -1, 4) != 0).sum(dim=-1)
    assert int(kept.max()) == 2
