"""`Booster`: the public entry point. It owns the optimizer and runs one Booster (or SFT) update per call.

    booster = Booster(model, BoosterConfig(impl="fast"))
    out = booster.step(align_batch, harmful_batch)   # dict of 0-dim device tensors, nothing read to the host

`impl="reference"` is the original trainer's semantics op for op (reference.py); `impl="fast"` the same maths
on flat buffers with fused kernels and the merged pass (fast.py).
"""
from __future__ import annotations

from .config import BoosterConfig


class Booster:
    def __init__(self, model, cfg: BoosterConfig | None = None):
        self.cfg = cfg = cfg or BoosterConfig()
        if cfg.impl == "reference":
            from .reference import ReferenceBooster as Engine
        else:
            from .fast import FastBooster as Engine
        self.model = model
        self.engine = Engine(model, cfg)

    @property
    def optimizer(self):
        return self.engine.optimizer

    def to_device(self, batch: dict, device) -> dict:
        """A collated (CPU) batch on `device`, in the form this engine runs best. The fast engine gets it without
        the attention mask, after a host-side check that it is right-padded (exact for a causal decoder; see
        batches.to_device); the reference keeps the mask, as the original trainer does."""
        from .batches import to_device

        return to_device(batch, device, drop_mask=self.cfg.impl == "fast")

    def step(self, align_batch, harmful_batch):
        """One Booster update; returns loss, harmful_loss, harmful_loss_perturbed, harmful_grad_norm (0-dim
        device tensors) and, from the fast engine, skipped (1.0 when a non-finite update was skipped)."""
        return self.engine.step(align_batch, harmful_batch)

    def sft_step(self, align_batch):
        """One plain SFT update on the alignment batch (the baseline), same optimizer and clipping."""
        return self.engine.sft_step(align_batch)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The training state beyond the LoRA weights (which the model saves itself): the optimizer's, tagged with
        the engine. The fast engine's optimizer holds one parameter, the flat buffer W; its LoRA parameters are
        views of W, so loading the adapter weights in place restores W."""
        return {"impl": self.cfg.impl, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("impl") != self.cfg.impl:
            raise ValueError(f"optimizer state of the {state.get('impl')!r} engine, this Booster is {self.cfg.impl!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        graphs = getattr(self.engine, "graphs", None)
        if graphs is not None:  # captured graphs point at the old optimizer-state tensors: capture again
            graphs.reset()
