"""The one module that runs ONNX Runtime: sessions, interleaved latency, backend versions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "OrtModel",
    "interleaved_latency_ms",
    "tensor_ranges",
    "versions",
]


class OrtModel:
    """An ONNX Runtime CPU session over one model file.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; ``None`` lets ONNX Runtime choose (all cores).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.input_name = self.input_names[0]

    def __call__(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """The first output (logits) for a batch: one array, or arrays by graph input name."""
        feed = dict(inputs) if isinstance(inputs, Mapping) else {self.input_name: inputs}
        return np.asarray(self.session.run(None, feed)[0])


def tensor_ranges(
    model: Any,
    names: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    threads: int | None = None,
) -> dict[str, tuple[float, float]]:
    """Min and max of the float tensors ``names`` of ``model`` (a ModelProto) over ``feeds``.

    The tensors become extra graph outputs of a copy, run by ONNX Runtime with basic graph
    optimizations only, which keep every named tensor.
    """
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {output.name for output in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    ranges: dict[str, tuple[float, float]] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(list(names), dict(feed)), strict=True):
            low, high = float(np.min(value)), float(np.max(value))
            if name in ranges:
                low, high = min(low, ranges[name][0]), max(high, ranges[name][1])
            ranges[name] = (low, high)
    return ranges


def interleaved_latency_ms(
    models: Mapping[str, Callable[[Any], Any]],
    inputs: Any,
    runs: int = 50,
    warmup: int = 5,
) -> dict[str, float]:
    """Median wall-clock milliseconds per call of each model, measured round-robin.

    Alternating the models call by call makes load from other processes hit them alike, so their
    ratio is meaningful on a shared machine even when absolute numbers drift.
    """
    for _ in range(warmup):
        for model in models.values():
            model(inputs)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model(inputs)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def versions() -> dict[str, str]:
    """Versions of the backend packages, for reports."""
    import onnx
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
