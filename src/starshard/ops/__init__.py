"""Attention operations: the float64 reference, the CPU blockwise path, merging partials, kernels."""
