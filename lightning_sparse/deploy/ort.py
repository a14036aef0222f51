"""The one module that runs ONNX Runtime: sessions, interleaved latency, backend versions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "OrtModel",
    "interleaved_latency_ms",
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
