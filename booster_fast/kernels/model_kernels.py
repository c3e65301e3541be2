"""Fused kernels for the model's own element-wise ops: ``rms_norm``, ``silu_mul`` (SwiGLU's gate; ``gelu_tanh_mul``
for Gemma's GeGLU), ``rope``, and ``cross_entropy_grad_`` for the chunked LM head (head_loss.py), with its torch
twin ``cross_entropy_grad_torch_``.

Outside the matmuls, a Llama decoder layer spends its time in memory-bound element-wise chains that eager
PyTorch runs one kernel at a time. transformers' RMSNorm upcasts to fp32 and makes six passes (cast, square,
mean, scale, cast back, weight); SwiGLU's ``act(gate) * up`` makes two; rotary embeddings make five per
tensor (two products, a slice-negate-concatenate for ``rotate_half``, a sum), and all of them save fp32 or
extra intermediates for the backward. Each op here is one pass forward and one backward, and saves only its
inputs (plus one fp32 scalar per row for the norm). They follow transformers' roundings: the norm rounds the
normalised row to the input dtype before the weight multiplies it, the gate rounds ``silu(gate)`` before the
product, the rotation rounds each product before the sum; so in fp32 they equal the eager ops up to summation
order (and, on the GPU, the few ulps of the approximate sqrt, division and exp Triton compiles by default: ~1e-7
relative, as eager CUDA's own rsqrt), and in bf16 up to about one rounding. Gemma's norm (``unit_offset``:
``(1 + w) * x * rstd``, all in fp32 and rounded once at the end) is the same kernel with another rounding.

Three layers each, as in booster_kernels.py: ``@triton.jit`` kernels -> an ``autograd.Function`` -> the
function the model calls (fused_ops.py installs it); the cross entropy's autograd.Function is head_loss's. Triton
only: these run where Triton runs (CUDA, or the CPU with TRITON_INTERPRET=1 set before import); the model's own
forward is the torch path, and the cross entropy's is its twin here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .booster_kernels import triton_unusable
from .launches import launch

__all__ = ["rms_norm", "silu_mul", "gelu_tanh_mul", "rope", "cross_entropy_grad_", "available"]

# silu_mul: elements per program. 2048 bf16 = 4 KiB per operand, 8 elements per thread with 8 warps (one
# 16-byte access each); an [10*256, 11008] gate is ~14k programs, far more than the H200's 132 SMs. Reasoned,
# not measured: the GPU suite's kernel_bandwidth part (bandwidth.measure_model_kernels) says whether these
# kernels reach the copy rate.
BLOCK = 2048
NUM_WARPS = 8


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA where Triton launches (triton_unusable), or the CPU under
    the Triton interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return triton_unusable(device) is None
    return device.type == "cpu" and isinstance(_rms_norm_fwd_kernel, InterpretedFunction)


def _row_settings(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for one program per row of n elements: the whole row in registers, one warp per 256
    elements (up to 16), so that each thread holds 8 values per operand: one 16-byte access in bf16."""
    block = triton.next_power_of_2(n)
    return block, max(1, min(16, block // 256))


# ---------------------------------------------------------------------------------------------------------
# rms_norm: y = w * round(x * rstd), rstd = 1/sqrt(mean(x^2) + eps), per row, fp32 inside
#           (Gemma: y = (1 + w) * x * rstd, rounded once)
# ---------------------------------------------------------------------------------------------------------
# Forward reads x (2 B/elem in bf16) and writes y (2 B), plus 4 B per row for rstd: ~4 B/elem. transformers'
# eager chain moves ~36 B/elem in six launches (to fp32 6, pow 8, mean 4, mul 8, to bf16 6, weight 4), so
# expect up to ~9x on the norm itself. Backward reads x, dy (4 B) and writes dx (2 B) against ~60 B/elem
# of autograd's chain. The weight's gradient (zero work when the norm weights are frozen, as under LoRA) is
# computed in torch when it is needed.
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, offset, ROUND: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    normed = x * rstd
    if ROUND:  # transformers rounds the normalised row to the input dtype before the weight multiplies it
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * n + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n, offset, BLOCK_N: tl.constexpr):
    # dx = rstd * (dn - normed * mean(dn * normed)), dn = dy * (w + offset), normed = x * rstd
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = tl.load(rstd_ptr + row)
    normed = x * rstd
    dn = dy * w
    dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n))
    tl.store(dx_ptr + row * n + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        rows = x2.shape[0]
        dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, warps = _row_settings(n)
        ctx.offset, ctx.round = float(unit_offset), x.dtype != torch.float32 and not unit_offset
        if rows:
            launch(_rms_norm_fwd_kernel, (rows,))(x2, weight, y, rstd, n, eps, ctx.offset, ROUND=ctx.round,
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
                launch(_rms_norm_bwd_kernel, (x2.shape[0],))(dy2, x2, weight, rstd, dx, n, ctx.offset,
                                                             BLOCK_N=block, num_warps=warps)
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:  # a trainable norm weight (not under LoRA): the same rounding as forward
            normed = x2.float() * rstd[:, None]
            if ctx.round:
                normed = normed.to(x2.dtype).float()
            dw = (dy2.float() * normed).sum(0).to(weight.dtype)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """transformers' Llama RMSNorm over the last dimension of `x`, as one kernel each way; the result has the
    promoted dtype of `x` and `weight`, like the eager module's. With `unit_offset`, Gemma's: ``(1 + w) * x *
    rstd`` in fp32, rounded once to the dtype of `x`."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps), bool(unit_offset))


# ---------------------------------------------------------------------------------------------------------
# silu_mul: h = round(silu(g)) * u, element-wise, fp32 inside (gelu_tanh_mul: the same with GELU's tanh form)
# ---------------------------------------------------------------------------------------------------------
# Forward reads g, u and writes h: 6 B/elem in bf16, against 10 B/elem in two launches eager (act 4, mul 6)
# (~1.7x). Backward reads dh, g, u and writes dg, du: 10 B/elem in one launch, against eager's mul backward
# (two products, 12 B) and the activation's backward (6 B) plus the autograd buffer they share (~20 B in three
# launches). Saved for backward: g and u only (eager keeps act(g) as well).
SILU, GELU_TANH = 0, 1


@triton.jit
def _act_and_slope(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32. silu(g) = g*s, s = sigmoid(g), silu' = s*(1 + g*(1 - s)). GELU's tanh form
    0.5*g*(1 + tanh(z)), z = c*(g + 0.044715*g^3), c = sqrt(2/pi), is g*sigmoid(2z) exactly (1 + tanh(z) =
    2*sigmoid(2z)), which keeps the left tail free of cancellation; its slope is s + g*s*(1 - s)*2z'."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        slope = s * (1.0 + g * (1.0 - s))
    else:
        s = 1.0 / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))  # sigmoid(2z)
        slope = s + g * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * g * g)
    return g * s, slope


@triton.jit
def _gated_fwd_kernel(g_ptr, u_ptr, h_ptr, n, ACT: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_slope(g, ACT)
    if ROUND:  # the eager activation returns the input dtype before the product
        act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, ROUND: tl.constexpr,
                      BLOCK: tl.constexpr):
    # du = dh * act(g);  dg = dh * u * act'(g)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, slope = _act_and_slope(g, ACT)
    d_act = dh * u
    if ROUND:  # eager autograd holds act(g) and the gradient reaching it in the input dtype
        act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
        d_act = d_act.to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + offs, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (d_act * slope).to(dg_ptr.dtype.element_ty), mask=mask)


class _GatedAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, act):
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        n = g.numel()
        ctx.act = act
        if n:
            launch(_gated_fwd_kernel, (triton.cdiv(n, BLOCK),))(g, u, h, n, ACT=act, ROUND=g.dtype != torch.float32,
                                                                BLOCK=BLOCK, num_warps=NUM_WARPS)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            launch(_gated_bwd_kernel, (triton.cdiv(n, BLOCK),))(dh, g, u, dg, du, n, ACT=ctx.act,
                                                                ROUND=g.dtype != torch.float32, BLOCK=BLOCK,
                                                                num_warps=NUM_WARPS)
        return dg, du, None


def _gated(name: str, act: int, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"{name}: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         f"must match")
    return _GatedAct.apply(gate, up, act)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as one kernel each way; both of one shape and dtype (the gate and up projections)."""
    return _gated("silu_mul", SILU, gate, up)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up`` (Gemma's MLP) as one kernel each way, like `silu_mul`."""
    return _gated("gelu_tanh_mul", GELU_TANH, gate, up)


# ---------------------------------------------------------------------------------------------------------
# rope: y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], per head, in place of the layout
# ---------------------------------------------------------------------------------------------------------
# x is a query or key tensor [B, H, T, D] as the attention makes it (a transposed view of the projection's
# output: any strides, the last dimension contiguous); cos and sin are [B or 1, T, D]. Each program rotates all
# heads of BLOCK_T tokens of one sequence, as a [BLOCK_T * BLOCK_H, BLOCK_D] tile of half-rows (~4096
# elements: 2 tokens of the 7B shape's 32 heads x 64); reads x (2 B/elem in bf16) and writes y (2 B), cos and
# sin once per token; against the eager chain's ~20 B/elem in five launches (x*cos 4, slice-neg 2, cat 4,
# *sin 4, add 6): ~5x. The backward is the same kernel with the rotation transposed:
# dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1.
ROPE_TILE = 4096


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, heads, half, sx_b, sx_h, sx_t, sy_b, sy_h, sy_t, sc_b, sc_t,
                 TRANSPOSED: tl.constexpr, ROUND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(T, BLOCK_T)
    b = pid // blocks
    rows = tl.arange(0, BLOCK_T * BLOCK_H)[:, None]
    t = (pid % blocks) * BLOCK_T + rows // BLOCK_H
    h = rows % BLOCK_H
    d = tl.arange(0, BLOCK_D)[None, :]
    in_table = (t < T) & (d < half)
    mask = in_table & (h < heads)
    x_at = x_ptr + b * sx_b + t * sx_t + h * sx_h + d
    x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + half, mask=mask, other=0.0).to(tl.float32)
    c_at = b * sc_b + t * sc_t + d
    c1 = tl.load(cos_ptr + c_at, mask=in_table, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_at + half, mask=in_table, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_at, mask=in_table, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_at + half, mask=in_table, other=0.0).to(tl.float32)
    if TRANSPOSED:  # the backward: the transposed rotation
        r1, r2 = x2 * s2, -(x1 * s1)
    else:
        r1, r2 = -(x2 * s1), x1 * s2
    p1, p2 = x1 * c1, x2 * c2
    if ROUND:  # eager rounds each product to the tensor's dtype before the sum
        p1, p2 = p1.to(y_ptr.dtype.element_ty).to(tl.float32), p2.to(y_ptr.dtype.element_ty).to(tl.float32)
        r1, r2 = r1.to(y_ptr.dtype.element_ty).to(tl.float32), r2.to(y_ptr.dtype.element_ty).to(tl.float32)
    y_at = y_ptr + b * sy_b + t * sy_t + h * sy_h + d
    tl.store(y_at, (p1 + r1).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_at + half, (p2 + r2).to(y_ptr.dtype.element_ty), mask=mask)


def _rope_settings(heads: int, dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D, num_warps): whole heads and half-rows, as many tokens as fill ROPE_TILE."""
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(dim // 2)
    block_t = max(1, ROPE_TILE // (block_h * block_d))
    return block_t, block_h, block_d, max(1, min(8, block_t * block_h * block_d // 256))


def _rope_launch(x, cos, sin, out_dtype, transposed: bool):
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, heads, T, dim = x.shape
    y = torch.empty_like(x, dtype=out_dtype)  # the strides of x: the attention's transposed layout
    if x.numel():
        block_t, block_h, block_d, warps = _rope_settings(heads, dim)
        launch(_rope_kernel, (batch * triton.cdiv(T, block_t),))(
            x, cos, sin, y, T, heads, dim // 2, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
            y.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), TRANSPOSED=transposed,
            ROUND=out_dtype != torch.float32, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), transposed=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, dy.dtype, transposed=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` for x [B, H, T, D] and cos, sin [B or 1, T, D] (no
    gradient to cos and sin: they are position tables). The result has x's strides."""
    if x.dim() != 4 or cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (x.shape[2], x.shape[3]) \
            or cos.shape[0] not in (1, x.shape[0]) or x.shape[-1] % 2:
        raise ValueError(f"rope: x {tuple(x.shape)} with cos {tuple(cos.shape)}, sin {tuple(sin.shape)} (needs x "
                         f"[B, H, T, D] with an even D and cos, sin [B or 1, T, D])")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():  # the kernel walks both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return _Rope.apply(x, cos.detach(), sin.detach())


# ---------------------------------------------------------------------------------------------------------
# cross_entropy_grad_: per row of logits z, loss = lse(c(z)) − c(z)[target] and, in z's place, the gradient
# (softmax(c(z)) − onehot(target)) · c'(z), zero for an ignored row; c = softcap·tanh(·/softcap) or the identity
# ---------------------------------------------------------------------------------------------------------
# Its torch twin (cross_entropy_grad_torch_, below) makes ~10 passes over a chunk's logits (the fp32 copy, max,
# exp, sum, division, the mask, the cast back: ~50 B/logit from bf16 logits) and holds an fp32 copy beside them.
# Here one program per row reads the row twice (an online max and sum of exponentials, then the gradient) and
# writes it once, in place: 6 B/logit in bf16, and no copy. fp32 arithmetic on the same inputs, the gradient
# rounded once to z's dtype, as the torch path rounds it for the head's matmul.
CE_BLOCK = 4096  # logits per block of a row: 8 bf16 values per thread with 16 warps; Llama-2's 32,000 in 8 blocks


@triton.jit
def _softcapped(x, softcap, SOFTCAP: tl.constexpr):
    """(c(x), c'(x)) in fp32: softcap·tanh(x/softcap) and 1 − tanh², tanh(y) as sign(y)·(1 − e)/(1 + e) with
    e = exp(−2|y|), which cannot overflow; the identity and 1 without SOFTCAP."""
    slope = 1.0
    if SOFTCAP:
        y = x / softcap
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(y < 0, -t, t)
        x = softcap * t
        slope = 1.0 - t * t
    return x, slope


@triton.jit
def _cross_entropy_grad_kernel(z_ptr, t_ptr, loss_ptr, V, softcap, ignore_index, SOFTCAP: tl.constexpr,
                               BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    # pass 1: the row's max and sum of exponentials, rescaled block by block (every block holds a logit)
    top = -float("inf")
    total = 0.0
    for start in range(0, V, BLOCK_V):
        mask = start + offs < V
        x, _ = _softcapped(tl.load(z_row + start + offs, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        x = tl.where(mask, x, -float("inf"))
        new_top = tl.maximum(top, tl.max(x, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.where(mask, tl.exp(x - new_top), 0.0), axis=0)
        top = new_top
    target = tl.load(t_ptr + row)
    valid = target != ignore_index
    picked = tl.where(valid, target, 0)
    z_target, _ = _softcapped(tl.load(z_row + picked).to(tl.float32), softcap, SOFTCAP)
    # lse − z_target as (max − z_target) + log(sum): exact 0 + log(sum) when the target is the max
    tl.store(loss_ptr + row, tl.where(valid, (top - z_target) + tl.log(total), 0.0))
    # pass 2: the gradient, in place; the softmax as exp(x − max)/sum, as the torch path computes it (exp(x − lse)
    # would carry lse's rounding, ~1e-7 of its size, into every probability)
    scale = tl.where(valid, 1.0, 0.0) / total
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x, slope = _softcapped(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        g = (tl.exp(x - top) * scale - tl.where((cols == picked) & valid, 1.0, 0.0)) * slope
        tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad_(z: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                        ignore_index: int = -100) -> torch.Tensor:
    """Per row of the logits `z` [P, V] (contiguous, bf16/fp16/fp32), the cross entropy against `targets` [P]
    (0 where a target is `ignore_index`), returned in fp32; `z` is overwritten with the gradient of the summed
    losses with respect to it, in its own dtype (zero rows for ignored targets). With `softcap`, the logits are
    softcap·tanh(z/softcap) first, as Gemma 2's final softcapping, and the gradient is taken through it."""
    if z.dim() != 2 or not z.is_contiguous() or targets.shape != z.shape[:1] or not z.is_floating_point():
        raise ValueError(f"cross_entropy_grad_: logits {tuple(z.shape)} {z.dtype} (contiguous: "
                         f"{z.is_contiguous()}) with targets {tuple(targets.shape)}: needs contiguous float "
                         f"[P, V] logits and [P] targets")
    losses = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    if z.numel():
        launch(_cross_entropy_grad_kernel, (z.shape[0],))(z, targets.contiguous(), losses, z.shape[1],
                                                         float(softcap or 1.0), ignore_index,
                                                         SOFTCAP=bool(softcap), BLOCK_V=CE_BLOCK, num_warps=16)
    return losses


def cross_entropy_grad_torch_(z: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                              ignore_index: int = -100) -> torch.Tensor:
    """The torch twin of cross_entropy_grad_ (for the CPU and an engine without its fused ops), on fp32 (or fp64)
    logits `z` [P, V]: returns the per-row cross entropy (0 for an ignored target) and overwrites `z` with its
    gradient. ~10 passes over the logits where the kernel makes three; a softcap's slope is a second copy, freed
    on return."""
    slope = None
    if softcap:  # softcap·tanh(z/softcap), whose slope 1 − tanh² the gradient needs
        t = z.div_(softcap).tanh_()
        slope = t.square().neg_().add_(1)
        z = t.mul_(softcap)
    valid = targets != ignore_index
    picked = targets.clamp(min=0).unsqueeze(1)
    target_logit = z.gather(1, picked).squeeze(1)
    # log-sum-exp by hand, in z's own memory (torch.logsumexp takes a temporary of z's size on some devices):
    # z becomes exp(z − max), then the softmax
    top = z.amax(dim=1, keepdim=True)
    total = z.sub_(top).exp_().sum(dim=1, keepdim=True)
    losses = torch.where(valid, (top + total.log()).squeeze(1) - target_logit, 0.0)
    # the cross entropy's gradient: softmax − one-hot, zero for an ignored position
    g = z.div_(total)
    g.scatter_add_(1, picked, -valid.unsqueeze(1).to(g.dtype))
    g.mul_(valid.unsqueeze(1))
    if slope is not None:
        g.mul_(slope)
    return losses
