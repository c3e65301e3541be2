"""The causal-LM loss both implementations share, written so that it never syncs with the host.

A Booster pass needs the loss as `sum over labelled tokens / number of labelled tokens`, where the count may
span several micro-batches (gradient accumulation) or several processes. So the pieces are kept apart:
`label_count` gives the device-side count, `loss_sum` the summed token loss, and the caller divides by the
total, clamped to at least one token so that an all-masked batch gives 0 instead of NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import unmasked_causal

IGNORE_INDEX = -100


def label_count(batch: dict) -> torch.Tensor:
    """Number of tokens that carry a label after the causal shift (a device tensor, no sync)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def logits_of(model, batch: dict) -> torch.Tensor:
    """The model's logits; a batch without an attention mask runs the mask-free causal attention (attention.py)."""
    with unmasked_causal(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [B, T-1] in fp32, zero where the label is ignored."""
    shifted = labels[:, 1:]
    flat = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view_as(shifted)


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed token loss of one batch (divide by the total label count for the mean)."""
    return token_losses(logits_of(model, batch), batch["labels"]).sum()


def mean_loss(model, batch: dict) -> torch.Tensor:
    """Token-mean loss of one batch; 0 (not NaN) when no token is labelled."""
    return loss_sum(model, batch) / label_count(batch).clamp(min=1)
