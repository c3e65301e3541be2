"""Fused kernels for the model's own element-wise ops: ``rms_norm`` and ``silu_mul`` (SwiGLU's gate).

Outside the matmuls, a Llama decoder layer spends its time in memory-bound element-wise chains that eager
PyTorch runs one kernel at a time. transformers' RMSNorm upcasts to fp32 and makes six passes (cast, square,
mean, scale, cast back, weight); SwiGLU's ``act(gate) * up`` makes two, and both save fp32 or extra
intermediates for the backward. Each op here is one pass forward and one backward, and saves only its bf16
inputs (plus one fp32 scalar per row for the norm). Both follow transformers' roundings: the norm rounds the
normalised row to the input dtype before the weight multiplies it, the gate rounds ``silu(gate)`` before the
product; so in fp32 they equal the eager ops up to summation order, and in bf16 up to about one rounding.

Three layers each, as in booster_kernels.py: ``@triton.jit`` kernels -> an ``autograd.Function`` -> the
function the model calls (fused_ops.py installs it). Triton only: these run where Triton runs (CUDA, or the
CPU with TRITON_INTERPRET=1 set before import); the model's own forward is the torch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["rms_norm", "silu_mul", "available"]

# silu_mul: elements per program. 2048 bf16 = 4 KiB per operand, 8 elements per thread with 8 warps (one
# 16-byte access each); an [10*256, 11008] gate is ~14k programs, far more than the H200's 132 SMs. Reasoned,
# not measured: the GPU suite's profile table says whether these kernels reach the copy rate.
BLOCK = 2048
NUM_WARPS = 8


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA, or the CPU under the Triton interpreter."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and isinstance(_rms_norm_fwd_kernel, InterpretedFunction))


def _row_settings(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for one program per row of n elements: the whole row in registers, more warps
    for longer rows so that each thread holds at most ~16 fp32 values per operand."""
    block = triton.next_power_of_2(n)
    return block, max(1, min(16, block // 256))


# ---------------------------------------------------------------------------------------------------------
# rms_norm: y = w * round(x * rstd), rstd = 1/sqrt(mean(x^2) + eps), per row, fp32 inside
# ---------------------------------------------------------------------------------------------------------
# Forward reads x (2 B/elem in bf16) and writes y (2 B), plus 4 B per row for rstd: ~4 B/elem. transformers'
# eager chain moves ~36 B/elem in six launches (to fp32 6, pow 8, mean 4, mul 8, to bf16 6, weight 4), so
# expect up to ~9x on the norm itself. Backward reads x, dy (4 B) and writes dx (2 B) against ~60 B/elem
# of autograd's chain. The weight's gradient (zero work when the norm weights are frozen, as under LoRA) is
# computed in torch when it is needed.
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, ROUND: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    normed = x * rstd
    if ROUND:  # transformers rounds the normalised row to the input dtype before the weight multiplies it
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * n + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n, BLOCK_N: tl.constexpr):
    # dx = rstd * (dn - normed * mean(dn * normed)), dn = dy * w, normed = x * rstd
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    normed = x * rstd
    dn = dy * w
    dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n))
    tl.store(dx_ptr + row * n + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        rows = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, warps = _row_settings(n)
        if rows:
            _rms_norm_fwd_kernel[(rows,)](x2, weight, y, rstd, n, eps, ROUND=x.dtype != torch.float32,
                                          BLOCK_N=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[-1]
        dy2 = dy.reshape(-1, n).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x2)
            block, warps = _row_settings(n)
            if x2.shape[0]:
                _rms_norm_bwd_kernel[(x2.shape[0],)](dy2, x2, weight, rstd, dx, n, BLOCK_N=block, num_warps=warps)
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:  # a trainable norm weight (not under LoRA): the same rounding as forward
            normed = (x2.float() * rstd[:, None]).to(x2.dtype).float()
            dw = (dy2.float() * normed).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm over the last dimension of `x`, as one kernel each way. The result has the
    promoted dtype of `x` and `weight`, like the eager module's."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))


# ---------------------------------------------------------------------------------------------------------
# silu_mul: h = round(silu(g)) * u, element-wise, fp32 inside
# ---------------------------------------------------------------------------------------------------------
# Forward reads g, u and writes h: 6 B/elem in bf16, against 10 B/elem in two launches eager (silu 4, mul 6)
# (~1.7x). Backward reads dh, g, u and writes dg, du: 10 B/elem in one launch, against eager's mul backward
# (two products, 12 B) and silu_backward (6 B) plus the autograd buffer they share (~20 B in three launches).
# Saved for backward: g and u only (eager keeps silu(g) as well).
@triton.jit
def _silu_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, n, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act = g / (1.0 + tl.exp(-g))
    if ROUND:  # the eager silu returns the input dtype before the product
        act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    # du = dh * silu(g);  dg = dh * u * silu'(g),  silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    act = g * s
    d_act = dh * u
    if ROUND:  # eager autograd holds silu(g) and the gradient reaching it in the input dtype
        act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
        d_act = d_act.to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + offs, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (d_act * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        n = g.numel()
        if n:
            _silu_mul_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, h, n, ROUND=g.dtype != torch.float32, BLOCK=BLOCK,
                                                           num_warps=NUM_WARPS)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _silu_mul_bwd_kernel[(triton.cdiv(n, BLOCK),)](dh, g, u, dg, du, n, ROUND=g.dtype != torch.float32,
                                                           BLOCK=BLOCK, num_warps=NUM_WARPS)
        return dg, du


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as one kernel each way; both of one shape and dtype (the gate and up projections)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         f"must match")
    return _SiluMul.apply(gate, up)
