"""Booster + Vaccine: the alignment gradient taken under a perturbation of every attention output.

The original trainer's `perturb_aware` variant (git-disl/Booster) replaces the alignment gradient ∇f(w) of the
Booster update with Vaccine's perturbation-aware one (Huang et al., arXiv 2402.01109):

    a. forward/backward the alignment batch at w, recording g_l = ∂f/∂o_l for the output o_l of each decoder
       layer's self-attention module (that pass's parameter gradients are dropped);
    b. e_l = ρ · g_l / (‖g‖ + 1e-7), with ‖g‖ ONE L2 norm over all layers (and all micro-batches, all processes:
       the perturbation of one big batch; the original, whose accumulation is not exact, takes a norm per
       micro-batch and per process, so with k of them it moves the outputs by ~√k·ρ in all);
    c. forward/backward the alignment batch again at w, each o_l replaced by o_l + e_l (a constant: the gradient
       flows through as through o_l); its gradient is the update's

           g = ∇f(w; e) + λ (∇h(w) − ∇h(w̃)).

The original takes (a) as a fourth pass. The fast engine records g in its merged pass, which already runs the
alignment batch at w, so the variant costs it one pass more than plain Booster, not two.

Pad and filler positions get no gradient (nothing attends to them and they carry no label), so e is zero there and
a packed batch is perturbed exactly as its padded form is.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def attention_modules(model) -> list[nn.Module]:
    """Each decoder layer's self-attention module, in order. The original lists attention classes (Llama, OPT,
    Mistral, Gemma 1-2, Qwen2), all named `self_attn` in their decoder layers; matching the name also covers the
    families it does not list (Qwen3, Gemma 3, Phi, ...), where its list finds nothing and its step fails."""
    found = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "self_attn"]
    if not found:
        raise ValueError("perturb_aware: the model has no `self_attn` modules whose outputs could be perturbed")
    return found


@contextlib.contextmanager
def _forward_hooks(modules, hook_for_layer):
    """Inside: `hook_for_layer(l)` is a forward hook of modules[l], for every l."""
    handles = [m.register_forward_hook(hook_for_layer(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class AttentionPerturbation:
    """Records the attention-output gradients of the alignment passes, turns them into e, and adds e back.

    `grads[i][l]` is micro-batch i's gradient at layer l (None where no gradient reached the layer: below every
    LoRA layer. That layer is left unperturbed; the original fails there, its slot being the int 0)."""

    def __init__(self, model, eps: float = 1e-7):
        self.modules = attention_modules(model)
        self.eps = eps
        self.grads: list[list[torch.Tensor | None]] = []

    def reset(self):
        self.grads = []

    @contextlib.contextmanager
    def recording(self, index: int, select: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Inside, forwards register a hook on each attention output that keeps its gradient (`select`ed: the
        alignment rows of a merged batch) as micro-batch `index`'s. Hold it across the backward when layers are
        recomputed there: with reentrant checkpointing only the recomputed outputs see a gradient."""
        while len(self.grads) <= index:
            self.grads.append([None] * len(self.modules))
        slots = self.grads[index]

        def keep(layer):
            def store(grad):
                slots[layer] = (select(grad) if select else grad).clone()  # autograd goes on using `grad`
            return store

        def hook(layer):
            def fwd(module, args, output):
                out = _first(output)
                if out.requires_grad:
                    out.register_hook(keep(layer))
            return fwd

        with _forward_hooks(self.modules, hook):
            yield

    def recorded(self) -> list[torch.Tensor]:
        kept = [g for per_batch in self.grads for g in per_batch if g is not None]
        if not kept:
            raise ValueError("perturb_aware: no gradient reached any attention output (no LoRA weight below them?)")
        return kept

    def norm(self, distributed: bool = False) -> torch.Tensor:
        """‖g‖ over every recorded gradient, in fp32 on the device (summed over processes when `distributed`). The
        reference, as the original, takes per-layer norms in the gradients' dtype (bf16 under autocast) instead."""
        # one foreach op for all layers: the step's bookkeeping does not grow with depth
        ss = torch.stack(torch._foreach_norm(self.recorded(), 2, dtype=torch.float32)).square().sum()
        if distributed:
            dist.all_reduce(ss)
        return ss.sqrt()

    def scale_(self, norm: torch.Tensor, rho: float):
        """Turns the recorded gradients into e = ρ g / (norm + eps), in place."""
        scale = rho / (norm + self.eps)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in self.recorded():
            by_dtype.setdefault(g.dtype, []).append(g)
        for dtype, group in by_dtype.items():
            torch._foreach_mul_(group, scale.to(dtype))

    @contextlib.contextmanager
    def applied(self, index: int):
        """Inside, each attention output of the forward gets micro-batch `index`'s e added. Hold it across the
        backward when layers are recomputed there (gradient checkpointing), so the recompute is perturbed too."""
        es = self.grads[index]

        def hook(layer):
            def fwd(module, args, output):
                e = es[layer]
                if e is None:
                    return None
                out = _first(output)
                if out.shape != e.shape:
                    raise ValueError(f"perturb_aware: the perturbation of layer {layer} has shape {tuple(e.shape)}, "
                                     f"its attention output {tuple(out.shape)}: the batch changed between passes")
                out = out + e
                return (out, *output[1:]) if isinstance(output, (tuple, list)) else out
            return fwd

        with _forward_hooks(self.modules, hook):
            yield
