"""Flat-buffer Booster kernels (Triton on CUDA, torch on CPU).

Import as ``booster_fast.kernels``. Set ``TRITON_INTERPRET=1`` before importing to run the Triton kernels
on CPU tensors (tests do this when no CUDA device is present).
"""
from .bandwidth import measure_bandwidth
from .booster_kernels import BLOCK, normalize_perturb_, restore_combine_, sumsq

__all__ = ["BLOCK", "sumsq", "normalize_perturb_", "restore_combine_", "measure_bandwidth"]
