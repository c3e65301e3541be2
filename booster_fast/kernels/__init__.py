"""Flat-buffer Booster kernels (Triton on CUDA, torch on CPU); the model's fused ops are in model_kernels.py.

Import as ``booster_fast.kernels``. Set ``TRITON_INTERPRET=1`` before importing to run the Triton kernels
on CPU tensors (tests do this when no CUDA device is present).
"""
from .bandwidth import (kernel_errors, measure_bandwidth, measure_cross_entropy, measure_launch_constants,
                        measure_model_kernels)
from .booster_kernels import BLOCK, launch_constants, normalize_perturb_, restore_combine_, sumsq, triton_unusable

__all__ = ["BLOCK", "sumsq", "normalize_perturb_", "restore_combine_", "triton_unusable", "launch_constants",
           "kernel_errors", "measure_bandwidth", "measure_launch_constants", "measure_model_kernels",
           "measure_cross_entropy"]
