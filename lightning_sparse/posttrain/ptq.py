"""Post-training quantization (PTQ): calibrate observers on data, no training."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_sparse.callbacks.quantization import _check_ignore, _check_spec, select_layers
from lightning_sparse.core.batch import model_inputs, to_device
from lightning_sparse.core.fake_quant import (
    QuantizedModel,
    QuantSpec,
    install,
    quantized_layers,
)

__all__ = [
    "ptq",
    "ptq_calibrate",
    "ptq_check",
]


def ptq(
    module: nn.Module,
    datamodule: pl.LightningDataModule,
    num_batches: int = 16,
    *,
    num_bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = True,
    ignore: Sequence[str] = (),
    exclude_first_last: bool = False,
) -> QuantizedModel:
    """Post-training quantization: calibrate scales on training batches, no training.

    The first ``num_batches`` batches of ``datamodule.train_dataloader()`` go to
    :func:`ptq_calibrate`; see there.

    Args:
        module: the trained model (e.g. a ``ClassificationModule``); its forward takes the first
            element of each batch.
        datamodule: supplies the calibration data (training split).
        num_batches: batches to calibrate on (fewer if the loader is shorter).
        num_bits: bits per weight, 8 or 4.
        symmetric: symmetric weights (zero point 0).
        per_channel: one weight scale per output channel.
        ignore: layers left in float, as in :class:`QuantizationAwareTraining`.
        exclude_first_last: leave the first and last Conv/Linear layers in float.

    Returns:
        The handle on the quantized layers (``.state_dict()`` saves the scales).

    Raises:
        ValueError: an argument is invalid (the message names it); the module is quantized
            already; a quantized layer saw no input during calibration.

    Example::

        handle = ptq(module, DigitsDataModule(), num_batches=8)
        summary = export_model(module, DigitsDataModule(), "runs/ptq/export")
    """
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"`num_batches`={num_batches!r} is not allowed; it must be an int >= 1.")
    # Checked before any data is read.
    ptq_check(
        module,
        num_bits=num_bits,
        symmetric=symmetric,
        per_channel=per_channel,
        ignore=ignore,
        exclude_first_last=exclude_first_last,
    )
    datamodule.setup("fit")
    return ptq_calibrate(
        module,
        itertools.islice(datamodule.train_dataloader(), num_batches),
        num_bits=num_bits,
        symmetric=symmetric,
        per_channel=per_channel,
        ignore=ignore,
        exclude_first_last=exclude_first_last,
    )


def ptq_check(
    module: nn.Module,
    *,
    num_bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = True,
    ignore: Sequence[str] = (),
    exclude_first_last: bool = False,
) -> list[str]:
    """Validate PTQ options against ``module`` without changing it; return the layers to quantize.

    Raises:
        ValueError: an argument is invalid, or a layer is quantized already (names it).
    """
    _check_spec(num_bits, symmetric, per_channel)
    if not isinstance(exclude_first_last, bool):
        raise ValueError(
            f"`exclude_first_last`={exclude_first_last!r} is not allowed; it must be true or false."
        )
    names = select_layers(module, _check_ignore(ignore), exclude_first_last)
    done = sorted(set(names) & set(quantized_layers(module)))
    if done:
        raise ValueError(
            f"ptq: layer {done[0]!r} is quantized already (by QAT or an earlier PTQ); leave it "
            "out with `ignore`."
        )
    return names


@torch.no_grad()
def ptq_calibrate(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    num_bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = True,
    ignore: Sequence[str] = (),
    exclude_first_last: bool = False,
) -> QuantizedModel:
    """Quantize ``module`` by calibrating on ``batches``: the PTQ core, for any data source.

    The module runs in eval mode (BatchNorm running statistics, no dropout), in float, on every
    batch while observers record the running min/max of each quantized layer's input and the weight
    ranges. Afterwards it computes with fake-quantized weights and inputs (observers frozen):
    exactly what ``lightning_sparse.export.export_model`` writes to ``model_int8.onnx``. Pruned
    zeros stay zero. On error the module is left as it was.

    Args:
        module: the trained model; its forward takes a batch, or the first element of a
            ``(inputs, labels)`` batch.
        batches: calibration batches (all are used).
        num_bits: bits per weight, 8 or 4.
        symmetric: symmetric weights (zero point 0).
        per_channel: one weight scale per output channel.
        ignore: layers left in float, as in :class:`QuantizationAwareTraining`.
        exclude_first_last: leave the first and last Conv/Linear layers in float.

    Raises:
        ValueError: as :func:`ptq_check`; no batch; a quantized layer saw no input.
    """
    names = ptq_check(
        module,
        num_bits=num_bits,
        symmetric=symmetric,
        per_channel=per_channel,
        ignore=ignore,
        exclude_first_last=exclude_first_last,
    )
    handle = install(module, names, QuantSpec(num_bits, symmetric, per_channel))
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    seen = 0
    try:
        with handle.calibrating():
            for batch in batches:
                module(to_device(model_inputs(batch), device))
                seen += 1
    except BaseException:
        handle.remove()
        raise
    finally:
        module.train(was_training)
    silent = [name for name, q in handle.layers.items() if not q.input_observed]
    if silent:
        handle.remove()
        reason = "no calibration batch was given" if not seen else "unused in forward?"
        raise ValueError(
            f"ptq: layers {silent} saw no input in {seen} calibration batches ({reason}); "
            "give batches, or leave unused layers out with `ignore`."
        )
    handle.set_phase(fake_quant=True, observe=False)
    rank_zero_info(f"ptq: calibrated {len(handle.layers)} layers on {seen} batches.")
    return handle
