"""Pad-free batches: the real tokens of every row back to back, so the passes compute no pad positions.

A right-padded batch of B rows x L tokens spends B*L positions on every matmul of the model, whatever share of
them are pads: L is the longest row when the batch is padded as the original trainer pads it, max_length when
CUDA graphs need one shape (about 20% pads in the bench's random batches).
`pack` lays the real tokens of all rows end to end in one row of P positions instead:

    input_ids     [1, P]   row 0's tokens, row 1's tokens, ..., then a filler segment
    position_ids  [1, P]   0..n_i-1 within each row (RoPE sees the positions the padded batch had)
    keep          [K]      the positions that carry a label (then copies of the last position, to the bucket): the
                           LM head and the loss run on these only, not on prompts, row ends and filler
    targets       [1, K]   the next-token label of each kept position, shifted within its row (-100 on the
                           copies), so the loss needs no shift and never crosses rows
    cu_seqlens    [B+F+1]  int32 segment starts: 0, n_0, n_0+n_1, ..., T, ..., P (the filler: F segments of its own,
                           F fixed per batch shape, each at most L long)
    max_seqlen    int      L: no segment is longer than a row

Attention runs per segment (attention.py: flash's variable-length kernel on CUDA, else an exact scatter into
[segments, max_seqlen] and causal SDPA), so tokens never see another row: every logit, loss and gradient is the
padded batch's, up to floating-point summation order.

Buckets. CUDA graphs need static shapes, so P is the real-token count rounded up to a multiple of 1/BUCKETS of
the padded size (and of 64, for tensor-core tiles): a batch keeps at most ~1/BUCKETS of its padded positions as
filler, and a run meets only a handful of distinct P (one graph each). A batch without pads packs to its padded
size rounded up to the bucket step; empty filler segments (like empty rows) attend to nothing. K is bucketed the same
way, capped at P. Without graphs (`bucketed=False`: the CPU, or graphs off) nothing is rounded: P is the real
tokens, K the labelled ones, and max_seqlen the longest row, which is what the exact grid attention pays for.

Packing happens on the host, from the CPU batch (`Booster.to_device` for the fast engine): the lengths are
known there for free, where on the device they would cost a host sync per step.
"""
from __future__ import annotations

import torch

from .batches import left_padded
from .losses import IGNORE_INDEX

# 32 buckets. Measured on the built-in data at 10+10 rows x 256 tokens over 500 steps (benchmarks/bucket_sizes.py,
# results/bucket_sizes.json): 16 buckets (a step of 192 positions, after the rounding to tiles) left filler worth
# 13.8% of the real tokens and 4 distinct graph keys; 32 (a step of 128) 5.1% and 11 keys; 64 (64) 3.3% and 18.
# A new key costs two eager steps and a capture once; the filler costs compute every step, while more keys than
# graphs.MAX_GRAPHS would cost recaptures.
BUCKETS = 32
TILE = 64


def bucket_size(rows: int, length: int) -> int:
    """The step between packed lengths for batches of rows x length: 1/BUCKETS of the padded size, in TILEs."""
    return -(-rows * length // (BUCKETS * TILE)) * TILE


def pack(batch: dict, bucketed: bool = True) -> dict:
    """The pad-free form of a right-padded CPU batch (see the module docstring); `bucketed`: P and K rounded up to
    the buckets and max_seqlen the row length, for CUDA graphs. Raises ValueError for a batch it cannot pack
    exactly: left padding, or a label on a pad position."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.device.type != "cpu":
        raise ValueError("pack() takes the batch on the CPU, before it moves to the device")
    rows, length = ids.shape
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if mask is not None and bool(left_padded(mask)):
        raise ValueError("packing needs right-padded batches (attention_mask rows of ones, then zeros)")
    if bool(((labels != IGNORE_INDEX) & ~real).any()):
        raise ValueError("a pad position carries a label: pads must have label -100")
    lengths = real.sum(1)
    total = int(lengths.sum())
    step = bucket_size(rows, length) if bucketed else 1
    size = max(-(-total // step) * step, step)  # an all-pad batch packs to one step of filler (a token unbucketed)
    fill = size - total
    # the filler as segments of at most `length` tokens (a fixed number of them per batch shape), so that no
    # segment is longer than a row and max_seqlen stays the row length
    chunks = -(-step // length)
    fill_lengths = (fill - torch.arange(chunks) * length).clamp(0, length)

    # the label of position j is labels[j + 1] of the same row; a row's last real token gets the -100 of the pad
    # after it (or of the column appended here, for a full row)
    shifted = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], 1)
    positions = torch.arange(length).expand(rows, length)
    cu = torch.zeros(rows + chunks + 1, dtype=torch.int32)
    cu[1:] = torch.cat([lengths, fill_lengths]).cumsum(0)
    fill_positions = torch.cat([torch.arange(int(n)) for n in fill_lengths])
    targets = shifted[real]
    labelled = (targets != IGNORE_INDEX).nonzero().flatten()
    kept = min(max(-(-labelled.numel() // step) * step, step), size)
    keep = torch.cat([labelled, labelled.new_full((kept - labelled.numel(),), size - 1)])
    return {
        "input_ids": torch.cat([ids[real], ids.new_zeros(fill)])[None],
        "position_ids": torch.cat([positions[real], fill_positions])[None],
        "keep": keep,
        "targets": torch.cat([targets[labelled], labels.new_full((kept - labelled.numel(),), IGNORE_INDEX)])[None],
        "cu_seqlens": cu,
        "max_seqlen": length if bucketed else max(int(lengths.max()), fill, 1),
    }


def concat_packed(a: dict, b: dict) -> dict:
    """Two packed batches as one (a's segments first): the merged pass over [harmful ; alignment]."""
    out = {k: torch.cat([a[k], b[k]], 1) for k in ("input_ids", "position_ids", "targets")}
    out["keep"] = torch.cat([a["keep"], b["keep"] + a["input_ids"].shape[1]])
    out["cu_seqlens"] = torch.cat([a["cu_seqlens"], b["cu_seqlens"][1:] + a["input_ids"].shape[1]])
    out["max_seqlen"] = max(a["max_seqlen"], b["max_seqlen"])
    return out
