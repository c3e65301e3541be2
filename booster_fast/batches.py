"""Small helpers on batches: device transfer, micro-batch splitting, concatenation for the merged pass."""
from __future__ import annotations

import logging

import torch

from .losses import IGNORE_INDEX

KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "keep", "targets", "cu_seqlens", "max_seqlen")
_warned_device_batch = False


def _warn_device_batch(device):
    global _warned_device_batch
    _warned_device_batch = True
    logging.getLogger("booster_fast").warning(
        "packing: a batch arrived already on %s; it runs padded (hand Booster.to_device the collated CPU batch to "
        "pack it)", device)


def to_device(batch: dict, device, drop_mask: bool = False, pack: bool = False, bucketed: bool = True,
              window: int | None = None) -> dict:
    """The model's keys of `batch` on `device`. CPU tensors bound for a GPU go through pinned memory, so the copy
    is truly asynchronous (a copy from pageable memory may wait for the stream's queued work).

    drop_mask: check on the host that the batch is right-padded, then leave the attention mask out. For a causal
    decoder that is exact: real tokens never attend to the pads after them and pads carry label -100. Without a
    mask, `losses.logits_of` runs the mask-free causal SDPA of attention.py: no mask building, no host read, the
    causal kernels.

    pack: send the pad-free form instead (packing.pack, which checks the padding itself) when it computes fewer
    positions than the padded batch; a batch with (almost) no pads goes without its mask instead. Packing needs
    the lengths on the host: a batch already on the device is sent padded (one log line says so, once).
    bucketed: round the packed lengths to buckets (for CUDA graphs; packing.pack).
    window: the model's sliding attention window; a batch whose packed segments could be longer goes padded."""
    if pack and batch["input_ids"].device.type != "cpu":
        if not _warned_device_batch:
            _warn_device_batch(batch["input_ids"].device)
        pack, drop_mask = False, True
    if pack:
        from .packing import pack as packed

        shrunk = packed(batch, bucketed=bucketed)
        fits = window is None or shrunk["max_seqlen"] <= window
        if fits and shrunk["input_ids"].numel() < batch["input_ids"].numel():
            batch, drop_mask = shrunk, False
        else:
            drop_mask = True
    if drop_mask:
        check_right_padded(batch, sync_ok=True)  # a host read for a batch already on the GPU: hand over CPU ones
        batch = without_mask(batch)
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
            if torch.is_tensor(v) else v for k, v in batch.items() if k in KEYS}


def check_batch(batch, what: str, device: torch.device | None, vocab: tuple[int, int] | None = None,
                any_int: bool = False) -> None:
    """ValueError (one line) for a batch a step cannot run: no input_ids or labels, no rows or no columns, labels
    of another shape, float or int32 ids and labels, another device than the model's (device None: any). Shapes,
    dtypes and devices only: nothing is read from the device. With `vocab` (sizes of the model's input embedding
    and LM head; Booster.to_device, before the batch moves), also the token ids of a CPU batch, which would fail
    deep inside the model. A packed batch (Booster.to_device made it) is taken as it is. any_int: ids and labels
    of any integer dtype (the HF Trainer's batches, which the model's embedding and loss take as they are)."""
    if isinstance(batch, (list, tuple)):  # micro-batches (packed, under gradient accumulation)
        for i, b in enumerate(batch):
            check_batch(b, f"{what}[{i}]", device, vocab, any_int)
        return
    if not isinstance(batch, dict):
        raise ValueError(f"{what}: a dict of tensors (input_ids, labels, attention_mask) expected, got "
                         f"{type(batch).__name__}")
    if "targets" in batch:
        return
    missing = [k for k in ("input_ids", "labels") if not torch.is_tensor(batch.get(k))]
    if missing:
        raise ValueError(f"{what} has no {' or '.join(missing)} tensor (labels: the token ids to learn, -100 where "
                         "none)")
    ids = batch["input_ids"]
    if ids.dim() != 2 or 0 in ids.shape:
        raise ValueError(f"{what}: input_ids of shape {tuple(ids.shape)}; [rows >= 1, length >= 1] expected")
    for key in ("labels", "attention_mask"):
        # labels cut to the response (a seq2seq collator's) would score the first positions against the answer
        if torch.is_tensor(batch.get(key)) and batch[key].shape != ids.shape:
            raise ValueError(f"{what}: {key} of shape {tuple(batch[key].shape)}, input_ids {tuple(ids.shape)}: one "
                             "per token expected (labels -100 on the prompt and padding, as a causal LM's collator "
                             "makes them)")
    for key in ("input_ids", "labels"):
        dtype = batch[key].dtype
        if (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool) if any_int else dtype != torch.long:
            raise ValueError(f"{what}: {key} are {dtype}, token ids are "
                             + ("integers" if any_int else "torch.long (int64)"))
    if device is not None and ids.device != torch.device(device):
        raise ValueError(f"{what} is on {ids.device}, the model on {device}: move it there "
                         "(Booster.to_device(batch, device) also prepares it as this engine runs best)")
    if vocab is not None and ids.device.type == "cpu":
        n_in, n_out = vocab
        outside = ids[(ids < 0) | (ids >= n_in)]
        if outside.numel():
            raise ValueError(f"{what}: input_ids hold {int(outside[0])}, outside the model's {n_in} token "
                             "embeddings (a token added to the tokenizer without resizing the model's embeddings?)")
        labels = batch["labels"]
        outside = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_out))]
        if outside.numel():
            raise ValueError(f"{what}: labels hold {int(outside[0])}; a label is a token id below {n_out} (the "
                             f"LM head's outputs), or {IGNORE_INDEX} where no token is learnt")


def trim_to_longest(batch: dict) -> dict:
    """A CPU batch without its trailing pad columns: padded to its longest row, as the original trainer's collator
    (torch's pad_sequence) pads its batches. Exact: the columns dropped hold no real token and no label. A batch
    without a mask, or already on a device (trimming reads it), is returned as it is."""
    mask = batch.get("attention_mask")
    if mask is None or mask.device.type != "cpu" or mask.dim() != 2:
        return batch
    width = mask.shape[1]
    used = (mask != 0) | (batch["labels"] != IGNORE_INDEX) if "labels" in batch else mask != 0
    columns = used.any(0).nonzero()
    keep = int(columns[-1]) + 1 if columns.numel() else 1
    if keep == width:
        return batch
    return {k: v[:, :keep] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == width else v
            for k, v in batch.items()}


def without_mask(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def left_padded(mask: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool device tensor: some row of `mask` has a real token after a pad (not right-padded)."""
    return (mask[:, 1:] > mask[:, :-1]).any()


def labelled_pads(batch: dict) -> torch.Tensor:
    """A 0-dim bool device tensor: some pad position (attention mask 0) carries a label other than -100."""
    mask = batch["attention_mask"]
    if "labels" not in batch:
        return torch.zeros((), dtype=torch.bool, device=mask.device)
    return ((batch["labels"] != IGNORE_INDEX) & (mask == 0)).any()


def check_right_padded(batch: dict, sync_ok: bool = False):
    """Raise ValueError unless every attention-mask row is ones then zeros and no pad position carries a label
    (as packing.pack requires): what makes leaving the mask out exact. A CUDA mask is checked only when
    `sync_ok`: the check reads two flags back to the host, which the hot path must not do."""
    mask = batch.get("attention_mask")
    if mask is None or (mask.is_cuda and not sync_ok):
        return
    left, labelled = torch.stack([left_padded(mask), labelled_pads(batch)]).tolist()  # one host read
    if left:
        raise ValueError("the fast step needs right-padded batches (attention_mask rows of ones, then zeros): "
                         "it leaves the mask out, which is exact only with right padding")
    if labelled:
        raise ValueError("a pad position carries a label: pads must have label -100 (the fast step leaves the "
                         "mask out, which is exact only when no loss is taken on a pad)")


def micro_batches(batch, k: int) -> list[dict]:
    """A list of batches is taken as given; a single batch is cut into k equal micro-batches along dim 0."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if k == 1:
        return [batch]
    if "cu_seqlens" in batch:
        raise ValueError("a packed batch cannot be cut into micro-batches: pack each micro-batch on its own")
    rows = batch["input_ids"].shape[0]
    if rows % k:
        raise ValueError(f"a batch of {rows} rows cannot be split into {k} equal micro-batches")
    batch = {key: v for key, v in batch.items() if torch.is_tensor(v)}  # a collator's extra keys: not the model's
    return [dict(zip(batch, parts)) for parts in zip(*(v.chunk(k) for v in batch.values()))]


def tokens(batch: dict) -> int:
    """Positions the model computes for this batch (rows x length; pads included, a packed batch's filler too)."""
    return batch["input_ids"].numel()


def can_concat(a: dict, b: dict) -> bool:
    if ("cu_seqlens" in a) != ("cu_seqlens" in b):
        return False
    return "cu_seqlens" in a or a["input_ids"].shape[1] == b["input_ids"].shape[1]


def concat(a: dict, b: dict) -> dict:
    """Stack two batches of the same length row-wise (a missing attention mask becomes all ones), or join two
    packed batches end to end."""
    if "cu_seqlens" in a:
        from .packing import concat_packed

        return concat_packed(a, b)
    out = {k: torch.cat([a[k], b[k]]) for k in ("input_ids", "labels")}
    if "attention_mask" in a or "attention_mask" in b:
        masks = [x.get("attention_mask", torch.ones_like(x["input_ids"])) for x in (a, b)]
        out["attention_mask"] = torch.cat(masks)
    return out
