"""The reference Booster step: the original trainer's semantics, op for op, and nothing clever.

It is the yardstick that the fast step and every benchmark are measured against, so it keeps the original's
shape on purpose (git-disl/Booster's trainer): gradients cloned into per-tensor dicts, the global norm as the norm of the
per-tensor norms plus 1e-7, a per-tensor in-place perturbation and the inexact `+=` restore, the combination
`∇f + λ∇h(w) − λ∇h(w̃)`, clipping of the combined gradient, and a torch AdamW step (weight decay as the HF
Trainer groups it: not on biases and norm weights).
Two deliberate departures: gradient accumulation is exact (the original zeroes accumulated grads on every
micro-step), and nothing here calls `.item()`. So with perturb_aware, k micro-batches (or k processes) share one
norm of the attention-output gradients, the perturbation of one big batch, where the original normalises each
micro-batch (and each process) on its own.

`perturb_aware` (Booster + Vaccine) runs the original's two extra alignment passes (perturb_aware.py): one at w
that records each attention output's gradient, one with the outputs perturbed by ρ along it. The original's
training step then returns the perturbed alignment loss f(w; e); here `loss` stays f(w), as without Vaccine,
and f(w; e) is logged beside it as `loss_perturbed` (the fast engine logs the same two).
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.nn as nn

from .batches import micro_batches
from .config import BoosterConfig
from .losses import label_count, loss_sum
from .compute import Autocast
from .lora import no_trainable_reason, trainable_parameters
from .nf4 import keep_nf4_trainable_


NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")  # HF Trainer's name patterns


def exempt_from_decay(model, params) -> set[str]:
    """The names among `params` (name, parameter) that the HF Trainer leaves without weight decay: biases and
    norm weights, by name or inside an nn.LayerNorm."""
    in_layer_norm = {f"{m}.{n}".lstrip(".") for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                     for n, _ in mod.named_parameters(recurse=False)}
    return {n for n, _ in params if NO_DECAY.search(n.lower()) or n in in_layer_norm}


def decay_groups(model, params, weight_decay: float) -> list[dict]:
    """The HF Trainer's AdamW groups: weight decay on every trainable tensor but those `exempt_from_decay`
    names. For LoRA's A/B weights that is all of them, one group; the rest (peft's modules_to_save, trainable
    biases) get a second group without decay."""
    exempt = exempt_from_decay(model, params)
    groups = [{"params": [p for n, p in params if n not in exempt], "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": [p for n, p in params if n in exempt], "weight_decay": 0.0})
    return groups


class ReferenceBooster:
    def __init__(self, model, cfg: BoosterConfig):
        self.model, self.cfg = model, cfg
        self._cfg_built = self._cfg_seen = cfg.snapshot()  # a config changed between steps is checked again
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:  # the original leaves that to DDP's wrapper
            raise ValueError("impl='reference' runs in one process: it reduces no gradient across processes; use "
                             "impl='fast' with several")
        keep_nf4_trainable_(model)
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError(no_trainable_reason(model))
        if not any("lora_" in name for name, _ in self.params):  # the original trains a LoRA adapter
            raise ValueError(f"the model has no LoRA weights, only {len(self.params)} trainable tensors of its own; "
                             "call add_lora first (or freeze the base model)")
        self.device = self.params[0][1].device
        self.autocast = Autocast(model, self.device)
        self.optimizer = torch.optim.AdamW(decay_groups(model, self.params, cfg.weight_decay), lr=cfg.lr,
                                           betas=cfg.betas, eps=cfg.adam_eps)
        self.hidden = None
        if cfg.perturb_aware:
            from .perturb_aware import AttentionPerturbation

            self.hidden = AttentionPerturbation(model)

    # -- one forward/backward over (possibly several) micro-batches, token-weighted as one big batch --------
    def _forward_backward(self, batch, around=None) -> torch.Tensor:
        """`around(i)`: a context held over micro-batch i's forward and backward (perturb_aware's hooks)."""
        parts = micro_batches(batch, self.cfg.grad_accum)
        if any("cu_seqlens" in b for b in parts):
            raise ValueError("the reference engine takes padded batches, as the original trainer does; packed "
                             "batches (packing.py) are for the fast engine")
        total = sum(label_count(b) for b in parts).clamp(min=1)
        loss = torch.zeros((), device=self.device)
        for i, b in enumerate(parts):
            with around(i) if around else contextlib.nullcontext():
                with self.autocast():
                    s = loss_sum(self.model, b)
                (s / total).backward()
            loss += s.detach()
        return loss / total

    def _clone_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.params}

    def _clip_and_update(self):
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, align_batch, harmful_batch) -> dict[str, torch.Tensor]:
        self._cfg_seen = self.cfg.recheck(self._cfg_built, self._cfg_seen)
        cfg, model = self.cfg, self.model
        model.train()
        model.zero_grad(set_to_none=True)

        # 1. harmful gradient at w, cloned into a dict
        harmful_loss = self._forward_backward(harmful_batch)
        g1 = self._clone_grads()
        model.zero_grad(set_to_none=True)

        # 2. global norm = norm of per-tensor norms, plus 1e-7 (as the original)
        grad_norm = torch.norm(torch.stack([torch.norm(g) for g in g1.values()]))
        norm = grad_norm + cfg.perturb_eps

        perturbed_loss = torch.full((), float("nan"), device=self.device)
        if cfg.meta_term:
            # 3. perturb in place: w~ = w - α g1/‖g1‖
            with torch.no_grad():
                for n, p in self.params:
                    p.data -= cfg.alpha * g1[n] / norm
            try:
                # 4. harmful gradient at w~, cloned into a second dict
                perturbed_loss = self._forward_backward(harmful_batch)
                g2 = self._clone_grads()
                model.zero_grad(set_to_none=True)
            finally:  # also when step 4 raises (out of memory, an interrupt): the model must not stay at w~
                # 5. restore in place (inexact, as the original)
                with torch.no_grad():
                    for n, p in self.params:
                        p.data += cfg.alpha * g1[n] / norm

        # 6. alignment gradient at w (perturb_aware: under the attention-output perturbation)
        out = {}
        if cfg.perturb_aware:
            loss, out["loss_perturbed"] = self._perturbed_alignment(align_batch)
        else:
            loss = self._forward_backward(align_batch)

        # 7. combine per tensor
        for n, p in self.params:
            p.grad = p.grad + cfg.lamb * g1[n] - cfg.lamb * g2[n] if cfg.meta_term else p.grad + cfg.lamb * g1[n]

        # 8. clip + AdamW
        self._clip_and_update()
        return {"loss": loss, "harmful_loss": harmful_loss, "harmful_loss_perturbed": perturbed_loss,
                "harmful_grad_norm": grad_norm, **out}

    def _perturbed_alignment(self, align_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's perturb_aware passes: the alignment batch at w recording ∂f/∂o_l (its parameter
        gradients dropped), e = ρ g/(‖g‖ + 1e-7) with ‖g‖ the norm of the per-tensor norms (as the original), then
        the alignment batch with o_l + e_l, whose gradient stays. Returns both alignment losses."""
        hidden = self.hidden
        hidden.reset()
        loss = self._forward_backward(align_batch, around=hidden.recording)
        self.model.zero_grad(set_to_none=True)
        hidden.scale_(torch.norm(torch.stack([torch.norm(g) for g in hidden.recorded()])), self.cfg.rho)
        perturbed = self._forward_backward(align_batch, around=hidden.applied)
        hidden.reset()
        return loss, perturbed

    def sft_step(self, align_batch) -> dict[str, torch.Tensor]:
        """Plain SFT (perturb_aware does not apply: it changes only the Booster update)."""
        self._cfg_seen = self.cfg.recheck(self._cfg_built, self._cfg_seen)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = self._forward_backward(align_batch)
        self._clip_and_update()
        return {"loss": loss}
