"""The model's RMSNorm, SwiGLU and rotary embedding as fused kernels (kernels/model_kernels.py), inside the
fast step only.

`install(model)` gives each recognised module a forward of its own that runs the fused kernel while `active()`
holds, and the module's class forward otherwise; the rotary embedding, a function of the model's transformers
module rather than a module, is wrapped there the same way. So the fast engine switches them on around its
step (forward, backward and a checkpointed layer's recompute alike), while evaluation, generation and a
reference engine on the same model run transformers' own ops untouched.

Recognised: the RMSNorms of Llama, Mistral and Qwen2/3 (`w * round(x * rsqrt(mean(x^2) + eps))`) and of Gemma
1-3 (`(1 + w) * x * rsqrt(...)`, rounded once), their gated MLPs (`down(act(gate(x)) * up(x))`, SiLU or GELU's
tanh form) and the `apply_rotary_pos_emb` of the modules that define their attention. The class name picks the
candidates; before installing, each kind runs both ways once on random input, and one whose forward disagrees
(another transformers release, a custom model) keeps its own, with one log line.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types

import torch
import torch.nn as nn

from .errors import described
from .kernels.booster_kernels import triton_unusable
from .kernels.model_kernels import available, gelu_tanh_mul, rms_norm, rope, silu_mul

log = logging.getLogger("booster_fast")
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
UNIT_OFFSET_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP")
GATES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}
ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
              "Gemma2Attention", "Gemma3Attention")
ROPE = "apply_rotary_pos_emb"
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


def _unit_offset_norm_forward(self, x):
    if _active:
        return rms_norm(x, self.weight, self.eps, unit_offset=True)
    return type(self).forward(self, x)


def _mlp_forward(self, x):
    if _active:
        gated = silu_mul if GATES[type(self.act_fn).__name__] == "silu" else gelu_tanh_mul
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


def _rope_wrapper(original):
    """`original` (transformers' apply_rotary_pos_emb), running the fused kernel while active for the layout
    the attention uses ([B, H, T, D] against [B, T, D] tables)."""
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if (_active and unsqueeze_dim == 1 and not kwargs and q.dim() == k.dim() == 4 and cos.dim() == 3
                and not (cos.requires_grad or sin.requires_grad)):
            return rope(q, cos, sin), rope(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim, **kwargs)

    apply_rotary_pos_emb._booster_fused = True
    apply_rotary_pos_emb._booster_original = original
    return apply_rotary_pos_emb


def _relative(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)


def _both_ways(run, inputs: list[torch.Tensor], seed: int = 1) -> torch.Tensor:
    """The relative difference between run(False, *inputs) (the original) and run(True, *inputs) (fused), in the
    outputs and in the inputs' gradients under one random output gradient: the backward kernels compile and run
    here too, once when installing, and not first inside a step. Both runs draw the same random numbers (LoRA
    dropout on an MLP's projections), from a forked generator: the caller's stream is left as it was."""
    results = []
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []  # manual_seed seeds them all
    for fused in (False, True):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        try:
            with torch.enable_grad(), torch.random.fork_rng(devices=gpus):
                torch.manual_seed(seed)
                ys = run(fused, *xs)
                g = torch.Generator(device=ys[0].device).manual_seed(seed)
                dys = [torch.randn(y.shape, generator=g, device=y.device) for y in ys]
                grads = torch.autograd.grad([y.float() for y in ys], xs, dys)
        except (torch.AcceleratorError, torch.OutOfMemoryError):  # an unusable device (an illegal address, say), or
            # no memory: nothing the kernels did
            raise
        except Exception as e:
            if not fused:  # the module's own forward failed: no verdict on the kernels
                raise
            raise FusedKernelError(described(e, 200)) from e
        results.append([y.detach() for y in ys] + list(grads))
    return torch.stack([_relative(got, want) for want, got in zip(*results)]).max()  # (a NaN stays NaN)


def _rope_difference(namespace, device, dtype) -> float:
    """Relative difference between the wrapped and the original rotary function of a transformers module, on
    random queries in the attention's layout, forward and backward (a host read, once per module when
    installing)."""
    fused = namespace.__dict__[ROPE]
    original = fused._booster_original
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(2, 5, 3, 8, generator=g, device=device).to(dtype).transpose(1, 2) for _ in range(2))
    angles = torch.rand(2, 5, 4, generator=g, device=device) * 6
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))

    def run(on, q, k):
        if not on:
            return original(q, k, cos, sin)
        with active():
            return fused(q, k, cos, sin)

    return float(_both_ways(run, [q, k]))


def _install_rope(model: nn.Module, tolerance: float) -> int:
    """Wrap apply_rotary_pos_emb in the transformers module of each Llama-style attention of `model`; returns
    how many attention modules it covers."""
    covered, refused = 0, set()
    dtype = _hidden_dtype(model)
    for module in model.modules():
        if type(module).__name__ not in ATTENTIONS:
            continue
        namespace = sys.modules[type(module).__module__]
        function = getattr(namespace, ROPE, None)
        if function is None or namespace.__name__ in refused:
            continue
        if not getattr(function, "_booster_fused", False):
            setattr(namespace, ROPE, _rope_wrapper(function))
            err = _checked(f"{namespace.__name__}.{ROPE}", _rope_difference, namespace,
                           next(module.parameters()).device, dtype)
            if err is None or not err <= tolerance:  # (a NaN difference fails the test too)
                setattr(namespace, ROPE, function)
                refused.add(namespace.__name__)
                if err is not None:
                    log.info("fused ops: %s.%s kept (the fused one differs by %.2g relative)", namespace.__name__,
                             ROPE, err)
                continue
        covered += 1
    return covered


class FusedKernelError(RuntimeError):
    """The fused side of an install check raised (Triton's compile and launch errors share no base class)."""


def _checked(what: str, difference, *args) -> float | None:
    """difference(*args), or None, with one log line, where the fused kernels raise (one that does not compile
    or launch on this GPU): that kind keeps its own forward, instead of failing the first step. What the module's
    own forward raises, or a CUDA error that leaves the device unusable, is raised as it is."""
    try:
        return difference(*args)
    except FusedKernelError as e:
        log.warning("fused ops: %s kept its own (the fused kernels fail: %s)", what, e)
        return None


def _kind(module: nn.Module):
    """The fused forward for `module`, or None."""
    name = type(module).__name__
    has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    if name in NORMS and hasattr(module, "variance_epsilon") and has_weight:
        return _norm_forward
    if name in UNIT_OFFSET_NORMS and isinstance(getattr(module, "eps", None), float) and has_weight:
        return _unit_offset_norm_forward
    if (name in MLPS and type(getattr(module, "act_fn", None)).__name__ in GATES
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))):
        return _mlp_forward
    return None


def _fused_difference(module: nn.Module, fused, autocast, hidden: torch.dtype) -> float:
    """Relative difference between the fused and the class forward of `module` on random input, forward and
    backward (a host read, once per class when installing), the worse of two scales: unit variance, and an RMS of
    1e-3, where a norm's epsilon (1e-6 to 1e-5) weighs as much as the variance and a kernel that placed it
    otherwise would show. `hidden`: the dtype of the hidden states an MLP receives."""
    device = next(module.parameters()).device
    if fused is not _mlp_forward:
        width, dtype = module.weight.shape[0], module.weight.dtype
    else:
        width, dtype = module.gate_proj.in_features, _hidden_dtype(module, hidden)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 5, width, generator=g, device=device)

    def run(on, xs):
        with autocast(), active(on):
            return [fused(module, xs) if on else type(module).forward(module, xs)]

    # torch's max, not Python's: a NaN at either scale must give NaN (Python's max may skip it)
    return float(torch.stack([_both_ways(run, [(x * scale).to(dtype)]) for scale in (1.0, 1e-3)]).max())


def _hidden_dtype(model: nn.Module, otherwise: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype of the hidden states in `model` (or in a module of it): that of its frozen float weights (norms,
    embeddings: fp32 for the tiny model, in NF4 too; bf16 for the shape presets), `otherwise` when it has none
    (an MLP of 4-bit weights: then the model's)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), otherwise)


def install(model: nn.Module, autocast=contextlib.nullcontext, tolerance: float = 2e-2) -> dict[str, int]:
    """Give each recognised module of `model` its fused forward (once; installing again adds nothing).
    Returns {class name: modules installed}; classes that failed the check are logged and left out."""
    device = next(model.parameters()).device
    if not available(device):
        if device.type == "cuda":
            raise ValueError(f"fused ops need Triton, which cannot launch on {device}: {triton_unusable(device)}")
        raise ValueError(f"fused ops need CUDA (or TRITON_INTERPRET=1 on the CPU), not {device}")
    verdicts: dict[str, float | None] = {}  # per class: the difference, None where the fused kernels raised
    hidden = _hidden_dtype(model)
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
            verdicts[name] = err = _checked(name, _fused_difference, module, fused, autocast, hidden)
            if err is not None and not err <= tolerance:  # (a NaN difference fails the test too)
                log.info("fused ops: %s kept its own forward (the fused one differs by %.2g relative)", name, err)
        if verdicts[name] is not None and verdicts[name] <= tolerance:
            module.forward = types.MethodType(fused, module)
            module._booster_fused = True
            counts[name] = counts.get(name, 0) + 1
    rotary = _install_rope(model, tolerance)
    if rotary:
        counts[ROPE] = rotary
    return counts
