"""Early exit and sparsity regularization on MNIST (data=mnist5k): a docs/benchmarks.md section.

Early exit: ``SmallCNN`` (width 32, 28x28) trained with ``EarlyExit`` (a head after ``conv1``,
pooled to ``--pool-size`` per side) and, for reference, the same model and seed trained
without it. Thresholds are calibrated on the validation split (1000 images: ``val_fraction`` 0.2)
for several accuracy-drop targets; the model is exported as ONNX stages
(``lightning_sparse.deploy.early_exit``) and every test image (1000) runs at batch 1 through the
plain model and through the stage runner under each setting, image by image in rotating order,
with one ONNX Runtime thread: accuracy, mean and median latency, the ratio of means and the share
leaving at each exit.

Regularization: the ``sparsity_reg`` recipe (group lasso over output channels, then GMP channel
masks) against ``gmp`` with the same channel masks and schedule and no penalty, at the same
channel fraction, as whole ``python -m lightning_sparse.train`` runs on ``model=lenet5``; test
accuracy.

Only the block between ``<!-- early_exit:start -->`` and ``<!-- early_exit:end -->`` is replaced
(appended if missing). Run from the repository root::

    python scripts/benchmark_early_exit.py                 # ~25 min on 2 busy CPU cores
    python scripts/benchmark_early_exit.py --quick --output /tmp/benchmarks.md   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- early_exit:start -->", "<!-- early_exit:end -->"
DROPS = (0.0, 0.0025, 0.005, 0.01)


def _train(args: argparse.Namespace, early_exit: Any | None) -> tuple[Any, Any, float]:
    """Train SmallCNN on mnist5k (with ``early_exit`` when given); module, data, test accuracy."""
    import lightning.pytorch as pl
    import torch

    from lightning_sparse import ClassificationModule
    from lightning_sparse.data import MNIST5kDataModule
    from lightning_sparse.models import SmallCNN

    pl.seed_everything(args.seed, verbose=False)
    model = SmallCNN(in_channels=1, num_classes=10, width=32, input_size=28)
    module = ClassificationModule(model, num_classes=10, lr=args.lr, lr_schedule="cosine")
    data = MNIST5kDataModule(batch_size=64, seed=args.seed, val_fraction=args.val_fraction)
    callbacks = [early_exit] if early_exit is not None else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        limit_train_batches=args.limit_batches,
    )
    trainer.fit(module, data)
    accuracy = trainer.test(module, data, verbose=False)[0]["test/acc"]
    torch.set_grad_enabled(True)
    return module, data, float(accuracy)


def early_exit_section(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from lightning_sparse import EarlyExit
    from lightning_sparse.deploy.early_exit import early_exit_report, export_early_exit

    started = time.perf_counter()
    exits = ["model.conv1"]
    callback = EarlyExit(exits=exits, pool_size=args.pool_size, head_lr=0.01)
    module, data, accuracy = _train(args, callback)
    baseline = None if args.no_baseline else _train(args, None)[2]
    settings: dict[str, list[float]] = {}
    for drop in DROPS:
        callback.max_accuracy_drop = drop
        settings[f"calibrated, drop <= {100 * drop:g} pt"] = callback.calibrate(
            module, data.val_dataloader()
        )
    inputs, labels = [], []
    for batch_inputs, batch_labels in data.test_dataloader():
        inputs.append(batch_inputs)
        labels.append(batch_labels)
    test_inputs = torch.cat(inputs)[: args.test_images].numpy()
    test_labels = torch.cat(labels)[: args.test_images].numpy()
    out = work / "early_exit"
    export_early_exit(module, exits, callback.heads, None, torch.from_numpy(test_inputs), out)
    report = early_exit_report(out, test_inputs, test_labels, settings, threads=1)
    report["torch_test_acc"] = accuracy
    report["baseline_test_acc"] = baseline
    report["val_head_accuracy"] = callback.last_calibration["head_accuracy"]
    report["seconds"] = time.perf_counter() - started
    return report


def _train_run(overrides: list[str], root: Path, name: str) -> dict[str, Any]:
    run_dir = root / name
    command = [
        sys.executable,
        "-m",
        "lightning_sparse.train",
        *overrides,
        "export=false",
        "baseline=null",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"command": "python " + shlex.join(command[1:-1]), "summary": summary}


def regularization_section(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    schedule = [
        "data=mnist5k",
        "model=lenet5",
        f"seed={args.seed}",
        f"trainer.max_epochs={args.reg_epochs}",
        f"recipe.pruning.start_epoch={args.reg_epochs // 2}",
        f"recipe.pruning.end_epoch={3 * args.reg_epochs // 4}",
        "recipe.pruning.update_frequency=1",
        f"trainer.limit_train_batches={args.limit_batches}",
    ]
    rows = []
    for fraction in args.fractions:
        masks = [f"recipe.pruning.final_sparsity={fraction}"]
        plain = _train_run(
            [
                "recipe=gmp",
                *schedule,
                *masks,
                "recipe.pruning.mask_type=channel",
                "recipe.pruning.params=[model.conv1.weight,model.conv2.weight,model.fc1.weight]",
            ],
            work,
            f"gmp_channel_{fraction}",
        )
        rows.append({"variant": "gmp, channel masks", "fraction": fraction, **plain})
        for strength in args.strengths:
            regularized = _train_run(
                [
                    "recipe=sparsity_reg",
                    *schedule,
                    *masks,
                    f"recipe.regularization.strength={strength}",
                ],
                work,
                f"sparsity_reg_{fraction}_{strength}",
            )
            label = f"sparsity_reg, group lasso {strength:g}"
            rows.append({"variant": label, "fraction": fraction, **regularized})
    return rows


def render(
    early: dict[str, Any] | None, reg: list[dict[str, Any]], args: argparse.Namespace
) -> str:
    from lightning_sparse.deploy.early_exit import format_report
    from lightning_sparse.deploy.ort import versions

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    try:
        model_name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = f"{model_name}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        pass
    lines = [
        BEGIN,
        "## Early exit and sparsity regularization (mnist5k)",
        "",
        f"`python scripts/benchmark_early_exit.py {shlex.join(args.argv)}`".replace(" `", "`"),
        f"({now}; {cpu}, shared with other jobs; "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f"; seed {args.seed}, one seed).",
        "",
    ]
    if early is not None:
        baseline = early["baseline_test_acc"]
        lines += [
            "### Early exit: SmallCNN (width 32) with a head after `conv1`",
            "",
            f"Trained {args.epochs} epochs with `EarlyExit(exits=[model.conv1], pool_size="
            f"{args.pool_size})`; PyTorch test accuracy {100 * early['torch_test_acc']:.2f}%"
            + (
                f" (the same model and seed trained without exits: {100 * baseline:.2f}%)"
                if baseline is not None
                else ""
            )
            + f". Head accuracy on validation: {100 * early['val_head_accuracy'][0]:.1f}%. "
            f"Thresholds calibrated on the {round(5000 * args.val_fraction)} validation images "
            f"(`data.val_fraction={args.val_fraction:g}`); below, {early['inputs']} test "
            "images at batch 1, ONNX Runtime with one thread, the plain model and each setting "
            "run image by image in turn; mean latency per image.",
            "",
            format_report(early),
            "",
        ]
    if reg:
        lines += [
            "### Group lasso, then channel masks vs channel masks alone: LeNet-5",
            "",
            "Whole `python -m lightning_sparse.train` runs (test split, 1000 images: one image is "
            "0.1 points); the same masks (`mask_type: channel` on conv1, conv2, fc1) and schedule, "
            "with and without the group-lasso phase before them.",
            "",
            "| variant | channels masked | test acc | command |",
            "|---|---|---|---|",
        ]
        for row in reg:
            summary = row["summary"]
            lines.append(
                f"| {row['variant']} | {100 * row['fraction']:g}% | "
                f"{100 * summary['test_acc']:.2f}% | `{row['command']}` |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_section(text: str, output: Path) -> None:
    current = output.read_text() if output.exists() else "# Benchmarks\n"
    if BEGIN in current and END in current:
        before, rest = current.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        current = before + text + after
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    output.write_text(current)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--pool-size", type=int, default=7)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--limit-batches", type=float, default=1.0)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--reg-epochs", type=int, default=20)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.75])
    parser.add_argument("--strengths", type=float, nargs="*", default=[1e-4])
    parser.add_argument("--skip", choices=["early_exit", "regularization"], default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.epochs, args.test_images, args.limit_batches = 1, 20, 0.05
        args.no_baseline, args.reg_epochs, args.fractions = True, 4, [0.5]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_early_exit_") as tmp:
        work = Path(tmp)
        early = None if args.skip == "early_exit" else early_exit_section(args, work)
        if early is not None:
            print(json.dumps({k: v for k, v in early.items()}, indent=1, default=str))
        reg = [] if args.skip == "regularization" else regularization_section(args, work)
        for row in reg:
            print(row["variant"], row["fraction"], row["summary"]["test_acc"])
    text = render(early, reg, args)
    write_section(text, args.output)
    print(text)


if __name__ == "__main__":
    main()
