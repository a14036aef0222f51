"""Early-exit deployment: the model as ONNX stages and heads, a runner, and what it measures.

:func:`export_early_exit` writes, for exits after layers ``e_1 .. e_K``:

- ``stage_0.onnx`` (input -> output of ``e_1``), ``stage_i.onnx`` (output of ``e_i`` -> output of
  ``e_{i+1}``), ``stage_K.onnx`` (output of ``e_K`` -> logits);
- ``head_i.onnx`` (output of ``e_{i+1}`` -> that exit's logits), one per exit;
- ``plain.onnx`` (input -> logits), the model without exits, for comparison;
- ``early_exit.json``: the exits, thresholds and files.

The model is traced once with ``torch.fx`` (which checks that each exit cuts it cleanly, see
:func:`~lightning_sparse.core.early_exit.trace_with_cuts`), exported once with the exit layers'
outputs and the heads' logits as extra outputs, and every file above is extracted from that one
graph by tensor names, so stages and the plain model share their numbers exactly. The export is
for batch 1 (a static shape): inputs leave at different exits, so a batch would split anyway, and
a dynamic batch makes later stages read the input's shape, which they do not have.

:class:`EarlyExitRunner` runs the stages with ONNX Runtime at batch 1 and stops at the first exit
whose max softmax probability reaches its threshold (1.0 turns an exit off).
:func:`early_exit_report` measures accuracy, mean latency and the share of inputs leaving at each
exit per threshold setting, against the plain model, interleaved input by input.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_sparse.core.early_exit import trace_with_cuts
from lightning_sparse.deploy.onnx_int8 import quiet_export
from lightning_sparse.deploy.ort import OrtModel

__all__ = [
    "MANIFEST_FILE",
    "EarlyExitRunner",
    "deploy_early_exit",
    "early_exit_report",
    "export_early_exit",
    "format_report",
]

MANIFEST_FILE = "early_exit.json"
_INPUT = "input"
_LOGITS = "logits"


def _features(index: int) -> str:
    return f"features_{index}"


def _exit(index: int) -> str:
    return f"exit_{index}"


class _Staged(nn.Module):
    """The traced model and the heads as one module: logits, exit features, exit logits."""

    def __init__(self, traced: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.traced = traced
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, *features = self.traced(x)
        exits = [head(f) for head, f in zip(self.heads, features, strict=True)]
        return (logits, *features, *exits)


def _check_thresholds(thresholds: Sequence[float], exits: int) -> list[float]:
    values = [float(t) for t in thresholds]
    if len(values) != exits or not all(0.0 <= t <= 1.0 for t in values):
        raise ValueError(
            f"`thresholds`={list(thresholds)!r} is not allowed; give one probability in [0, 1] "
            f"per exit ({exits}); 1.0 turns an exit off."
        )
    return values


def export_early_exit(
    module: nn.Module,
    exits: Sequence[str],
    heads: Sequence[nn.Module],
    thresholds: Sequence[float] | None,
    example: torch.Tensor,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Write ``module`` as ONNX stages cut at ``exits``, the heads, and a manifest.

    Args:
        module: the model whose ``named_modules()`` the exit names refer to (e.g. the
            ``ClassificationModule``); exported in eval mode, in float.
        exits: the exit layers, in forward order.
        heads: one module per exit, taking that layer's output to logits (``EarlyExit.heads``).
        thresholds: one per exit (``EarlyExit.thresholds``); None: all 1.0 (off).
        example: an input batch; its first sample fixes the (batch 1) input shape.
        out_dir: where the files go (created).

    Returns:
        The manifest written to ``early_exit.json``.

    Raises:
        SegmentError: the model cannot be cut at ``exits`` (names the model type and the exit).
        ValueError: ``heads`` or ``thresholds`` do not match ``exits``.
    """
    import onnx
    from onnx.utils import Extractor

    exits = list(exits)
    if len(heads) != len(exits):
        raise ValueError(
            f"`heads`: {len(heads)} heads for {len(exits)} exits; train them with EarlyExit "
            "first (its `heads` are empty before the first step)."
        )
    chosen = _check_thresholds([1.0] * len(exits) if thresholds is None else thresholds, len(exits))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modes = [(m, m.training) for m in (module, *heads)]
    try:
        for m, _ in modes:
            m.eval()
        traced = trace_with_cuts(module, exits)
        staged = _Staged(traced, heads).eval()
        sample = example[:1].detach().to(next(module.parameters()).device).float()
        names = [_LOGITS, *map(_features, range(len(exits))), *map(_exit, range(len(exits)))]
        with quiet_export(), torch.no_grad():
            program = torch.onnx.export(
                staged,
                (sample,),
                dynamo=True,
                optimize=False,
                verbose=False,
                input_names=[_INPUT],
                output_names=names,
            )
        assert program is not None
        graph = program.model_proto
    finally:
        for m, training in modes:
            m.train(training)
    extractor = Extractor(graph)
    boundaries = [_INPUT, *map(_features, range(len(exits))), _LOGITS]
    files: dict[str, tuple[str, str]] = {"plain.onnx": (_INPUT, _LOGITS)}
    for index, (source, target) in enumerate(itertools.pairwise(boundaries)):
        files[f"stage_{index}.onnx"] = (source, target)
    for index in range(len(exits)):
        files[f"head_{index}.onnx"] = (_features(index), _exit(index))
    for file, (source, target) in files.items():
        onnx.save(extractor.extract_model([source], [target]), str(out / file))
    manifest = {
        "exits": exits,
        "thresholds": chosen,
        "input_shape": list(sample.shape),
        "num_classes": int(graph_output_width(graph, _LOGITS)),
        "stages": [f"stage_{i}.onnx" for i in range(len(exits) + 1)],
        "heads": [f"head_{i}.onnx" for i in range(len(exits))],
        "plain": "plain.onnx",
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def deploy_early_exit(
    module: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    out_dir: Path,
    spec: Mapping[str, Any],
    threads: int | None,
    max_inputs: int = 1000,
) -> dict[str, Any]:
    """The training job's early-exit deployment: stages in ``out_dir`` and what they measure.

    Exports with :func:`export_early_exit` and measures the calibrated thresholds against the
    plain model with :func:`early_exit_report` on up to ``max_inputs`` labelled test inputs.

    Args:
        module: the trained model.
        batches: ``(inputs, labels)`` test batches; inputs one tensor, labels present.
        out_dir: where the stages go.
        spec: the technique's ``deployment()`` data: ``exits``, ``heads``, ``thresholds``.
        threads: ONNX Runtime intra-op threads (None: 1, as the timing is at batch 1).
        max_inputs: inputs measured at most.

    Returns:
        ``exits``, ``thresholds``, ``inputs``, ``accuracy`` and ``plain_accuracy``, ``mean_ms``
        and ``plain_mean_ms`` (batch 1), ``speedup`` (plain / early exit mean latency) and
        ``exit_fractions`` (one per exit, then the full model).

    Raises:
        ValueError: batches without labels or with inputs that are not one tensor.
        SegmentError: the model cannot be cut at the exits.
    """
    inputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    count = 0
    for x, y in batches:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError(
                "early-exit deployment measures accuracy per exit: it needs test batches of one "
                f"input tensor and labels, got inputs {type(x).__name__}, labels "
                f"{type(y).__name__}."
            )
        inputs.append(x.detach().cpu().float())
        labels.append(y.detach().cpu())
        count += len(x)
        if count >= max_inputs:
            break
    if not inputs:
        raise ValueError("early-exit deployment got no test batch to measure on.")
    xs = torch.cat(inputs)[:max_inputs]
    ys = torch.cat(labels)[:max_inputs]
    manifest = export_early_exit(
        module, spec["exits"], spec["heads"], spec.get("thresholds"), xs[:1], out_dir
    )
    report = early_exit_report(
        out_dir,
        xs.numpy(),
        ys.numpy(),
        {"calibrated": manifest["thresholds"]},
        threads=1 if threads is None else threads,
    )
    measured = report["settings"]["calibrated"]
    return {
        "exits": manifest["exits"],
        "thresholds": manifest["thresholds"],
        "inputs": report["inputs"],
        "accuracy": measured["accuracy"],
        "plain_accuracy": report["plain"]["accuracy"],
        "mean_ms": measured["mean_ms"],
        "plain_mean_ms": report["plain"]["mean_ms"],
        "speedup": measured["speedup"],
        "exit_fractions": measured["exit_fractions"],
    }


def graph_output_width(graph: Any, name: str) -> int:
    """The last dimension of graph output ``name`` (the class count of the logits)."""
    for output in graph.graph.output:
        if output.name == name:
            return int(output.type.tensor_type.shape.dim[-1].dim_value)
    raise KeyError(name)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True))


class EarlyExitRunner:
    """Run an exported early-exit model with ONNX Runtime, one input at a time.

    For each input: run stage 0; for each exit that is on (threshold < 1), run its head and stop
    if its max softmax probability is ``>= threshold``; else run the next stage; the last stage
    gives the full model's logits.

    Args:
        export_dir: a directory written by :func:`export_early_exit`.
        thresholds: one per exit; None: those in the manifest.
        threads: ONNX Runtime intra-op threads per session (1 for latency measurements).

    Example::

        runner = EarlyExitRunner("export/early_exit", threads=1)
        logits, exit_index = runner.run(image[None].numpy())  # exit_index == len(exits): full
    """

    def __init__(
        self,
        export_dir: str | Path,
        thresholds: Sequence[float] | None = None,
        threads: int | None = 1,
    ) -> None:
        folder = Path(export_dir)
        self.manifest = json.loads((folder / MANIFEST_FILE).read_text())
        self.exits: list[str] = list(self.manifest["exits"])
        self.stages = [OrtModel(folder / f, threads) for f in self.manifest["stages"]]
        self.heads = [OrtModel(folder / f, threads) for f in self.manifest["heads"]]
        self.plain = OrtModel(folder / self.manifest["plain"], threads)
        self.thresholds = _check_thresholds(
            self.manifest["thresholds"] if thresholds is None else thresholds, len(self.exits)
        )

    def run(
        self, inputs: np.ndarray, thresholds: Sequence[float] | None = None
    ) -> tuple[np.ndarray, int]:
        """Logits ``[1, classes]`` and the exit taken (``len(exits)``: the full model).

        Args:
            inputs: one input, ``[1, *input_shape]`` float32.
            thresholds: override the runner's for this call.
        """
        chosen = self.thresholds if thresholds is None else thresholds
        hidden = inputs
        for index, head in enumerate(self.heads):
            hidden = self.stages[index](hidden)
            threshold = chosen[index]
            if threshold < 1.0:
                logits = head(hidden)
                if float(_softmax(logits).max()) >= threshold:
                    return logits, index
        return self.stages[-1](hidden), len(self.heads)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.run(inputs)[0]


def early_exit_report(
    export_dir: str | Path,
    inputs: np.ndarray,
    labels: np.ndarray,
    settings: Mapping[str, Sequence[float]],
    threads: int | None = 1,
    warmup: int = 20,
) -> dict[str, Any]:
    """Accuracy, mean latency and exit shares per threshold setting, against the plain model.

    Every input runs through the plain model and through the runner under each setting, one
    after the other (batch 1, the order rotating from input to input), so load from other
    processes hits them alike and the latency ratios mean something on a shared machine.

    Args:
        export_dir: a directory written by :func:`export_early_exit`.
        inputs: ``[N, *input_shape]`` float32 test inputs.
        labels: ``[N]`` integer labels.
        settings: name -> thresholds (one per exit), e.g. ``{"calibrated": [0.93], "off": [1]}``.
        threads: ONNX Runtime intra-op threads.
        warmup: calls of each before timing.

    Returns:
        ``{"inputs", "threads", "exits", "plain": {"accuracy", "mean_ms", "median_ms"},
        "settings": {name: {"thresholds", "accuracy", "mean_ms", "median_ms", "speedup",
        "exit_fractions"}}}``; accuracies as fractions, ``speedup`` the ratio of mean latencies,
        ``exit_fractions`` one per exit plus the full model last.
    """
    if "plain" in settings:
        raise ValueError("`settings`: 'plain' names the model without exits; call yours otherwise.")
    runner = EarlyExitRunner(export_dir, threads=threads)
    chosen = {name: _check_thresholds(t, len(runner.exits)) for name, t in settings.items()}
    batch = np.ascontiguousarray(inputs, dtype=np.float32)
    for index in range(min(warmup, len(batch))):
        runner.plain(batch[index : index + 1])
        for thresholds in chosen.values():
            runner.run(batch[index : index + 1], thresholds)
    times: dict[str, list[float]] = {name: [] for name in ["plain", *chosen]}
    correct = dict.fromkeys(times, 0)
    taken = {name: [0] * (len(runner.exits) + 1) for name in chosen}
    names = list(times)
    for index in range(len(batch)):
        sample = batch[index : index + 1]
        label = int(labels[index])
        # Rotate who goes first, so that no setting always runs right after the same one.
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            if name == "plain":
                logits, exit_index = runner.plain(sample), -1
            else:
                logits, exit_index = runner.run(sample, chosen[name])
            times[name].append((time.perf_counter() - start) * 1e3)
            correct[name] += int(int(logits.argmax()) == label)
            if exit_index >= 0:
                taken[name][exit_index] += 1
    count = max(len(batch), 1)

    def mean(name: str) -> float:
        return statistics.fmean(times[name]) if times[name] else 0.0

    def median(name: str) -> float:
        return statistics.median(times[name]) if times[name] else 0.0

    report: dict[str, Any] = {
        "inputs": len(batch),
        "threads": threads,
        "exits": runner.exits,
        "plain": {
            "accuracy": correct["plain"] / count,
            "mean_ms": mean("plain"),
            "median_ms": median("plain"),
        },
        "settings": {},
    }
    for name, thresholds in chosen.items():
        report["settings"][name] = {
            "thresholds": thresholds,
            "accuracy": correct[name] / count,
            "mean_ms": mean(name),
            "median_ms": median(name),
            "speedup": mean("plain") / mean(name) if mean(name) else 0.0,
            "exit_fractions": [n / count for n in taken[name]],
        }
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """:func:`early_exit_report`'s result as a markdown table."""
    exits = [*report["exits"], "full"]
    head = "| setting | thresholds | accuracy | mean ms | median ms | speed-up (mean) | "
    head += " | ".join(f"leave at {e}" for e in exits)
    lines = [head + " |", "|" + "---|" * (6 + len(exits))]
    plain = report["plain"]
    blanks = " | ".join("" for _ in exits)
    lines.append(
        f"| plain model | - | {100 * plain['accuracy']:.2f}% | {plain['mean_ms']:.3f} | "
        f"{plain['median_ms']:.3f} | 1.00x | {blanks} |"
    )
    for name, row in report["settings"].items():
        thresholds = ", ".join(f"{t:.3f}" for t in row["thresholds"])
        shares = " | ".join(f"{100 * f:.1f}%" for f in row["exit_fractions"])
        lines.append(
            f"| {name} | {thresholds} | {100 * row['accuracy']:.2f}% | {row['mean_ms']:.3f} | "
            f"{row['median_ms']:.3f} | {row['speedup']:.2f}x | {shares} |"
        )
    return "\n".join(lines)
