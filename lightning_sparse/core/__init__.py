"""The torch-only layer: compression math with no Lightning and no Hydra imports.

Modules here are pure functions over tensors (and, for the file format's entropy coder, numpy
arrays), so callbacks, one-shot steps and the exporter share one implementation and each piece
is testable without a trainer.
"""
