"""lightning_sparse: neural-network compression as PyTorch Lightning callbacks and Hydra recipes."""

from lightning_sparse.callbacks import CompressionCallback, ConstantPruning, MagnitudePruning

__all__ = ["CompressionCallback", "ConstantPruning", "MagnitudePruning"]
__version__ = "0.1.0"
