"""Achieved memory bandwidth of the fused kernels against a device-to-device copy (CUDA only).

Each op is timed with CUDA events over many back-to-back launches and converted to GB/s with the byte
counts written above the kernels in ``booster_kernels.py`` (the bytes the fused kernel must move). The
unfused torch sequences are timed too and reported as *effective* GB/s over those same bytes, so
``fused / torch`` is the speed-up. The copy (``dst.copy_(src)``, 8 B/elem) is the practical ceiling.
"""
from __future__ import annotations

import torch

from .booster_kernels import normalize_perturb_, restore_combine_, sumsq

__all__ = ["BYTES_PER_ELEM", "measure_bandwidth"]

# Bytes each op must move per element (reads + writes of 4-byte fp32), as counted above each kernel.
BYTES_PER_ELEM = {
    "copy": 4 + 4,                            # read src, write dst
    "sumsq": 4,                               # read x (the partials are 4 B per BLOCK elements)
    "normalize_perturb_": 3 * 4 + 4 * 4,      # read W, G_h, G_f; write B, W, G_f, G_h
    "restore_combine_": 3 * 4 + 2 * 4,        # read B, G_h, G_f; write W, G_f
}


def _time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()  # host sync: timing only
    return start.elapsed_time(end) / iters


def measure_bandwidth(n: int = 2**26, device: str = "cuda", *, iters: int = 50, warmup: int = 5,
                      alpha: float = 0.1, lamb: float = 5.0) -> dict:
    """Time each op on flat fp32 buffers of ``n`` elements; return ms and GB/s (1 GB = 1e9 bytes).

    Keys: ``n``, ``device_name``, ``bytes_per_elem``, and per op (``copy``, ``sumsq``,
    ``normalize_perturb_``, ``restore_combine_``) ``{op}_ms`` and ``{op}_GBps`` for the Triton kernel, plus
    ``{op}_torch_ms`` / ``{op}_torch_GBps`` (effective, same byte count) for the torch path.
    Raises RuntimeError when ``device`` is not an available CUDA device.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"measure_bandwidth needs a CUDA device (CUDA events); got device={device!r}, "
                           f"torch.cuda.is_available()={torch.cuda.is_available()}")
    g = torch.Generator(device=dev).manual_seed(0)
    W, G_h, G_f = (torch.randn(n, device=dev, generator=g) for _ in range(3))
    B = torch.empty_like(W)
    src, dst = torch.randn(n, device=dev, generator=g), torch.empty(n, device=dev)
    ss = torch.empty((), device=dev)
    norm_out = torch.empty((), device=dev)
    sumsq(G_h, out=ss, backend="torch")

    ops = {
        "copy": (lambda: dst.copy_(src), None),
        "sumsq": (lambda: sumsq(G_h, out=ss, backend="triton"),
                  lambda: sumsq(G_h, out=ss, backend="torch")),
        "normalize_perturb_": (
            lambda: normalize_perturb_(W, B, G_h, G_f, ss, alpha, lamb, out=norm_out, backend="triton"),
            lambda: normalize_perturb_(W, B, G_h, G_f, ss, alpha, lamb, out=norm_out, backend="torch")),
        "restore_combine_": (lambda: restore_combine_(W, B, G_h, G_f, lamb, backend="triton"),
                             lambda: restore_combine_(W, B, G_h, G_f, lamb, backend="torch")),
    }
    result: dict = {"n": n, "device_name": torch.cuda.get_device_name(dev), "bytes_per_elem": dict(BYTES_PER_ELEM)}
    for op, (fused, unfused) in ops.items():
        nbytes = BYTES_PER_ELEM[op] * n
        ms = _time_ms(fused, iters, warmup)
        result[f"{op}_ms"] = ms
        result[f"{op}_GBps"] = nbytes / (ms * 1e-3) / 1e9
        if unfused is not None:
            ms_t = _time_ms(unfused, iters, warmup)
            result[f"{op}_torch_ms"] = ms_t
            result[f"{op}_torch_GBps"] = nbytes / (ms_t * 1e-3) / 1e9
    return result
