"""What a compression technique may declare that it changes (``CompressionCallback.changes``).

Here rather than in the callback layer so that the module mixin, which sits below the callbacks,
can read the declaration too.
"""

from __future__ import annotations

__all__ = ["CHANGES", "LOSS", "MASKS", "QUANTIZATION", "STRUCTURE"]

#: Keep-masks over weights (pruning).
MASKS = "masks"
#: Fake quantization of layers (QAT, PTQ).
QUANTIZATION = "quantization"
#: Parameters removed or replaced (channel removal, factorization).
STRUCTURE = "structure"
#: A term added to the training loss (distillation, regularization).
LOSS = "loss"
CHANGES = frozenset({MASKS, QUANTIZATION, STRUCTURE, LOSS})
