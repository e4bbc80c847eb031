"""Fused kernels of the spatial-aware sampler (CPU C++ with a pure-PyTorch fallback)."""

from ferret.model.kernels.pair_pool import kernel_available, pair_pool

__all__ = ["kernel_available", "pair_pool"]
