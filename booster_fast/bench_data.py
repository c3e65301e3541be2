"""The bench's batches: the same rows for every entry, generated once, in the form each entry's engine runs.

`tiny` takes the built-in data set exactly as `align` streams it. Any other model gets random right-padded token
batches whose rows vary in length but whose total of real tokens does not (`row_lengths`): a packed entry then
meets one packed length, so one CUDA graph, in every step, as a padded entry does. `--data` gives any model a
data set instead (builtin, beavertails, a local file), streamed as `align` streams it: its rows' own lengths, so
what packing saves on that data, and a few packed lengths (one graph each) where the random rows give one.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .align import build_streams, load_data

RANDOM = "random"  # --data's name for the random rows
RANDOM_ROWS = "random tokens, right-padded, rows 60-100% real, each batch 80% real in total"


def data_source(args) -> str:
    """What the bench's rows are: --data, else the built-in set for tiny and random rows for any other model."""
    return getattr(args, "data", None) or ("builtin" if args.model == "tiny" else RANDOM)


def data_description(args) -> str:
    """The document's `config.data`: the random rows described, or the data set (and --harmful-data) named."""
    source = data_source(args)
    harmful = getattr(args, "harmful_data", None)
    return RANDOM_ROWS if source == RANDOM else source + (f" (harmful: {harmful})" if harmful else "")


def _as_align_args(args) -> SimpleNamespace:
    """align's view of the bench's flags: its data set, every row of it (no --align-samples here)."""
    return SimpleNamespace(**{**vars(args), "data": data_source(args), "harmful_data": getattr(args, "harmful_data", None),
                              "align_samples": None, "harmful_samples": None})


def load_rows(args):
    """The data set's (alignment, harmful) rows, parsed before any model is loaded, so that bad data fails first;
    None for the random rows."""
    return None if data_source(args) == RANDOM else load_data(_as_align_args(args))


def entry_batches(booster, pairs, device) -> list[tuple]:
    """The (align, harmful) device batches of one entry, in the form its engine runs (`Booster.to_device`): for fast
    engines without the mask, or packed; for the reference and sft with the mask and padded to the longest row,
    as the original trainer's collator pads them."""
    return [(booster.to_device(a, device), booster.to_device(h, device)) for a, h, _, _ in pairs]


MIN_RANDOM_LENGTH = 8  # the random rows' shortest --max-length: a prompt and a labelled answer, 60-100% of it


def row_lengths(rows: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Real lengths of `rows` rows: each 60-100% of `length`, together exactly 80% of rows x length. Rows vary,
    the total does not, so a packed entry meets one packed length (one CUDA graph) in every step, as padded ones
    do: the timing is the steady state of a run, after each length it meets has been captured."""
    low = max(2, int(0.6 * length))
    n = torch.randint(low, length + 1, (rows,), generator=g)
    target = max(low * rows, min(length * rows, round(0.8 * rows * length)))
    while (diff := target - int(n.sum())) != 0:  # move the total to the target, a row at a time, within bounds
        i = int(torch.randint(rows, (1,), generator=g))
        n[i] = min(length, max(low, int(n[i]) + diff))
    return n


def random_batch(rows: int, length: int, vocab: int, pad_id: int, g: torch.Generator) -> dict:
    """Right-padded random tokens (row lengths from `row_lengths`: 80% real), the first half of a row a prompt."""
    n = row_lengths(rows, length, g)[:, None]
    pos = torch.arange(length).expand(rows, length)
    real = pos < n
    ids = torch.randint(0, vocab, (rows, length), generator=g).masked_fill(~real, pad_id)
    labels = ids.masked_fill(~real | (pos < n // 2), -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": real.long()}


def make_batches(args, tok, model, rows=None) -> list[tuple[dict, dict, int, int]]:
    """warmup + steps + 2 (memory and op-count passes) of (align, harmful, align tokens, harmful tokens), on the
    CPU. A data set (data_source; `rows`, load_rows' parse of it, if at hand) exactly as `align` streams it;
    the random rows: random token batches."""
    from .batches import check_right_padded

    n = args.warmup + args.steps + 2
    if data_source(args) != RANDOM:
        sa, sh, _ = build_streams(_as_align_args(args), tok, 0, 1, data=rows)
        pairs = [(next(sa), next(sh)) for _ in range(n)]
    else:
        g = torch.Generator().manual_seed(args.seed)
        vocab, pad = model.config.vocab_size, tok.pad_token_id if tok.pad_token_id is not None else 0
        pairs = [tuple(random_batch(b, args.max_length, vocab, pad, g)
                       for b in (args.batch_size, args.harmful_batch_size)) for _ in range(n)]
    for a, h in pairs:
        check_right_padded(a), check_right_padded(h)
    return [(a, h, int(a["attention_mask"].sum()), int(h["attention_mask"].sum())) for a, h in pairs]
