"""Fused flat-buffer kernels for the Booster step: ``sumsq``, ``normalize_perturb_``, ``restore_combine_``.

Booster keeps every LoRA weight as a view into one flat fp32 buffer ``W``, with a backup ``B`` and two flat
gradient buffers, ``G_h`` (harmful loss) and ``G_f`` (alignment loss), all 1-D, contiguous, the same length and on
the same device. The per-step bookkeeping is then three memory-bound passes over those buffers, whose launches do
not grow with the number of LoRA tensors (one each; ``sumsq`` two past one block of elements): ``sumsq`` puts
``||G_h||^2`` into a 0-dim device tensor (no ``.item()``, so nothing syncs the host and the step stays CUDA-graph
capturable), ``normalize_perturb_`` reads that scalar on the device, backs ``W`` up into ``B``, steps ``W`` to the
perturbed point, folds ``lamb * G_h`` into ``G_f`` and zeroes ``G_h`` in one pass, and ``restore_combine_`` copies
``B`` back into ``W`` (bit-exact, unlike the original trainer's ``p += alpha * g / norm``) and subtracts
``lamb * G_h`` (the gradient at the perturbed point) from ``G_f``. Each op has three layers, as in Liger-Kernel:
``@triton.jit _name_kernel`` -> launcher ``name(..., backend=)`` -> the caller. ``backend="auto"`` runs the Triton
kernel for CUDA tensors and a plain-torch sequence otherwise; the torch sequences are deliberately short (1, 6 and
2 dispatched aten ops) because the whole training step has an op budget. Pure float64 references of the same maths
live in ``reference.py``.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..errors import described
from .launches import launch

__all__ = ["BLOCK", "sumsq", "normalize_perturb_", "restore_combine_", "triton_unusable", "launch_constants"]
log = logging.getLogger("booster_fast")

# Elements per program for the element-wise kernels and the first sumsq stage. 4096 fp32 = 16 KiB per
# buffer per program; with num_warps=8 (256 threads) each thread moves 16 elements = four 16-byte vector
# accesses per buffer, enough bytes in flight per SM to stream HBM, and for LoRA-sized buffers (10^6..10^8
# elements) the grid is hundreds to tens of thousands of programs, far more than the H200's 132 SMs, so the
# tail wave costs little. It also keeps the number of programs (each one slow, in Python) low under
# TRITON_INTERPRET=1. This is a reasoned choice, not yet a measurement: the GPU suite's kernel_sweep part
# (bandwidth.measure_launch_constants, under `launch_constants`) times the kernels over BLOCK x num_warps, and
# its first run on the GPU should confirm it or replace it.
BLOCK = 4096
NUM_WARPS = 8
# Second sumsq stage: one program folds the per-block partials, BLOCK_R at a time. Its loads are serial, each
# paying the memory's latency, so the fewer the better: at 2^26 elements (16,384 partials) 4 rounds, not 16.
BLOCK_R = 4096

_BACKENDS = ("auto", "triton", "torch")


@contextlib.contextmanager
def launch_constants(block: int, num_warps: int):
    """Inside: the element-wise kernels and sumsq's first stage run `block` elements per program with
    `num_warps` warps (BLOCK and NUM_WARPS, which every launcher reads at its call), put back on exit whatever
    happens. For the GPU suite's sweep of the two constants; each new pair compiles its kernels once."""
    global BLOCK, NUM_WARPS
    if not (isinstance(block, int) and block >= 16 and block & (block - 1) == 0):
        raise ValueError(f"block must be a power of two >= 16 (a Triton block), got {block!r}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps!r}")
    saved = BLOCK, NUM_WARPS
    BLOCK, NUM_WARPS = block, num_warps
    try:
        yield
    finally:
        BLOCK, NUM_WARPS = saved


# ---------------------------------------------------------------------------------------------------------
# validation and backend choice (pure Python on tensor metadata: no kernels, no host syncs)
# ---------------------------------------------------------------------------------------------------------
def _check_flat(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Raise ValueError unless all tensors are 1-D, contiguous, float32, non-empty, same length and device,
    and pairwise non-overlapping in memory."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (a flat buffer), got shape {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: a flat buffer needs at least one element")
        if t.numel() != first.numel():
            raise ValueError(f"{name} has {t.numel()} elements but {first_name} has {first.numel()}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    if first.device.type == "meta":
        return  # no storage, nothing can overlap
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n) for n, t in zip(names, tensors)]
    for i, (lo_a, hi_a, name_a) in enumerate(spans):
        for lo_b, hi_b, name_b in spans[i + 1:]:
            if lo_a < hi_b and lo_b < hi_a:
                raise ValueError(f"{name_a} and {name_b} overlap in memory; the buffers must be distinct")


def _check_scalar(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a 0-dim torch.Tensor, got {type(t).__name__}")
    if t.dim() != 0:
        raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the buffers are on {device}")


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_unusable(device) is None
    # backend == "triton": CUDA tensors, or CPU tensors when the kernels were built by the interpreter.
    if device.type != "cuda" and not (device.type == "cpu" and isinstance(_sumsq_partial_kernel, InterpretedFunction)):
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"booster_fast.kernels is imported; got tensors on {device}"
        )
    return True


def triton_unusable(device) -> str | None:
    """Why this package's Triton kernels cannot launch on the CUDA `device`, or None (also for any other device:
    there the torch paths run unless the interpreter is asked for). Triton builds a small C launcher with the
    host's C compiler and Python headers at its first launch, and compiles each kernel for the GPU, so a machine
    without a compiler, or a Triton too old for the GPU, fails there. Found once per device and process by one
    launch of each kernel on ones (_launch_all); the failure is logged in one line, and "auto" then runs the torch
    paths and the fused model ops stay off (fused_ops checks their own kernels when it installs them)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _launch_error(torch.device("cuda", torch.cuda.current_device()) if device.index is None else device)


@functools.cache
def _launch_error(device: torch.device) -> str | None:
    """The launch check of triton_unusable on `device`, once per device: None, or the first line of what failed.
    Never inside a graph capture (its host sync would end the capture, and the verdict would be cached)."""
    cuda = device.type == "cuda"  # (the tests check the logic on the CPU, with the interpreter)
    if cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the Triton launch check ran inside a CUDA graph capture: call triton_unusable before")
    try:
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():  # Triton launches on the current one
            why = _launch_all(device)
    except Exception as e:  # noqa: BLE001 - no compiler, no Python headers, an unknown GPU: reported, not hidden
        why = described(e, 200)
    if why is not None:
        log.warning("Triton kernels cannot launch on %s (%s): the flat-buffer kernels run as torch ops and the "
                    "fused model ops stay off", device, why)
    return why


def _launch_all(device: torch.device) -> str | None:
    """Each kernel of this module launched once on `device` (both sumsq stages: past one block), on ones, where
    every sum it checks is exact up to fp32 rounding: None, or what came out otherwise. One host read."""
    n = 2 * BLOCK + 5
    ones = torch.ones(n, device=device)
    ss = sumsq(ones, backend="triton")
    W, B, G_h, G_f = ones.clone(), torch.zeros_like(ones), ones.clone(), torch.zeros_like(ones)
    norm = normalize_perturb_(W, B, G_h, G_f, ss, alpha=1.0, lamb=2.0, backend="triton")  # W: 1 - 1/sqrt(n)
    perturbed, zeroed = W.sum(), G_h.abs().sum()
    G_h.fill_(1.0)  # (the perturbed pass's gradient)
    restore_combine_(W, B, G_h, G_f, 1.0, backend="triton")  # W back to 1, G_f = 2 - 1
    got = torch.stack([ss, norm * norm, perturbed, zeroed, W.sum(), G_f.sum()]).tolist()  # a host sync, once
    want = [n, n, n - n / (n ** 0.5 + 1e-7), 0.0, n, n]
    if all(abs(g - w) <= 1e-4 * w for g, w in zip(got, want)):
        return None
    return ("Triton kernels gave wrong results on ones: sumsq, norm², perturbed, zeroed, restored, combined sums "
            f"{[round(g, 3) for g in got]}, expected {[round(w, 3) for w in want]}")


# ---------------------------------------------------------------------------------------------------------
# sumsq: ||x||^2 into a 0-dim fp32 device tensor
# ---------------------------------------------------------------------------------------------------------
# Reads 4 B/elem (x) and writes 4 B per BLOCK elements (the partials), so ~4 B/elem: it should run at copy
# speed. Fusion saves nothing against torch.dot (also one pass); against the unfused (x*x).sum() (read 4,
# write 4, read 4 = 12 B/elem, 2 launches) it is ~3x. Against the original trainer (one norm per LoRA tensor,
# then a stack and a norm of norms) it replaces hundreds of launches by at most two.
# Two stages rather than atomic_add into a zeroed scalar: atomics add the partials in whatever order the
# programs finish, so the norm -- and from it the perturbation and every later weight -- would differ in
# the last bits between runs, breaking bit-for-bit reproducibility and the exactness tests (accumulation,
# DDP, graph replay vs eager). The atomic version needs a zero-fill launch first, so both cost two launches;
# the two-stage one is deterministic and sums the partials as a tree. Buffers of <= BLOCK elements need only
# the first stage, which then writes straight into the output.
@triton.jit
def _sumsq_partial_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(partial_ptr + pid, tl.sum(x * x, axis=0))


@triton.jit
def _sumsq_finish_kernel(partial_ptr, out_ptr, num_partials, BLOCK_R: tl.constexpr):
    # A while loop, not range() over the runtime count: triton 3.6's interpreter cannot take a runtime
    # scalar as a range() bound under NumPy >= 2.4. The loop runs a few times over a few KB: its form costs
    # nothing measurable.
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    start = 0
    while start < num_partials:
        offs = start + tl.arange(0, BLOCK_R)
        mask = offs < num_partials
        acc += tl.load(partial_ptr + offs, mask=mask, other=0.0)
        start += BLOCK_R
    tl.store(out_ptr, tl.sum(acc, axis=0))


def sumsq(x: torch.Tensor, *, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Sum of squares of the flat fp32 buffer ``x`` as a 0-dim fp32 tensor on ``x``'s device (no host sync).

    ``out``: optional 0-dim fp32 tensor on the same device to write into (a static address for CUDA graphs).
    Torch path: one aten op (``torch.dot``; on the CPU ``linalg.vector_norm`` squared is also one op but
    accumulates far less accurately: ~1e-3 relative error at 2^24 elements against ~2e-5 for ``dot``).
    """
    _check_flat(("x",), (x,))
    if out is not None:
        _check_scalar("out", out, x.device)
    if not _use_triton(backend, x.device):
        return torch.dot(x, x) if out is None else torch.dot(x, x, out=out)

    n = x.numel()
    if out is None:
        out = torch.empty((), dtype=torch.float32, device=x.device)
    num_partials = triton.cdiv(n, BLOCK)
    if num_partials == 1:
        launch(_sumsq_partial_kernel, (1,))(x, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return out
    partials = torch.empty(num_partials, dtype=torch.float32, device=x.device)
    launch(_sumsq_partial_kernel, (num_partials,))(x, partials, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    launch(_sumsq_finish_kernel, (1,))(partials, out, num_partials, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS)
    return out


# ---------------------------------------------------------------------------------------------------------
# normalize_perturb_: s = alpha / (sqrt(ss) + eps); B = W; W -= s * G_h; G_f += lamb * G_h; G_h = 0
# ---------------------------------------------------------------------------------------------------------
# Reads W, G_h, G_f = 12 B/elem; writes B, W, G_f, G_h = 16 B/elem; 28 B/elem in one launch. The torch
# sequence makes four passes over the buffers -- copy_ (8 B), addcdiv_ (12 B), add_ (12 B), zero_ (4 B) =
# 36 B/elem -- plus two scalar launches (sqrt, + eps): expected ~1.3x at large N from bytes alone (36/28),
# and more for small buffers where 6 launches vs 1 dominates. s is computed on the device by every program
# from ss (4 bytes, cached), so nothing syncs. sqrt_rn / div_rn: IEEE-rounded, so the logged norm equals
# torch.sqrt(ss) bit for bit (plain tl.sqrt and "/" may use the fast approximate instructions on the GPU).
@triton.jit
def _normalize_perturb_kernel(w_ptr, b_ptr, gh_ptr, gf_ptr, ss_ptr, norm_ptr, n, alpha, lamb, eps,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    norm = tl.sqrt_rn(tl.load(ss_ptr))
    s = tl.div_rn(alpha, norm + eps)
    if pid == 0:
        tl.store(norm_ptr, norm)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask)
    gh = tl.load(gh_ptr + offs, mask=mask)
    gf = tl.load(gf_ptr + offs, mask=mask)
    tl.store(b_ptr + offs, w, mask=mask)
    tl.store(w_ptr + offs, w - s * gh, mask=mask)
    tl.store(gf_ptr + offs, gf + lamb * gh, mask=mask)
    tl.store(gh_ptr + offs, tl.zeros_like(gh), mask=mask)


def normalize_perturb_(W: torch.Tensor, B: torch.Tensor, G_h: torch.Tensor, G_f: torch.Tensor,
                       ss: torch.Tensor, alpha: float, lamb: float, eps: float = 1e-7, *,
                       out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Perturb ``W`` along the normalised harmful gradient, in place, and return ``sqrt(ss)``.

    With ``s = alpha / (sqrt(ss) + eps)``: ``B[:] = W``; ``W -= s * G_h``; ``G_f += lamb * G_h``;
    ``G_h[:] = 0``. ``ss`` is ``sumsq(G_h)`` (0-dim fp32, same device). Returns the harmful gradient norm
    ``sqrt(ss)`` (without eps) as a 0-dim device tensor, written into ``out`` when given.
    Torch path: six aten ops (sqrt, add, copy_, addcdiv_, add_, zero_).
    """
    _check_flat(("W", "B", "G_h", "G_f"), (W, B, G_h, G_f))
    _check_scalar("ss", ss, W.device)
    if out is not None:
        _check_scalar("out", out, W.device)
    alpha, lamb, eps = float(alpha), float(lamb), float(eps)
    if not _use_triton(backend, W.device):
        norm = ss.sqrt() if out is None else torch.sqrt(ss, out=out)
        denom = norm + eps
        B.copy_(W)
        W.addcdiv_(G_h, denom, value=-alpha)
        G_f.add_(G_h, alpha=lamb)
        G_h.zero_()
        return norm

    n = W.numel()
    norm = torch.empty((), dtype=torch.float32, device=W.device) if out is None else out
    grid = (triton.cdiv(n, BLOCK),)
    launch(_normalize_perturb_kernel, grid)(W, B, G_h, G_f, ss, norm, n, alpha, lamb, eps,
                                            BLOCK=BLOCK, num_warps=NUM_WARPS)
    return norm


# ---------------------------------------------------------------------------------------------------------
# restore_combine_: W = B (bit-exact); G_f -= lamb * G_h
# ---------------------------------------------------------------------------------------------------------
# Reads B, G_h, G_f = 12 B/elem; writes W, G_f = 8 B/elem; 20 B/elem. The torch pair copy_ (8 B) + sub_
# (12 B) moves the same 20 B/elem, so at large N the expected speed-up is ~1.0x: the fusion saves one launch
# (it matters for small buffers and for the step's op budget), not bytes.
@triton.jit
def _restore_combine_kernel(w_ptr, b_ptr, gh_ptr, gf_ptr, n, lamb, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(b_ptr + offs, mask=mask)
    gh = tl.load(gh_ptr + offs, mask=mask)
    gf = tl.load(gf_ptr + offs, mask=mask)
    tl.store(w_ptr + offs, b, mask=mask)
    tl.store(gf_ptr + offs, gf - lamb * gh, mask=mask)


def restore_combine_(W: torch.Tensor, B: torch.Tensor, G_h: torch.Tensor, G_f: torch.Tensor,
                     lamb: float, *, backend: str = "auto") -> None:
    """Restore ``W`` from the backup and fold in the perturbed-point gradient, in place.

    ``W[:] = B`` (bit-exact); ``G_f -= lamb * G_h`` where ``G_h`` now holds the harmful gradient at the
    perturbed weights. ``G_h`` is left as it is. Torch path: two aten ops (copy_, sub_).
    """
    _check_flat(("W", "B", "G_h", "G_f"), (W, B, G_h, G_f))
    lamb = float(lamb)
    if not _use_triton(backend, W.device):
        W.copy_(B)
        G_f.sub_(G_h, alpha=lamb)
        return

    n = W.numel()
    grid = (triton.cdiv(n, BLOCK),)
    launch(_restore_combine_kernel, grid)(W, B, G_h, G_f, n, lamb, BLOCK=BLOCK, num_warps=NUM_WARPS)
