"""Early-exit export: ONNX stages chain to the model's logits; the runner routes by confidence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_sparse.core.early_exit import ExitHead, SegmentError
from lightning_sparse.deploy.early_exit import (
    MANIFEST_FILE,
    EarlyExitRunner,
    early_exit_report,
    export_early_exit,
    format_report,
)
from lightning_sparse.models import SmallCNN
from lightning_sparse.module import ClassificationModule
from tests.core.test_exit_math import Residual

EXITS = ["model.conv1", "model.conv2"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    """SmallCNN with heads after conv1 ([4, 8, 8]) and conv2 ([8, 8, 8]), one export."""
    torch.manual_seed(0)
    module = ClassificationModule(SmallCNN(width=4), num_classes=10).eval()
    heads = [ExitHead([4, 8, 8], 10, pool_size=2, seed=1), ExitHead([8, 8, 8], 10, seed=2)]
    with torch.no_grad():  # a sharper first head, so that confidences spread over (0, 1)
        heads[0].linear.weight.mul_(20)
    out = tmp_path_factory.mktemp("early_exit")
    manifest = export_early_exit(module, EXITS, heads, [0.5, 0.9], torch.randn(4, 1, 8, 8), out)
    return module, heads, out, manifest


def test_manifest_lists_stages_heads_and_thresholds(exported: Any) -> None:
    _, _, out, manifest = exported
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest
    assert manifest["stages"] == ["stage_0.onnx", "stage_1.onnx", "stage_2.onnx"]
    assert manifest["heads"] == ["head_0.onnx", "head_1.onnx"]
    assert manifest["thresholds"] == [0.5, 0.9]
    assert manifest["input_shape"] == [1, 1, 8, 8]
    assert manifest["num_classes"] == 10
    assert all((out / name).is_file() for name in [*manifest["stages"], *manifest["heads"]])


def test_stage_chain_with_exits_off_reproduces_the_models_logits(exported: Any) -> None:
    module, _, out, _ = exported
    runner = EarlyExitRunner(out, thresholds=[1.0, 1.0])
    inputs = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        expected = module(inputs).numpy()
    for index in range(len(inputs)):
        logits, exit_index = runner.run(inputs[index : index + 1].numpy())
        assert exit_index == len(EXITS)
        np.testing.assert_allclose(logits, expected[index : index + 1], atol=1e-5)
        np.testing.assert_allclose(runner.plain(inputs[index : index + 1].numpy()), logits, 0, 1e-5)


def test_runner_leaves_early_exactly_for_the_inputs_its_first_head_is_sure_of(
    exported: Any,
) -> None:
    module, heads, out, _ = exported
    inputs = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        first = heads[0](module.model.conv1(inputs))
        confidence = torch.softmax(first, dim=-1).max(dim=-1).values
    # Halfway between two neighbouring confidences, so float differences cannot flip an input.
    ranked = confidence.sort().values
    threshold = float(ranked[15] + ranked[16]) / 2
    assert ranked[16] - ranked[15] > 1e-5
    runner = EarlyExitRunner(out, thresholds=[threshold, 1.0])
    easy = confidence >= threshold
    assert 0 < int(easy.sum()) < len(inputs)
    for index in range(len(inputs)):
        logits, exit_index = runner.run(inputs[index : index + 1].numpy())
        if easy[index]:
            assert exit_index == 0
            np.testing.assert_allclose(logits[0], first[index].numpy(), atol=1e-5)
        else:
            assert exit_index == len(EXITS)


def test_report_measures_every_setting_against_the_plain_model(exported: Any) -> None:
    module, _, out, _ = exported
    inputs = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        labels = module(inputs).argmax(dim=-1).numpy()  # the plain model is right on all
    settings = {"off": [1.0, 1.0], "all at exit 1": [0.0, 1.0]}
    report = early_exit_report(out, inputs.numpy(), labels, settings, warmup=1)
    assert report["plain"]["accuracy"] == 1.0
    assert report["settings"]["off"]["accuracy"] == 1.0
    assert report["settings"]["off"]["exit_fractions"] == [0.0, 0.0, 1.0]
    assert report["settings"]["all at exit 1"]["exit_fractions"] == [1.0, 0.0, 0.0]
    assert report["plain"]["mean_ms"] > 0
    table = format_report(report)
    assert "| plain model |" in table
    assert "| all at exit 1 | 0.000, 1.000 |" in table


def test_export_refuses_a_cut_inside_a_skip_connection(tmp_path: Path) -> None:
    head = ExitHead([2, 4, 4], 3)
    with pytest.raises(SegmentError, match=r"Residual cannot be cut after 'block\.conv1'"):
        export_early_exit(
            Residual(), ["block.conv1"], [head], None, torch.randn(1, 1, 4, 4), tmp_path
        )
    with pytest.raises(ValueError, match=r"`thresholds`=\[2\.0\] is not allowed"):
        export_early_exit(Residual(), ["block"], [head], [2.0], torch.randn(1, 1, 4, 4), tmp_path)


def test_export_model_writes_a_deployment_and_reports_one_it_cannot_write(
    exported: Any, tmp_path: Path
) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sparse.deploy.export import export_model

    module, heads, _, _ = exported
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(
        TensorDataset(torch.randn(12, 1, 8, 8, generator=generator), torch.arange(12) % 10),
        batch_size=5,
    )
    spec = {"exits": EXITS, "heads": heads, "thresholds": [0.5, 0.9]}
    summary = export_model(
        module,
        loader,
        tmp_path / "export",
        latency_runs=2,
        deployments=[("early_exit", spec)],
    )
    stages = summary["early_exit"]
    assert stages["dir"] == str(tmp_path / "export" / "early_exit")
    assert stages["inputs"] == 12
    assert stages["thresholds"] == [0.5, 0.9]
    assert stages["plain_accuracy"] == summary["onnx_fp32_acc"]
    assert (tmp_path / "export" / "early_exit" / MANIFEST_FILE).is_file()
    # Heads that do not match the exits: the plain export stands, the form reports its error.
    broken = {"exits": EXITS, "heads": heads[:1], "thresholds": None}
    summary = export_model(
        module, loader, tmp_path / "again", latency_runs=2, deployments=[("early_exit", broken)]
    )
    assert "1 heads for 2 exits" in summary["early_exit"]["error"]
    assert (tmp_path / "again" / "model.onnx").is_file()
    assert not (tmp_path / "again" / "early_exit").exists()
    with pytest.raises(ValueError, match=r"`deployments`: \['staged'\] not known"):
        export_model(module, loader, tmp_path / "x", deployments=[("staged", spec)])
