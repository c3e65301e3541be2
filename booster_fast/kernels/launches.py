"""Every Triton launch of this package goes through `launch`, so that it can be counted.

Triton kernels are launched from Python without passing through torch's dispatcher, so booster_fast.opcount's
TorchDispatchMode, which counts a step's aten ops, would not see them; it watches this hook instead
(`observed`). Unobserved, `launch` costs one global read per launch.
"""
from __future__ import annotations

import contextlib

_observer = None


def launch(kernel, grid):
    """`kernel[grid]`, after telling the observer (if any) the kernel's name."""
    if _observer is not None:
        _observer(getattr(kernel, "__name__", None) or kernel.fn.__name__)
    return kernel[grid]


@contextlib.contextmanager
def observed(fn):
    """Inside: fn(kernel name) is called once per Triton launch of this package."""
    global _observer
    before, _observer = _observer, fn
    try:
        yield
    finally:
        _observer = before
