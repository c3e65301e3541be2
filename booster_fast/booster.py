"""`Booster`: the public entry point. It owns the optimizer and runs one Booster (or SFT) update per call.

    booster = Booster(model, BoosterConfig(impl="fast"))
    out = booster.step(align_batch, harmful_batch)   # dict of 0-dim device tensors, nothing read to the host

`impl="reference"` is the original trainer's semantics op for op (reference.py); `impl="fast"` the same maths
on flat buffers with fused kernels and the merged pass (fast.py).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .batches import check_batch
from .config import BoosterConfig, is_integer

HOW_IT_RUNS = ("fused", "foreach", "capturable", "differentiable")  # optimizer options that are not training state


def warn_about_what_the_engines_leave_out(model) -> None:
    """One warning each for what a model brings that neither engine runs as its own forward would (Booster and
    BoosterTrainer's engine call it when they are built)."""
    import logging

    log = logging.getLogger("booster_fast")
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        log.warning("booster: the model's config sets output_router_logits, but both engines train on the token loss "
                    "alone: the router's load-balancing loss, which Hugging Face's own loss adds (router_aux_loss_coef "
                    "times it), is left out")
    if any(getattr(m, "_use_kernels", False) for m in model.modules()):  # (what transformers' use_kernels reads)
        log.warning("booster: the model was loaded with transformers' hub kernels (use_kernels, on by default from "
                    "transformers 5.25): its layers run kernels fetched from the hub, which the engines' checks "
                    "against the reference never ran; load it with use_kernels=False, as load_model does")


def engine_class(cfg: BoosterConfig):
    """The engine class for cfg.impl: the reference's op-for-op step or the fast one (imported on demand)."""
    if cfg.impl == "reference":
        from .reference import ReferenceBooster

        return ReferenceBooster
    from .fast import FastBooster

    return FastBooster


class Booster:
    """Runs Booster (or SFT) updates of a peft LoRA model with one optimizer over its trainable weights; the engine
    (cfg.impl) is the reference's op-for-op step or the fast one."""

    def __init__(self, model, cfg: BoosterConfig | None = None):
        self.cfg = cfg = BoosterConfig() if cfg is None else cfg
        if not isinstance(cfg, BoosterConfig):
            raise ValueError(f"cfg must be a BoosterConfig, got {type(cfg).__name__} (BoosterConfig(**that) makes one)")
        self.model = model
        self.engine = engine_class(cfg)(model, cfg)
        warn_about_what_the_engines_leave_out(model)
        self.vocab = _vocab(model)  # for to_device's token-id check (a read of the CPU batch; none in a step)

    @property
    def optimizer(self):
        return self.engine.optimizer

    def to_device(self, batch: dict, device) -> dict | list[dict]:
        """A collated (CPU) batch on `device`, in the form this engine runs best. The fast engine gets it without
        the attention mask, after a host-side check that it is right-padded (exact for a causal decoder; see
        batches.to_device), or packed without pads when the engine packs (packing.py; with grad_accum > 1, as a
        list of packed micro-batches, captured as one graph like a single batch); the packed lengths are rounded
        to buckets, and padded batches keep max_length, only when the engine captures CUDA graphs (few shapes).
        The reference gets the batch as the original trainer's collator makes it: with its mask, padded to its
        longest row (batches.trim_to_longest). A list of collated batches (micro-batches cut already) comes back as
        a list, each prepared so. A batch a step cannot run (keys, shapes, dtypes, token ids outside the model's
        vocabulary) is one ValueError here."""
        from .batches import micro_batches

        parts = batch if isinstance(batch, (list, tuple)) else [batch]
        if any(isinstance(b, Mapping) and ("targets" in b or "cu_seqlens" in b) for b in parts):
            raise ValueError("to_device takes a collated batch; this one is to_device's output already: pass it to "
                             "step as it is")
        if not (parts and all(isinstance(b, Mapping) for b in parts)):
            raise ValueError(f"batch: a dict of tensors (input_ids, labels, attention_mask) expected, got "
                             f"{type(batch).__name__}")
        parts = [dict(b) for b in parts]  # (a collator's BatchEncoding is a Mapping, not a dict)
        check_batch(parts if isinstance(batch, (list, tuple)) else parts[0], "batch", None, self.vocab)
        if isinstance(batch, (list, tuple)):
            return [self._prepared(b, device) for b in parts]
        if getattr(self.engine, "pack", False) and self.cfg.grad_accum > 1:  # each micro-batch packed on its own
            return [self._prepared(b, device) for b in micro_batches(parts[0], self.cfg.grad_accum)]
        return self._prepared(parts[0], device)

    def _prepared(self, batch: dict, device) -> dict:
        """One collated (micro-)batch in this engine's form (to_device)."""
        from .batches import to_device, trim_to_longest

        if self.cfg.impl == "reference":
            return to_device(trim_to_longest(batch), device)
        static = getattr(self.engine, "graphs", None) is not None  # CUDA graphs: few shapes, so buckets
        trimmed = batch if static else trim_to_longest(batch)
        if not getattr(self.engine, "pack", False):
            return to_device(trimmed, device, drop_mask=self.engine.drop_mask)
        # (without graphs a batch that packing would not shrink, or whose rows pass a sliding window, goes padded
        # to its longest row, as above)
        return to_device(trimmed, device, pack=True, bucketed=static, window=self.engine.window)

    def check_length(self, max_length: int) -> None:
        """ModelError (a ValueError) where this engine cannot run rows of `max_length` tokens exactly: the fast
        engine beyond the original length of a RoPE that rescales with the sequence (FastBooster.check_length). Each
        step checks its own batches; the commands check --max-length with this before anything is written."""
        if not is_integer(max_length) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
        if self.cfg.impl == "fast":
            self.engine.check_length(max_length, f"--max-length {max_length}")

    def step(self, align_batch, harmful_batch):
        """One Booster update; returns loss, harmful_loss, harmful_loss_perturbed (NaN without the meta term),
        harmful_grad_norm (0-dim device tensors), loss_perturbed with perturb_aware (the alignment loss under the
        attention-output perturbation) and, from the fast engine, skipped (1.0 when a non-finite update was
        skipped). A batch is a dict of input_ids, labels (-100 where no token is learnt) and attention_mask on the
        model's device, or what `to_device` makes of one (checked on the host). The fast engine leaves masks out:
        with CUDA graphs, a CUDA mask is checked for right padding only until its shape is captured."""
        check_batch(align_batch, "align_batch", self.engine.device)
        check_batch(harmful_batch, "harmful_batch", self.engine.device)
        return self.engine.step(align_batch, harmful_batch)

    def sft_step(self, align_batch):
        """One plain SFT update on the alignment batch (the baseline), same optimizer and clipping."""
        check_batch(align_batch, "align_batch", self.engine.device)
        return self.engine.sft_step(align_batch)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The training state beyond the LoRA weights (which the model saves itself): the optimizer's, tagged with
        the engine. The fast engine's optimizer holds one parameter, the flat buffer W; its LoRA parameters are
        views of W, so loading the adapter weights in place restores W."""
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:  # a device-tensor lr (CUDA graphs) is live: keep its value now
            if torch.is_tensor(group.get("lr")):
                group["lr"] = group["lr"].detach().clone()
        return {"impl": self.cfg.impl, "optimizer": state}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved (the LoRA weights are loaded into the model separately), checked against
        this engine and model: ValueError for another engine's state or another model's shapes."""
        if not (isinstance(state, dict) and isinstance(state.get("optimizer"), dict)):
            keys = f" with keys {sorted(state)}" if isinstance(state, dict) else ""
            raise ValueError(f"a state_dict() of a Booster expected (a dict with the optimizer's state), got "
                             f"{type(state).__name__}{keys}")
        if state.get("impl") != self.cfg.impl:
            raise ValueError(f"optimizer state of the {state.get('impl')!r} engine, this Booster is {self.cfg.impl!r}")
        # how the optimizer runs (fused, capturable, ...) is this engine's choice, not training state: a state
        # saved by an engine on another device must not turn, say, CUDA graphs' capturable AdamW off. Set in the
        # saved groups, since torch places the loaded step counters by those (on the device for fused/capturable)
        saved = self._checked(state["optimizer"])
        groups = []
        for g, own in zip(saved["param_groups"], self.optimizer.param_groups):
            g = {**g, **{k: own[k] for k in HOW_IT_RUNS if k in own}}
            if torch.is_tensor(g.get("lr")) and not torch.is_tensor(own["lr"]):  # saved under CUDA graphs, whose
                g["lr"] = g["lr"].item()  # lr is a device tensor; this engine keeps a float (no device in checkpoints)
            groups.append(g)
        saved["param_groups"] = groups
        self.optimizer.load_state_dict(saved)
        graphs = getattr(self.engine, "graphs", None)
        if graphs is not None:  # captured graphs point at the old optimizer-state tensors: capture again
            graphs.reset()

    def _checked(self, saved: dict) -> dict:
        """`saved` with every state tensor checked against its parameter's shape (torch's load_state_dict does not
        check, and a fused step over a too-short state writes out of bounds). A fast-engine state saved before the
        flat buffers were padded (its length is the LoRA element count) gets the zero pad appended."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        ids = [i for group in saved["param_groups"] for i in group["params"]]
        if len(ids) != len(params):
            raise ValueError(f"optimizer state for {len(ids)} parameters, this Booster has {len(params)}")
        lora_numel = getattr(getattr(self.engine, "flat", None), "numel", None)
        state = {}
        for i, p in zip(ids, params):
            entry = dict(saved["state"].get(i, {}))
            for k, v in entry.items():
                if not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape:
                    continue
                if v.dim() == p.dim() == 1 and v.numel() == lora_numel < p.numel():
                    entry[k] = torch.cat([v, v.new_zeros(p.numel() - v.numel())])
                else:
                    raise ValueError(f"optimizer state {k!r} has shape {tuple(v.shape)} but its parameter "
                                     f"{tuple(p.shape)}: the state belongs to another model or LoRA setting")
            state[i] = entry
        return {**saved, "state": state}


def _vocab(model) -> tuple[int, int] | None:
    """(input embeddings, LM head outputs) of a causal LM, or None where it has no such layers to read."""
    try:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # a model of one's own, not a transformers one
        return None
    n_in, n_out = getattr(emb, "num_embeddings", None), getattr(head, "out_features", None)
    return (n_in, n_out) if n_in and n_out else None
