"""The model's RMSNorm and SwiGLU as fused kernels (kernels/model_kernels.py), inside the fast step only.

`install(model)` gives each recognised module a forward of its own that runs the fused kernel while `active()`
holds, and the module's class forward otherwise. So the fast engine switches them on around its step (forward,
backward and a checkpointed layer's recompute alike), while evaluation, generation and a reference engine on
the same model run transformers' own ops untouched.

Recognised: Llama-style RMSNorm (`w * round(x * rsqrt(mean(x^2) + eps))`; Gemma's `1 + w` norm is a different
op and is left alone) and Llama-style MLPs (`down(silu(gate(x)) * up(x))`). The class name picks the
candidates; before installing, one module of each class runs both ways on random input, and a class whose
forward disagrees (another transformers release, a custom model) keeps its own, with one log line.
"""
from __future__ import annotations

import contextlib
import logging
import types

import torch
import torch.nn as nn

from .kernels.model_kernels import available, rms_norm, silu_mul

log = logging.getLogger("booster_fast")
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_active = False


@contextlib.contextmanager
def active(on: bool = True):
    """Inside (when `on`): installed modules run their fused kernels. Nest-safe."""
    global _active
    before, _active = _active, _active or on
    try:
        yield
    finally:
        _active = before


def _norm_forward(self, hidden_states):
    if _active:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x):
    if _active:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


def _kind(module: nn.Module):
    """The fused forward for `module`, or None."""
    name = type(module).__name__
    if name in NORMS and hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None),
                                                                            torch.Tensor):
        return _norm_forward
    if (name in MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))):
        return _mlp_forward
    return None


@torch.no_grad()
def _agrees(module: nn.Module, fused, autocast) -> float:
    """Relative difference between the fused and the class forward of `module` on random input (a host read,
    once per class when installing)."""
    device = next(module.parameters()).device
    if fused is _norm_forward:
        width, dtype = module.weight.shape[0], module.weight.dtype
    else:
        width, dtype = module.gate_proj.in_features, _hidden_dtype(module)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 5, width, generator=g, device=device).to(dtype)
    with autocast():
        want = type(module).forward(module, x).float()
        with active():
            got = fused(module, x).float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _hidden_dtype(mlp: nn.Module) -> torch.dtype:
    """The dtype of the hidden states an MLP receives: that of its frozen float weights (fp32 for the tiny
    model, bf16 for the shape presets), bf16 when they are all 4-bit."""
    return next((p.dtype for p in mlp.parameters() if p.is_floating_point() and not p.requires_grad),
                torch.bfloat16)


def install(model: nn.Module, autocast=contextlib.nullcontext, tolerance: float = 2e-2) -> dict[str, int]:
    """Give each recognised module of `model` its fused forward (once; installing again adds nothing).
    Returns {class name: modules installed}; classes that failed the check are logged and left out."""
    device = next(model.parameters()).device
    if not available(device):
        raise ValueError(f"fused ops need CUDA (or TRITON_INTERPRET=1 on the CPU), not {device}")
    verdicts: dict[str, float] = {}
    counts: dict[str, int] = {}
    for module in model.modules():
        fused, name = _kind(module), type(module).__name__
        if fused is None:
            continue
        if getattr(module, "_booster_fused", False):
            counts[name] = counts.get(name, 0) + 1
            continue
        if "forward" in vars(module):  # someone else's instance forward: leave it
            continue
        if name not in verdicts:
            verdicts[name] = _agrees(module, fused, autocast)
            if not verdicts[name] <= tolerance:
                log.info("fused ops: %s kept its own forward (the fused one differs by %.2g relative)", name,
                         verdicts[name])
        if verdicts[name] <= tolerance:
            module.forward = types.MethodType(fused, module)
            module._booster_fused = True
            counts[name] = counts.get(name, 0) + 1
    return counts
