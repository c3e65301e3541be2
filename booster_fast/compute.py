"""How the base model computes in a training pass: its dtype, bf16 autocast, and gradient checkpointing.

Both engines, the attack and the evaluation run their forwards under `Autocast`, decided once per model: bf16
when the frozen base is bf16 or NF4, nothing for an fp32 base (exact comparisons). Gradient checkpointing is
enabled the way CUDA-graph capture allows where it can (no RNG state read on the host).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .nf4 import is_quantized


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base model computes in: bf16 for NF4, else the dtype of its frozen floating weights."""
    if is_quantized(model):
        return torch.bfloat16
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return torch.float32


def slow_bf16_on(device: torch.device) -> bool:
    """Whether `device` is a CPU without bf16 matmul instructions (AVX512-BF16 or AMX), where torch's bf16 matmuls
    run many times slower than fp32 ones (12x a Booster step of the tiny model on two AVX2 cores)."""
    if torch.device(device).type != "cpu":
        return False
    native = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return not any(check() for check in native if check is not None)


class Autocast:
    """bf16 autocast when the base computes in a low precision (bf16 weights or NF4), else a no-op.

    Decided once per model (walking a 7B model's modules every pass would cost milliseconds of Python)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device_type = torch.device(device).type
        self.enabled = compute_dtype(model) not in (torch.float32, torch.float64)

    def __call__(self):
        # no weight-cast cache: it must be off inside CUDA-graph capture, and LoRA weights are small
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled, cache_enabled=False)


def has_dropout(model: nn.Module) -> bool:
    """Whether a training forward may draw random numbers: a dropout module with p > 0, or any config value
    named like a dropout probability (`*dropout*`, `*pdrop*`) above zero (some models call F.dropout with it)."""
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    if any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
           for k, v in values.items()):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer's activations in the backward (non-reentrant, so the recompute runs under
    autograd and the routed LoRA forward sees the same routing, since backward runs inside the route).

    The RNG state is saved for the recompute only when the forward draws random numbers (`has_dropout`):
    saving it reads the CUDA generator's state on the host, which CUDA-graph capture refuses (the fast engine
    then runs eagerly: checkpoint_reads_rng). add_lora calls this again when it adds LoRA dropout to a
    checkpointed model."""
    kwargs = {"use_reentrant": False, "preserve_rng_state": has_dropout(model)}
    # transformers' name from 5.2x on (the old one warns); a model that overrides the old method (remote code)
    # keeps it: the new one would call that override with arguments it does not take
    overridden = getattr(model, "_is_overridden", lambda name: True)("gradient_checkpointing_enable")
    if hasattr(model, "activation_checkpointing_enable") and not overridden:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    model._booster_checkpointing = True
    return model


def checkpoint_reads_rng(model: nn.Module) -> bool:
    """Whether the model's gradient checkpointing saves the RNG states for its recompute (torch's
    `preserve_rng_state`, on unless turned off, as enable_gradient_checkpointing does for a model without
    dropout): that reads the CUDA generator's state on the host, which CUDA-graph capture refuses."""
    for m in model.modules():
        func = getattr(m, "_gradient_checkpointing_func", None)
        if getattr(m, "gradient_checkpointing", False) and func is not None:
            return bool(getattr(func, "keywords", {}).get("preserve_rng_state", True))
    return False


class flush_denormals:
    """Flush float32 denormals to zero on the CPU while a stage runs (restored to PyTorch's default, off, after).

    Measured here: once alignment has sharpened the attention, the tiny model's fine-tuning steps ran 6-10x slower
    (4.6 s instead of 0.4-0.7 s per step on 2 cores) from denormal arithmetic inside the passes; flushing them
    changes no result above 1e-38 and restores the speed. No effect on CUDA."""

    def __init__(self, device):
        self.on = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.on:
            torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc):
        if self.on:
            torch.set_flush_denormal(False)
        return False
