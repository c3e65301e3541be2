"""Causal attention with no mask at all, for batches that need none.

transformers builds each forward's attention mask itself. With its standard "sdpa" implementation that costs
a host sync per forward on CUDA: given a padding mask it calls `.all()` on it to see whether SDPA's causal
kernels may be used; given none, it checks the position ids for packed sequences, again with `.all()`. Inside
a CUDA-graph capture it skips both checks and materialises a 4D mask instead, so a captured step would run
other attention kernels than the eager one.

Registered under a name of its own that has no mask function, transformers' SDPA attention gets no mask (mask
creation exits early for such implementations) and runs with `is_causal=True`: no host sync, no mask tensor,
the flash kernels, the same in eager and captured steps. That is exact exactly when the batch needs no mask:
right-padded, with the pads unlabelled (real tokens never attend to the pads after them). So it is switched on
only around the forward of a batch that carries no attention mask; `Booster.to_device` leaves the mask out for
the fast engine after checking the padding on the host.
"""
from __future__ import annotations

import contextlib

CAUSAL_SDPA = "booster_causal_sdpa"
_registered = False


def _register():
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
        _registered = True


@contextlib.contextmanager
def unmasked_causal(model, batch: dict):
    """Inside: a model on transformers' "sdpa" attention runs the mask-free causal SDPA, when `batch` has no
    attention mask. Any other model or batch is left as it is, and so is a model whose mask is more than causal
    (a sliding window: mask building would add it; or a model that is not causal at all)."""
    config = getattr(model, "config", None)
    if (batch.get("attention_mask") is not None or getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "sliding_window", None) or getattr(config, "is_causal", True) is False):
        yield
        return
    _register()
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
