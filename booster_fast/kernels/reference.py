"""Pure-torch float64 references for the fused kernels (booster_kernels.py, model_kernels.py), which the kernel
tests compare against.

Every function is functional (inputs are never modified), upcasts to float64 and returns float64 tensors,
so the fp32 kernels can be compared against a result whose own rounding error is negligible. The maths is
written the way the method states it (the kernels' docstrings in booster_kernels.py), not the way the
kernels schedule it.
"""
from __future__ import annotations

import math

import torch

__all__ = ["sumsq_ref", "normalize_perturb_ref", "restore_combine_ref", "rms_norm_ref", "silu_mul_ref",
           "gelu_tanh_mul_ref", "rope_ref"]


def sumsq_ref(x: torch.Tensor) -> torch.Tensor:
    """||x||^2 in float64, as a 0-dim tensor."""
    x64 = x.detach().to(torch.float64)
    return (x64 * x64).sum()


def normalize_perturb_ref(W: torch.Tensor, G_h: torch.Tensor, G_f: torch.Tensor, ss: torch.Tensor | float,
                          alpha: float, lamb: float, eps: float = 1e-7) -> dict[str, torch.Tensor]:
    """Expected buffers after ``normalize_perturb_`` (float64).

    Returns ``{"W", "B", "G_h", "G_f", "norm"}``: ``B`` is the old ``W``, ``W`` is
    ``W - alpha * G_h / (sqrt(ss) + eps)``, ``G_f`` is ``G_f + lamb * G_h``, ``G_h`` is zero and ``norm`` is
    ``sqrt(ss)`` (without eps). ``ss`` is taken as given (pass ``sumsq_ref(G_h)`` for the exact value).
    """
    W64, gh64, gf64 = (t.detach().to(torch.float64) for t in (W, G_h, G_f))
    ss64 = torch.as_tensor(ss, dtype=torch.float64).detach().cpu().to(W64.device)
    norm = ss64.sqrt()
    s = alpha / (norm + eps)
    return {
        "W": W64 - s * gh64,
        "B": W64.clone(),
        "G_h": torch.zeros_like(gh64),
        "G_f": gf64 + lamb * gh64,
        "norm": norm,
    }


def restore_combine_ref(B: torch.Tensor, G_h: torch.Tensor, G_f: torch.Tensor,
                        lamb: float) -> dict[str, torch.Tensor]:
    """Expected buffers after ``restore_combine_`` (float64): ``{"W": B, "G_f": G_f - lamb * G_h}``."""
    b64, gh64, gf64 = (t.detach().to(torch.float64) for t in (B, G_h, G_f))
    return {"W": b64, "G_f": gf64 - lamb * gh64}


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, dy: torch.Tensor,
                 unit_offset: bool = False) -> dict[str, torch.Tensor]:
    """RMSNorm over the last dimension in float64, ``y = weight * x / sqrt(mean(x^2) + eps)`` (``1 + weight``
    with `unit_offset`, Gemma's form), and the gradients of ``(y * dy).sum()``: ``{"y", "dx", "dweight"}`` (by
    autograd in float64, not by the kernel's formula)."""
    x64, w64 = (t.detach().to(torch.float64).requires_grad_() for t in (x, weight))
    y = (w64 + 1 if unit_offset else w64) * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.detach().to(torch.float64))
    return {"y": y.detach(), "dx": dx, "dweight": dw}


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> dict[str, torch.Tensor]:
    """``h = silu(gate) * up`` in float64 and the gradients of ``(h * dh).sum()``: ``{"h", "dgate", "dup"}``."""
    g64, u64 = (t.detach().to(torch.float64).requires_grad_() for t in (gate, up))
    h = g64 * torch.sigmoid(g64) * u64
    dg, du = torch.autograd.grad(h, (g64, u64), dh.detach().to(torch.float64))
    return {"h": h.detach(), "dgate": dg, "dup": du}


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rotary embedding in float64, written per half: for x [B, H, T, D] and cos, sin [B or 1, T, D],
    ``y1 = x1*cos1 - x2*sin1``, ``y2 = x2*cos2 + x1*sin2``; and the gradient of ``(y * dy).sum()``:
    ``{"y", "dx"}``."""
    x64 = x.detach().to(torch.float64).requires_grad_()
    c, s = (t.detach().to(torch.float64)[:, None] for t in (cos, sin))
    half = x.shape[-1] // 2
    x1, x2 = x64[..., :half], x64[..., half:]
    y = torch.cat([x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]], -1)
    (dx,) = torch.autograd.grad(y, x64, dy.detach().to(torch.float64))
    return {"y": y.detach(), "dx": dx}


def gelu_tanh_mul_ref(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> dict[str, torch.Tensor]:
    """``h = gelu_tanh(gate) * up`` in float64, with GELU's tanh form written out
    (``0.5*g*(1 + tanh(sqrt(2/pi)*(g + 0.044715*g^3)))``), and the gradients of ``(h * dh).sum()``:
    ``{"h", "dgate", "dup"}``."""
    g64, u64 = (t.detach().to(torch.float64).requires_grad_() for t in (gate, up))
    h = 0.5 * g64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g64 + 0.044715 * g64 ** 3))) * u64
    dg, du = torch.autograd.grad(h, (g64, u64), dh.detach().to(torch.float64))
    return {"h": h.detach(), "dgate": dg, "dup": du}
