"""Achieved memory bandwidth of the fused kernels against a device-to-device copy (CUDA only).

Each op is timed with CUDA events over many back-to-back launches and converted to GB/s with the byte
counts written above the kernels in ``booster_kernels.py`` and ``model_kernels.py`` (the bytes the fused kernel
must move). The unfused torch sequences are timed too and reported as *effective* GB/s over those same bytes,
so ``fused / torch`` is the speed-up. The copy (``dst.copy_(src)``, 8 B/elem) is the practical ceiling.
`measure_model_kernels` does the same for the model's fused ops, forward and backward, in bf16 at the 7B
shape's widths, against transformers' eager formulas, and for the chunked head's cross entropy on one chunk of
Llama-2's logits, against its torch ops (model_kernels.cross_entropy_grad_torch_: `measure_cross_entropy`).
"""
from __future__ import annotations

import torch

from . import booster_kernels
from .booster_kernels import launch_constants, normalize_perturb_, restore_combine_, sumsq

__all__ = ["BYTES_PER_ELEM", "MODEL_BYTES_PER_ELEM", "kernel_errors", "measure_bandwidth", "measure_launch_constants",
           "measure_model_kernels", "measure_cross_entropy"]
FLAT_OPS = ("sumsq", "normalize_perturb_", "restore_combine_")

# Bytes each op must move per element (reads + writes of 4-byte fp32), as counted above each kernel.
BYTES_PER_ELEM = {
    "copy": 4 + 4,                            # read src, write dst
    "sumsq": 4,                               # read x (the partials are 4 B per BLOCK elements)
    "normalize_perturb_": 3 * 4 + 4 * 4,      # read W, G_h, G_f; write B, W, G_f, G_h
    "restore_combine_": 3 * 4 + 2 * 4,        # read B, G_h, G_f; write W, G_f
}


# Bytes the fused model kernels must move per element of their main tensor (bf16: 2 B), forward and backward.
MODEL_BYTES_PER_ELEM = {
    "rms_norm": (2 + 2, 2 + 2 + 2),           # read x, write y | read x, dy, write dx
    "silu_mul": (3 * 2, 5 * 2),                # read gate, up, write h | read dh, gate, up, write dgate, dup
    "rope": (2 + 2, 2 + 2),                    # read x, write y | read dy, write dx (cos, sin per token only)
    "cross_entropy": (2 + 2 + 2,),             # read each logit twice (max and sum, then the gradient), write it
}


def gb_per_s(nbytes: float, ms: float) -> float:
    """Bytes moved in `ms` milliseconds, as GB/s (1 GB = 1e9 bytes, as bandwidths are quoted)."""
    return nbytes / (ms * 1e-3) / 1e9


def copy_bytes(t: torch.Tensor) -> int:
    """What copying `t` moves: every element read once and written once."""
    return 2 * t.numel() * t.element_size()


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


def kernel_errors(n: int = 1823 * 781, device: str = "cuda", *, alpha: float = 0.1, lamb: float = 5.0) -> dict:
    """Each flat-buffer kernel against the torch path on the same random inputs (``n`` irregular, so the last
    block is partial): the largest difference over every tensor the op writes, relative to that tensor's largest
    magnitude. A check that the compiled kernels compute what they are timed for, on the machine that times
    them (the GPU tests hold them to float64 references); fp32 rounding gives ~1e-7."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(1)
    W, G_h, G_f = (torch.randn(n, device=dev, generator=g) for _ in range(3))
    ss = torch.dot(G_h, G_h)

    def run(op, backend):
        bufs = {"W": W.clone(), "B": W + 0.5, "G_h": G_h.clone(), "G_f": G_f.clone()}  # B differs from W
        if op == "sumsq":
            return {"ss": sumsq(bufs["G_h"], backend=backend)}
        if op == "normalize_perturb_":
            norm = normalize_perturb_(bufs["W"], bufs["B"], bufs["G_h"], bufs["G_f"], ss, alpha, lamb,
                                      backend=backend)
            return {**bufs, "norm": norm}
        restore_combine_(bufs["W"], bufs["B"], bufs["G_h"], bufs["G_f"], lamb, backend=backend)
        return bufs

    errors = {}
    for op in ("sumsq", "normalize_perturb_", "restore_combine_"):
        got, want = run(op, "triton"), run(op, "torch")
        errors[op] = max(_max_rel_diff(got[k], want[k]) for k in want)
    return errors


def measure_bandwidth(n: int = 2**27, device: str = "cuda", *, iters: int = 50, warmup: int = 5,
                      alpha: float = 0.1, lamb: float = 5.0) -> dict:
    """Time each op on flat fp32 buffers of ``n`` elements; return ms and GB/s (1 GB = 1e9 bytes).

    Keys: ``n``, ``device_name``, ``bytes_per_elem``, and per op (``copy``, ``sumsq``,
    ``normalize_perturb_``, ``restore_combine_``) ``{op}_ms`` and ``{op}_GBps`` for the Triton kernel, plus
    ``{op}_torch_ms`` / ``{op}_torch_GBps`` (effective, same byte count) for the torch path, and
    ``{op}_max_rel_err``: the kernel against the torch path (`kernel_errors`).
    Raises RuntimeError when ``device`` is not an available CUDA device.
    """
    dev = _cuda_device(device, "measure_bandwidth")
    ops = _flat_ops(n, dev, alpha, lamb)
    result: dict = {"n": n, "device_name": torch.cuda.get_device_name(dev), "bytes_per_elem": dict(BYTES_PER_ELEM)}
    result.update({f"{op}_max_rel_err": err
                   for op, err in kernel_errors(device=device, alpha=alpha, lamb=lamb).items()})
    for op, (fused, unfused) in ops.items():
        nbytes = BYTES_PER_ELEM[op] * n
        ms = _time_ms(fused, iters, warmup)
        result[f"{op}_ms"] = ms
        result[f"{op}_GBps"] = gb_per_s(nbytes, ms)
        if unfused is not None:
            ms_t = _time_ms(unfused, iters, warmup)
            result[f"{op}_torch_ms"] = ms_t
            result[f"{op}_torch_GBps"] = gb_per_s(nbytes, ms_t)
    return result


def measure_launch_constants(block: int, num_warps: int, n: int = 2**27, device: str = "cuda", *, iters: int = 20,
                             warmup: int = 3, alpha: float = 0.1, lamb: float = 5.0) -> dict:
    """GB/s of the three flat-buffer kernels run with `block` elements per program and `num_warps` warps
    (booster_kernels.launch_constants), on buffers of `n` fp32 elements, and their largest relative error
    against the torch path at that pair (a block size changes which elements each program covers). Keys:
    ``BLOCK``, ``num_warps``, ``{op}_GBps`` per op and ``copy_GBps`` (the ceiling, timed beside them),
    ``max_rel_err``. RuntimeError without a CUDA device."""
    dev = _cuda_device(device, "measure_launch_constants")
    ops = _flat_ops(n, dev, alpha, lamb)
    with launch_constants(block, num_warps):
        row = {"BLOCK": booster_kernels.BLOCK, "num_warps": booster_kernels.NUM_WARPS,
               "max_rel_err": max(kernel_errors(device=device, alpha=alpha, lamb=lamb).values())}
        for op in ("copy", *FLAT_OPS):
            row[f"{op}_GBps"] = gb_per_s(BYTES_PER_ELEM[op] * n, _time_ms(ops[op][0], iters, warmup))
    return row


def _cuda_device(device, who: str) -> torch.device:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{who} needs a CUDA device (CUDA events); got device={device!r}, "
                           f"torch.cuda.is_available()={torch.cuda.is_available()}")
    return dev


def _flat_ops(n: int, dev: torch.device, alpha: float, lamb: float) -> dict:
    """{op: (Triton launch, torch path or None)} over flat fp32 buffers of `n` random elements on `dev`, each call
    one run of the op; "copy" (a device-to-device copy) is the ceiling they are measured against."""
    g = torch.Generator(device=dev).manual_seed(0)
    W, G_h, G_f = (torch.randn(n, device=dev, generator=g) for _ in range(3))
    B = torch.empty_like(W)
    src, dst = torch.randn(n, device=dev, generator=g), torch.empty(n, device=dev)
    ss = torch.empty((), device=dev)
    norm_out = torch.empty((), device=dev)
    sumsq(G_h, out=ss, backend="torch")

    return {
        "copy": (lambda: dst.copy_(src), None),
        "sumsq": (lambda: sumsq(G_h, out=ss, backend="triton"),
                  lambda: sumsq(G_h, out=ss, backend="torch")),
        "normalize_perturb_": (
            lambda: normalize_perturb_(W, B, G_h, G_f, ss, alpha, lamb, out=norm_out, backend="triton"),
            lambda: normalize_perturb_(W, B, G_h, G_f, ss, alpha, lamb, out=norm_out, backend="torch")),
        "restore_combine_": (lambda: restore_combine_(W, B, G_h, G_f, lamb, backend="triton"),
                             lambda: restore_combine_(W, B, G_h, G_f, lamb, backend="torch")),
    }


def measure_model_kernels(tokens: int = 32768, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
                          head_dim: int = 128, device: str = "cuda", *, iters: int = 30, warmup: int = 3) -> dict:
    """Time the fused RMSNorm, SwiGLU gate and rotary embedding, forward and backward, in bf16, against
    transformers' eager formulas, on `tokens` rows of the 7B shape's widths (the default 32768 rows keep every
    tensor far above the H200's 50 MB L2, so that the GB/s are HBM's, and make the smallest kernel, the rotary
    backward, ~130 µs at 4 TB/s: well above the host time of one `torch.autograd.grad` call (tens of µs), so the
    GPU's queue never runs dry between the timed backward calls). Returns per op and direction the ms, the
    GB/s over the fused kernel's bytes, the eager ms, and the fused op's largest relative difference from the
    eager formula (`max_rel_err`); plus a bf16 copy's GB/s of the same size."""
    dev = _cuda_device(device, "measure_model_kernels")
    g = torch.Generator(device=dev).manual_seed(0)
    bf16 = torch.bfloat16
    cases = model_cases(tokens, hidden, intermediate, heads, head_dim, g)
    src = torch.empty(tokens * intermediate, dtype=bf16, device=dev)
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), iters, warmup)
    result: dict = {"tokens": tokens, "hidden": hidden, "intermediate": intermediate, "heads": heads,
                    "head_dim": head_dim, "dtype": "bfloat16", "device_name": torch.cuda.get_device_name(dev),
                    "copy_GBps": gb_per_s(copy_bytes(src), copy_ms)}
    for op, (inputs, fused, eager) in cases.items():
        numel = inputs[0].numel()
        errors = _fused_errors(inputs, fused, eager, g)
        for direction, nbytes in zip(("fwd", "bwd"), MODEL_BYTES_PER_ELEM[op]):
            timed = {}
            for kind, fn in (("fused", fused), ("eager", eager)):
                if direction == "fwd":
                    timed[kind] = _time_ms(fn, iters, warmup)
                else:
                    y = fn()
                    dy = torch.randn(y.shape, device=dev, generator=g).to(bf16)
                    timed[kind] = _time_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), iters,
                                           warmup)
                    del y
            gbps = gb_per_s(nbytes * numel, timed["fused"])
            result[f"{op}_{direction}"] = {"ms": timed["fused"], "GBps": gbps, "eager_ms": timed["eager"],
                                           "speedup": timed["eager"] / timed["fused"],
                                           "fraction_of_copy": gbps / result["copy_GBps"],
                                           "max_rel_err": errors[direction]}
    return result


def measure_cross_entropy(copy_gbps: float, device: str = "cuda", *, iters: int = 30, warmup: int = 3,
                          rows: int = 2048, vocab: int = 32000, g: torch.Generator | None = None) -> dict:
    """The chunked head's cross entropy and gradient on `rows` positions of bf16 logits (2,048 of Llama-2's
    32,000 entries: 131 MB, one of head_loss's chunks at that vocabulary), the kernel in place against the torch
    ops on the logits' fp32 copy, as head_loss runs each; `max_rel_err` over the losses and the gradient, and the
    kernel's GB/s as a fraction of `copy_gbps` (measure_model_kernels' bf16 copy)."""
    from .model_kernels import cross_entropy_grad_, cross_entropy_grad_torch_

    if g is None:
        g = torch.Generator(device=_cuda_device(device, "measure_cross_entropy")).manual_seed(0)
    dev = g.device
    logits = (torch.randn(rows, vocab, device=dev, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=dev, generator=g)
    z = logits.clone()
    got = cross_entropy_grad_(z, targets)
    z32 = logits.float()
    want = cross_entropy_grad_torch_(z32, targets)
    err = max(_max_rel_diff(got, want), _max_rel_diff(z, z32.to(torch.bfloat16)))
    del z32
    # (each call overwrites z with a gradient, which the next one reads as its logits: the same bytes move)
    ms = _time_ms(lambda: cross_entropy_grad_(z, targets), iters, warmup)
    eager_ms = _time_ms(lambda: cross_entropy_grad_torch_(logits.float(), targets), iters, warmup)
    gbps = gb_per_s(MODEL_BYTES_PER_ELEM["cross_entropy"][0] * logits.numel(), ms)
    return {"ms": ms, "GBps": gbps, "eager_ms": eager_ms, "speedup": eager_ms / ms,
            "fraction_of_copy": gbps / copy_gbps, "max_rel_err": err, "rows": rows, "vocab": vocab}


def model_cases(tokens: int, hidden: int, intermediate: int, heads: int, head_dim: int, g: torch.Generator,
                dtype: torch.dtype = torch.bfloat16, eps: float = 1e-5) -> dict:
    """op -> (inputs that take gradients, fused op, transformers' eager formula), on random data on `g`'s device."""
    from transformers.models.llama.modeling_llama import rotate_half

    from .model_kernels import rms_norm, rope, silu_mul

    dev = g.device

    def rand(*shape):
        return torch.randn(*shape, device=dev, generator=g).to(dtype).requires_grad_()

    x, weight = rand(tokens, hidden), (torch.rand(hidden, device=dev, generator=g) + 0.5).to(dtype)
    gate, up = rand(tokens, intermediate), rand(tokens, intermediate)
    q = torch.randn(1, tokens, heads, head_dim, device=dev, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    angles = torch.rand(1, tokens, head_dim // 2, device=dev, generator=g) * 100
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))

    def eager_norm():
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)

    return {
        "rms_norm": ((x,), lambda: rms_norm(x, weight, eps), eager_norm),
        "silu_mul": ((gate, up), lambda: silu_mul(gate, up), lambda: torch.nn.functional.silu(gate) * up),
        "rope": ((q,), lambda: rope(q, cos, sin), lambda: q * cos[:, None] + rotate_half(q) * sin[:, None]),
    }


def _fused_errors(inputs, fused, eager, g) -> dict:
    """The fused op against the eager formula on the same inputs and output gradient, forward and backward: the
    largest difference relative to the eager result's largest magnitude (bf16 rounding: a few 1e-3)."""
    y_fused, y_eager = fused(), eager()
    dy = torch.randn(y_eager.shape, device=y_eager.device, generator=g).to(y_eager.dtype)
    grads = zip(torch.autograd.grad(y_fused, inputs, dy), torch.autograd.grad(y_eager, inputs, dy))
    return {"fwd": _max_rel_diff(y_fused, y_eager), "bwd": max(_max_rel_diff(a, b) for a, b in grads)}


def _max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest |got - want| over the largest |want|: the error columns of both kernel tables."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()  # host sync: outside any timing
