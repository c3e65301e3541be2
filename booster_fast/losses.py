"""The causal-LM loss both implementations share, written so that it never syncs with the host.

A Booster pass needs the loss as `sum over labelled tokens / number of labelled tokens`, where the count may
span several micro-batches (gradient accumulation) or several processes. So the pieces are kept apart:
`label_count` gives the device-side count, `loss_sum` the summed token loss, and the caller divides by the
total, clamped to at least one token so that an all-masked batch gives 0 instead of NaN.

Packed batches (packing.py) carry `targets`, already shifted within each row, instead of `labels`; the same
functions take both forms.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .attention import packed_attention, unmasked_causal

IGNORE_INDEX = -100


def targets_of(batch: dict) -> torch.Tensor:
    """The label each position predicts: `labels` shifted by one (padded batches; the last position is dropped),
    or a packed batch's `targets` as they are."""
    return batch["targets"] if "targets" in batch else batch["labels"][:, 1:]


def label_count(batch: dict) -> torch.Tensor:
    """Number of tokens that carry a label after the causal shift (a device tensor, no sync)."""
    return (targets_of(batch) != IGNORE_INDEX).sum()


def attention_for(model, batch: dict):
    """The attention `batch` needs (attention.py): per segment for a packed batch, mask-free causal SDPA for one
    without a mask, else the model's own. Hold it across the backward too when the model recomputes its layers
    there (gradient checkpointing looks the attention up again)."""
    return packed_attention(model) if "cu_seqlens" in batch else unmasked_causal(model, batch)


def logits_of(model, batch: dict) -> torch.Tensor:
    """The model's logits, under `attention_for(batch)`; a packed batch's segments reach the attention through
    the forward's kwargs."""
    with attention_for(model, batch):
        if "cu_seqlens" not in batch:
            return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         use_cache=False).logits
        cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
        with kept_positions(model, batch["keep"]):
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest).logits


@contextlib.contextmanager
def kept_positions(model, keep: torch.Tensor):
    """Inside: the LM head sees only the positions `keep` lists (index_select: its backward is an index_add,
    which CUDA graphs capture; transformers' own `logits_to_keep` indexing backs into an accumulating
    index_put). The model's own logit processing (softcapping and the like) still applies."""
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].index_select(1, keep), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def token_losses(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-position cross entropy in fp32, zero where the label is ignored: [B, T-1] for a padded batch (the
    last position predicts nothing), [1, K] for a packed one (its kept, labelled positions)."""
    targets = targets_of(batch)
    flat = F.cross_entropy(logits[:, :targets.shape[1]].flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view_as(targets)


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed token loss of one batch (divide by the total label count for the mean)."""
    return token_losses(logits_of(model, batch), batch).sum()
