from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_sparse.callbacks import (
    MagnitudePruning,
    QuantizationAwareTraining,
    WeightClustering,
)
from lightning_sparse.callbacks.base import check_timing
from lightning_sparse.core.clustering import reconstruct
from tests.helpers import TinyData, TinyModule, fit_resumable, quiet_trainer, run_ddp_script


def _distinct(weight: torch.Tensor) -> int:
    return int(torch.unique(weight[weight != 0]).numel())


class Trajectory(pl.Callback):
    """Records, after every step, the distinct non-zero values of each weight and its zeros."""

    def __init__(self, clustering: WeightClustering) -> None:
        self.clustering = clustering
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.steps.append(
            {
                "step": trainer.global_step,
                "clustered": self.clustering.clustered,
                "distinct": {n: _distinct(w) for n, w in weights.items() if n.endswith("weight")},
                "weights": weights,
            }
        )


def _fit(callbacks: list[pl.Callback], max_epochs: int = 3, **module: Any) -> TinyModule:
    pl.seed_everything(0)
    model = TinyModule(**module)
    quiet_trainer(max_epochs=max_epochs, callbacks=callbacks).fit(model, TinyData())
    return model


def test_weights_share_k_values_from_start_epoch_and_the_centroids_train() -> None:
    # TinyData: 10 optimizer steps per epoch; SGD with momentum and weight decay.
    clustering = WeightClustering(num_clusters=4, start_epoch=1.0, centroid_lr=1e-2)
    trajectory = Trajectory(clustering)
    _fit([clustering, trajectory])
    before = [s for s in trajectory.steps if not s["clustered"]]
    after = [s for s in trajectory.steps if s["clustered"]]
    # Clustered right after the step that reaches epoch 1 (step 10), not before.
    assert [s["step"] for s in before] == list(range(1, 10))
    assert after[0]["step"] == 10
    assert all(d > 4 for d in before[-1]["distinct"].values())
    for step in after:
        assert step["distinct"] == {
            "model.conv1.weight": 4,
            "model.fc1.weight": 4,
            "model.fc2.weight": 4,
        }
    # The centroids moved (the weights changed) while each weight kept its cluster.
    books = clustering.codebooks
    first, last = after[0]["weights"], after[-1]["weights"]
    for name, (centroids, assignments, mask) in books.items():
        assert not torch.equal(first[name], last[name]), name
        assert torch.equal(last[name], reconstruct(centroids, assignments, mask)), name
        for index in range(4):
            members = first[name][(assignments == index) & mask]
            assert torch.equal(members, members[:1].expand_as(members)), (name, index)
    # Biases are not targets: they keep training with the model's optimizer.
    assert not torch.equal(first["model.fc1.bias"], last["model.fc1.bias"])


def test_per_channel_codebooks_hold_k_values_per_output_channel() -> None:
    clustering = WeightClustering(num_clusters=3, per_channel=True, params="model.fc1.weight")
    module = _fit([clustering], max_epochs=1)
    weight = module.model.fc1.weight.detach()
    assert all(_distinct(row) <= 3 for row in weight)
    assert _distinct(weight) > 3
    centroids, _, _ = clustering.codebooks["model.fc1.weight"]
    assert centroids.shape == (weight.shape[0], 3)
    assert clustering.target_names == ["model.fc1.weight"]


def test_pruned_zeros_stay_zero_and_are_never_a_centroid() -> None:
    pruning = MagnitudePruning(final_sparsity=0.7, start_epoch=0, end_epoch=1, update_frequency=0.5)
    clustering = WeightClustering(num_clusters=4, start_epoch=1.5, centroid_lr=1e-2)
    trajectory = Trajectory(clustering)
    module = _fit([pruning, clustering, trajectory])
    for name, (centroids, _, mask) in clustering.codebooks.items():
        assert torch.equal(mask, pruning.masks[name]), name
        weight = dict(module.named_parameters())[name].detach()
        assert torch.equal(weight == 0, ~mask), name  # no kept weight became zero, no zero grew
        assert bool((centroids != 0).all()), name
    assert all(s["distinct"]["model.fc1.weight"] == 4 for s in trajectory.steps if s["clustered"])


class HalvedAfterEpoch1(TinyModule):
    """TinyModule whose learning-rate schedule halves the rate from step 10 (epoch 1) on."""

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 if s >= 10 else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize(("follow", "factor"), [(False, 1.0), (True, 0.5)])
def test_the_centroid_step_is_the_summed_gradient_of_its_cluster(
    follow: bool, factor: float
) -> None:
    clustering = WeightClustering(
        num_clusters=4,
        start_epoch=1.0,
        centroid_optimizer="sgd",
        centroid_lr=0.1,
        follow_lr_schedule=follow,
        params="model.fc2.weight",
    )

    class Grads(pl.Callback):
        """Runs before the clustering callback: the weight's gradient as the step sees it."""

        def __init__(self) -> None:
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, *_: Any) -> None:
            if clustering.clustered:
                centroids = clustering.codebooks["model.fc2.weight"][0].clone()
                self.seen.append((pl_module.model.fc2.weight.grad.clone(), centroids))

    grads = Grads()
    pl.seed_everything(0)
    quiet_trainer(max_epochs=2, callbacks=[grads, clustering]).fit(HalvedAfterEpoch1(), TinyData())
    assert len(grads.seen) == 10
    _, assignments, mask = clustering.codebooks["model.fc2.weight"]
    step = 0.1 * factor  # the centroid rate, scaled by the model's schedule when followed
    for (grad, centroids), (_, following) in itertools.pairwise(grads.seen):
        summed = torch.zeros(4).scatter_add_(0, assignments[mask], grad[mask])
        torch.testing.assert_close(following, centroids - step * summed, rtol=0, atol=1e-7)


def test_centroids_freeze_at_end_epoch() -> None:
    clustering = WeightClustering(num_clusters=4, start_epoch=1.0, end_epoch=2.0, centroid_lr=1e-2)
    trajectory = Trajectory(clustering)
    _fit([clustering, trajectory])
    at_end = next(s for s in trajectory.steps if s["step"] == 20)["weights"]
    last = trajectory.steps[-1]["weights"]
    for name in clustering.target_names:
        assert torch.equal(at_end[name], last[name]), name
    assert not torch.equal(at_end["model.fc1.bias"], last["model.fc1.bias"])


def _resumable_run(
    tmp_path: Path, crash_at: int | None, ckpt_path: str | None
) -> tuple[TinyModule, WeightClustering]:
    pl.seed_everything(0)
    module = TinyModule()
    clustering = WeightClustering(num_clusters=4, start_epoch=1.0, centroid_lr=1e-2)
    callbacks: list[pl.Callback] = [
        MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=0.5, update_frequency=0.5),
        clustering,
    ]
    fit_resumable(module, callbacks, tmp_path, crash_at, ckpt_path)
    return module, clustering


@pytest.mark.parametrize("resume_step", [5, 15])  # before and after the clustering at step 10
def test_crash_and_resume_is_bit_identical(tmp_path: Path, resume_step: int) -> None:
    whole, whole_clustering = _resumable_run(tmp_path / "whole", None, None)
    with pytest.raises(RuntimeError, match="crash on purpose"):
        _resumable_run(tmp_path / "crashed", 17, None)
    checkpoint = tmp_path / "crashed" / f"step={resume_step}.ckpt"
    state = torch.load(checkpoint, weights_only=True)["callbacks"]["WeightClustering"]
    assert (state["codebooks"] is None) == (resume_step < 10)
    resumed, clustering = _resumable_run(tmp_path / "resumed", None, str(checkpoint))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    for name, (centroids, assignments, mask) in whole_clustering.codebooks.items():
        other = clustering.codebooks[name]
        assert torch.equal(centroids, other[0]), name
        assert torch.equal(assignments, other[1]), name
        assert torch.equal(mask, other[2]), name


def test_composes_with_qat_after_it() -> None:
    clustering = WeightClustering(num_clusters=4, start_epoch=1.0, centroid_lr=1e-2)
    qat = QuantizationAwareTraining(start_epoch=2.0)
    trajectory = Trajectory(clustering)
    _fit([clustering, qat, trajectory])
    assert qat.fake_quant_enabled
    first = next(s for s in trajectory.steps if s["step"] == 20)["weights"]
    last = trajectory.steps[-1]["weights"]
    for name in clustering.target_names:
        assert _distinct(last[name]) == 4, name
        assert not torch.equal(first[name], last[name]), name  # gradients reach the centroids


def test_clustering_before_pruning_ends_is_refused_naming_both() -> None:
    techniques = {
        "recipe.pruning": MagnitudePruning(final_sparsity=0.9, start_epoch=0, end_epoch=10),
        "recipe.clustering": WeightClustering(start_epoch=5),
    }
    with pytest.raises(
        ValueError,
        match=r"recipe.clustering.start_epoch=5 comes before recipe.pruning.end_epoch=10",
    ):
        check_timing(techniques)
    techniques["recipe.clustering"] = WeightClustering(start_epoch=10)
    check_timing(techniques)
    # QAT freezing its scales while the centroids still train would freeze stale scales.
    techniques["recipe.quantization"] = QuantizationAwareTraining(
        start_epoch=12, disable_quantization_observer_epoch=14
    )
    with pytest.raises(ValueError, match=r"comes before recipe.clustering.end_epoch=inf"):
        check_timing(techniques)
    techniques["recipe.clustering"] = WeightClustering(start_epoch=10, end_epoch=14)
    check_timing(techniques)


def test_the_schedule_must_fit_in_training() -> None:
    with pytest.raises(
        ValueError, match=r"`start_epoch`=3 is not before the trainer's max_epochs=3"
    ):
        _fit([WeightClustering(start_epoch=3)])


def test_params_that_match_nothing_are_named() -> None:
    with pytest.raises(ValueError, match=r"`params` entry 'model.nope' matches no prunable weight"):
        WeightClustering(params="model.nope").check_model(TinyModule())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clusters": 1}, r"`num_clusters`=1 is not allowed; it must be an integer in \[2,"),
        ({"num_clusters": 4.0}, r"`num_clusters`=4.0 is not allowed"),
        ({"start_epoch": -1}, r"`start_epoch`=-1 is not allowed"),
        ({"start_epoch": 2, "end_epoch": 2}, r"`end_epoch`=2 is not allowed; it must be null or"),
        ({"params": []}, r"`params`=\[\] must be a parameter name"),
        ({"init": "kmeans++"}, r"`init`='kmeans\+\+' is not allowed; choose one of"),
        ({"per_channel": "yes"}, r"`per_channel`='yes' is not allowed; it must be true or false"),
        ({"centroid_lr": 0}, r"`centroid_lr`=0 is not allowed; it must be > 0"),
        ({"centroid_optimizer": "lamb"}, r"`centroid_optimizer`='lamb' is not allowed"),
        ({"iterations": -1}, r"`iterations`=-1 is not allowed"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WeightClustering(**kwargs)


def test_a_checkpoint_for_other_params_is_refused(tmp_path: Path) -> None:
    clustering = WeightClustering(num_clusters=4, start_epoch=0)
    _fit([clustering], max_epochs=1)
    state = clustering.state_dict()
    narrower = WeightClustering(num_clusters=4, params="model.fc1.weight")
    narrower.load_state_dict(state)
    with pytest.raises(ValueError, match=r"holds codebooks for \['model.conv1.weight', 'model.fc2"):
        _fit([narrower], max_epochs=2)


@pytest.mark.slow
def test_codebooks_are_identical_on_both_ranks(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp_script("tests.callbacks.ddp_clustering_script", tmp_path)
    assert rank0["codebooks"].keys() == rank1["codebooks"].keys()
    for name, book in rank0["codebooks"].items():
        for key, value in book.items():
            assert torch.equal(value, rank1["codebooks"][name][key]), (name, key)
        assert int((book["centroids"] != rank0["at_clustering"][name]).sum()) > 0, name
    for name, weight in rank0["final"].items():
        assert torch.equal(weight, rank1["final"][name]), name
        if name in rank0["codebooks"]:
            assert _distinct(weight) <= 4, name
