"""Post-training compression (a library): one-shot steps and post-training quantization."""

from lightning_sparse.posttrain.channel import OneShotChannelPruning
from lightning_sparse.posttrain.oneshot import (
    OneShotPruning,
    OneShotQuantization,
    OneShotStep,
    execute,
    oneshot,
    prepare,
)
from lightning_sparse.posttrain.ptq import ptq, ptq_calibrate, ptq_check

__all__ = [
    "OneShotChannelPruning",
    "OneShotPruning",
    "OneShotQuantization",
    "OneShotStep",
    "execute",
    "oneshot",
    "prepare",
    "ptq",
    "ptq_calibrate",
    "ptq_check",
]
