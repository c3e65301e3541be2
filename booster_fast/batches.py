"""Small helpers on batches: device transfer, micro-batch splitting, concatenation for the merged pass."""
from __future__ import annotations

import torch

KEYS = ("input_ids", "labels", "attention_mask")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in KEYS}


def micro_batches(batch, k: int) -> list[dict]:
    """A list of batches is taken as given; a single batch is cut into k equal micro-batches along dim 0."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if k == 1:
        return [batch]
    rows = batch["input_ids"].shape[0]
    if rows % k:
        raise ValueError(f"a batch of {rows} rows cannot be split into {k} equal micro-batches")
    return [dict(zip(batch, parts)) for parts in zip(*(v.chunk(k) for v in batch.values()))]


def rows(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def can_concat(a: dict, b: dict) -> bool:
    return a["input_ids"].shape[1] == b["input_ids"].shape[1]


def concat(a: dict, b: dict) -> dict:
    """Stack two batches of the same length row-wise; a missing attention mask becomes all ones."""
    out = {k: torch.cat([a[k], b[k]]) for k in ("input_ids", "labels")}
    if "attention_mask" in a or "attention_mask" in b:
        masks = [x.get("attention_mask", torch.ones_like(x["input_ids"])) for x in (a, b)]
        out["attention_mask"] = torch.cat(masks)
    return out
