"""Numba kernels (installed as fastmlp.kernels)."""
