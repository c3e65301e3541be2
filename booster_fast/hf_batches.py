"""How BoosterTrainer's batches reach the engine: the keys it feeds the model (a batch it would train wrongly is
refused), an update's micro-batches packed or stripped of their masks where that is exact, the harmful loader's
own shuffle, a collator that pads rows to one fixed length, and the check for a data set without any label."""
from __future__ import annotations

import torch

from .batches import check_batch, labelled_pads, left_padded, to_device, without_mask
from .config import is_integer
from .losses import IGNORE_INDEX

MODEL_KEYS = ("input_ids", "labels", "attention_mask")
# keys a collator may add that the model's forward would use: the engine feeds the model its own keys only, so a
# batch that carries one (DataCollatorWithFlattening's position_ids, say) would be trained on something else
FOREIGN_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
                "inputs_embeds")


def _plain_positions(pos) -> bool:
    """position_ids that say nothing the engine does not assume: 0, 1, 2, ... in every row."""
    return pos.dim() == 2 and bool((pos == torch.arange(pos.shape[1], device=pos.device)).all())  # a host read


def model_batch(inputs, which: str = "training") -> dict:
    """The batch as the engine takes it (MODEL_KEYS); a ValueError for one it would train wrongly."""
    foreign = [k for k in FOREIGN_KEYS if k in inputs
               and not (k == "position_ids" and _plain_positions(inputs[k]))]
    if foreign:
        raise ValueError(f"BoosterTrainer: the {which} batches carry {', '.join(foreign)}, which the Booster step does "
                         "not feed the model; use a collator that pads rows (input_ids, attention_mask, labels), "
                         "not one that flattens them")
    if inputs.get("labels") is None or inputs.get("input_ids") is None:  # a collator may set labels to None
        raise ValueError(f"BoosterTrainer: the {which} batches need input_ids and labels (label -100 on prompt and "
                         f"padding); they have {', '.join(sorted(inputs))}")
    batch = {k: inputs[k] for k in MODEL_KEYS if inputs.get(k) is not None}
    check_batch(batch, f"BoosterTrainer: the {which} batches", None, any_int=True)  # shapes and dtypes: no read
    return batch


def packed_if_exact(groups, device, window):
    """The micro-batches packed without pads (or without their masks, where packing would not shrink them), as
    `Booster.to_device` prepares them, when every one is right-padded with unlabelled pads; else unchanged. The
    micro-batches are copied to the host for that: one host read per update."""
    host = [[{k: v.cpu() for k, v in b.items()} for b in g] for g in groups]  # a host sync, once per update
    try:
        return tuple([to_device(b, device, pack=True, bucketed=False, window=window) for b in g]  # eager: exact sizes
                     for g in host)
    except ValueError:  # packing.pack refused one (left padding, a labelled pad): not exact, keep the masks
        return groups


def without_masks_if_right_padded(*groups):
    """The micro-batches without their attention masks when every mask is right-padded and no pad carries a
    label (as Booster.to_device prepares batches for the fast engine: exact for a causal decoder, and the forward
    then builds no mask and reads nothing back), else unchanged. One host read per update decides, instead of
    transformers' reads in every forward."""
    masked = [b for g in groups for b in g if b.get("attention_mask") is not None]
    if masked:
        flags = [f for b in masked for f in (left_padded(b["attention_mask"]), labelled_pads(b))]
        if bool(torch.stack(flags).any()):  # a host sync, once per update
            return groups
    return tuple([without_mask(b) for b in g] for g in groups)


class EpochShuffle(torch.utils.data.Sampler):
    """A new random order of range(n) on each pass, drawn from `seed + pass`: the same on every process (accelerate
    shards its batches), independent of the train loader's, and positionable for a resume (`passes`)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.passes = n, seed, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


class FixedLengthCollator:
    """Right-pads rows of `input_ids`/`labels` to exactly `max_length` (labels −100, attention mask 0 on pads):
    one static shape for the whole run, as `booster_fast.data.collate` does for `Booster`."""

    def __init__(self, pad_id: int, max_length: int):
        if not is_integer(pad_id) or pad_id < 0:
            hint = ("; a tokenizer without a pad token gives None: set tokenizer.pad_token first, e.g. "
                    "tokenizer.pad_token = tokenizer.eos_token" if pad_id is None else "")
            raise ValueError(f"FixedLengthCollator: pad_id must be an integer >= 0 (the tokenizer's pad_token_id), "
                             f"got {pad_id!r}{hint}")
        if not is_integer(max_length) or max_length < 1:
            raise ValueError(f"FixedLengthCollator: max_length must be an integer >= 1, got {max_length!r}")
        self.pad_id, self.max_length = int(pad_id), int(max_length)

    def __call__(self, rows):
        from .data import collate

        return collate([self._row(i, r) for i, r in enumerate(rows)], self.max_length, self.pad_id)

    @staticmethod
    def _row(i: int, row) -> dict:
        """One row's input_ids and labels as lists of ints; ValueError naming the row and field otherwise."""
        out = {}
        for key in ("input_ids", "labels"):
            value = row.get(key) if hasattr(row, "get") else None
            if value is None:
                raise ValueError(f"FixedLengthCollator: row {i} has no {key} (token ids; labels -100 where no token "
                                 "is learnt)")
            ids = value.tolist() if hasattr(value, "tolist") else list(value)  # a tensor or array: its values
            if not (isinstance(ids, list) and all(is_integer(x) for x in ids)):
                raise ValueError(f"FixedLengthCollator: row {i}'s {key} must be a flat list of integer token ids, "
                                 f"got {str(value)[:60]}")
            out[key] = ids
        return out


def labels_all_ignored(dataset) -> bool:
    """True where every row of a list or datasets.Dataset has only -100 labels (a read of its labels; other
    datasets are not read here)."""
    if isinstance(dataset, list):
        labels = [row.get("labels") if hasattr(row, "get") else None for row in dataset]
    elif "labels" in (getattr(dataset, "column_names", None) or ()):
        labels = dataset["labels"]
    else:
        return False
    if not labels or any(x is None for x in labels):
        return False  # (a row without labels is model_batch's error, with its own message)
    flat = (x for row in labels for x in (row.tolist() if hasattr(row, "tolist") else row))
    return all(x == IGNORE_INDEX for x in flat)
