"""The data layer: Alpaca prompts, label masking, fixed-shape batches, and loaders that fail in one line.

Every example becomes `prompt + response + eos` with the prompt in the Alpaca template the paper uses; prompt
positions get label -100, so the loss is on the response and its EOS only. As in the original, the prompt and
the response are tokenized together and the first len(tokenize(prompt)) positions are the prompt's (no special
tokens; a BOS is prepended only when the tokenizer itself adds one by default, as Llama's does and the tiny
tokenizer does not). Tokenized apart, the response would differ wherever the tokenizer marks the start of a
text: Llama-2's SentencePiece would start every answer with a space-prefixed token ("▁positive") that the
prompt-then-answer text of training and generation never has. The prompt ends in a newline, which no tokenizer
of these models merges with the next word, so the boundary is the same either way. Batches are right-padded to
exactly `max_length`: one static shape for the whole run, which CUDA graphs need (graphs.py), and with right
padding under a causal mask the pads never influence a real token.

`BatchStream` replaces a DataLoader: an infinite iterator of shuffled epochs whose order depends only on
(seed, epoch), so a run resumes exactly from `state_dict()`, and n ranks with batch b see exactly the rows of
one process with batch n·b (rank r takes the r-th contiguous slice of each global batch).

Loaders accept "builtin" (the generated corpus, works offline), the Hugging Face data sets of the paper
(which fail offline with a `DataError` that names what to download), or a local .json/.jsonl file (read by
data_files.py). Bad input raises `DataError` with a one-line message; the CLI prints it and exits 2.
"""
from __future__ import annotations

import hashlib
import os

import torch

from booster_fast.config import is_integer
from booster_fast.corpus import attack_corpus, builtin_corpus
# (DataError, Example, clean_refusal and load_harmful_file are imported from here too, as before data_files.py)
from booster_fast.data_files import (DataError, Example, clean_refusal, instruction_file, instructions,  # noqa: F401
                                     load_harmful_file, pairs, read_rows, row_format)
from booster_fast.errors import described

IGNORE_INDEX = -100
# How examples become tokens, recorded in an align run's run_config.json ("encoding"): a resume refuses a run
# whose tokens were made otherwise. Runs recorded without it come from before the record; the older of those
# tokenized the response apart (see above).
ENCODING = "joint"

# The Alpaca template, verbatim (the original's utils.PROMPT_DICT).
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_TAIL = "\n\n### Response:\n"   # kept when an over-long prompt is cut

# Benign tasks, worded as in the original's evaluation scripts.
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories:\n\n"
                      "World\nSports\nBusiness\nSci/Tech\n")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
ANSWER_PROMPT = "The final answer is: "
EVAL_ROWS = 1000        # AGNEWS / GSM8K test: the first 1000 rows, as in the paper

# BeaverTails refusal pairs (RepNoise's beavertails_with_refusals_train.json; fields prompt, response,
# refusal = "Question: ...\nAnswer: ...", category, is_safe). The original Booster aligns on rows 5000..9999
# (its `5000 < index < 10000`: 4999 rows) for BOTH sets, so refusal and harmful answer share their prompts;
# rows below 5000 feed its fine-tuning attack. We take [5000, 10000) for train and the next 500 for test.
# The attack split: the original's attack (poison_data_start=0) takes the rows with `0 < index < poison_num`,
# i.e. rows 1 .. poison_num-1 in file order (one row fewer than int(p * samples): 99 at p = 0.1 of 1000), never
# row 0. Ours is every row that condition can reach below the alignment rows, [1, 5000); the attack takes its
# floor(p * samples) rows from its start (rows 1..100 at p = 0.1: the original's and one more; `attack --rows
# sample` draws them with its seed instead).
BEAVERTAILS_REPO = "anonymous4486/booster_dataset"
# the data sets named by a word that the hub holds: align's --data, attack's --benign, eval's --task
HUB_DATA_SETS = {"beavertails": BEAVERTAILS_REPO, "sst2": "stanfordnlp/sst2", "agnews": "fancyzhx/ag_news",
                 "gsm8k": "openai/gsm8k"}
DATA_SET_NAMES = frozenset({"builtin", *HUB_DATA_SETS})  # what a data flag takes as a name, never as a path
BEAVERTAILS_MIRROR = "anonymous4486/repnoise_beavertail"
BEAVERTAILS_ROWS = {"train": (5000, 10000), "test": (10000, 10500), "attack": (1, 5000)}
SPLITS = ("train", "test")
SAFETY_SPLITS = SPLITS + ("attack",)   # the safety data also has rows kept apart for the attack stage


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002  (Alpaca's field name)
    """The Alpaca prompt, ending in "### Response:\\n"; the input variant only when `input` is non-empty."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ------------------------------------------------------------------------------------------------
# tokenization
# ------------------------------------------------------------------------------------------------
def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def default_prefix(tokenizer) -> list[int]:
    """[bos] if the tokenizer prepends BOS by default (Llama, Gemma), else [] (the tiny tokenizer, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def check_max_length(tokenizer, max_length: int, prefix: list[int] | None = None) -> int:
    """Raise DataError unless the bare template (empty instruction) plus one response token fits.

    Returns the length of the bare template in tokens (BOS included when the tokenizer adds one).
    """
    if prefix is None:
        prefix = default_prefix(tokenizer)
    template = len(prefix) + len(_ids(tokenizer, [format_prompt("")])[0])
    if not is_integer(max_length) or max_length < template + 1:
        raise DataError(f"max_length={max_length} is too short for the prompt template: the template alone "
                        f"takes {template} tokens, so max_length must be at least {template + 1}")
    return template


def _assemble(prompt: list[int], response: list[int], eos: int, max_length: int, template_len, tail: list[int]):
    """Fit prompt + response + eos into max_length; returns (prompt, response, truncated).

    Over-long: cut the response first (the EOS goes with it: a cut answer is not a finished one), keeping at
    least one response token. If the prompt alone leaves no room, cut the prompt body and re-attach the
    "### Response:" tail so the example still ends like a prompt; the response then keeps up to a quarter
    of max_length. `template_len()` is called only on that rare path (it raises when even the bare template
    does not fit).
    """
    response = response + [eos]
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    if len(prompt) < max_length:
        return prompt, response[: max_length - len(prompt)], True
    skeleton = template_len()
    keep = max(1, min(len(response), max_length // 4, max_length - skeleton))
    head = max(0, max_length - keep - len(tail))
    return prompt[:head] + tail, response[:keep], True


def _encode_batch(tokenizer, examples, max_length: int, prefix: list[int]) -> tuple[list[dict], int]:
    if not is_integer(max_length) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    max_length = int(max_length)
    bad = next((i for i, ex in enumerate(examples) if not isinstance(ex, Example)), None)
    if bad is not None:
        raise DataError(f"example {bad} is a {type(examples[bad]).__name__} ({examples[bad]!r:.60}), not a "
                        f"booster_fast.data.Example(instruction, input, output); a dict row becomes Example(**row)")
    eos = tokenizer.eos_token_id
    if eos is None:
        src = getattr(tokenizer, "name_or_path", "")  # a model directory's or hub id's tokenizer: name it
        raise DataError(f"the tokenizer{f' in {src}' if src else ''} has no eos_token (a saved one names it in its "
                        "tokenizer_config.json); set one before encoding")
    texts = [format_prompt(ex.instruction, ex.input) for ex in examples]
    prompts = _ids(tokenizer, texts)
    joint = _ids(tokenizer, [t + ex.output for t, ex in zip(texts, examples)])
    # the prompt's positions are its own token count, as the original masks them
    prompts, responses = [j[:len(p)] for p, j in zip(prompts, joint)], [j[len(p):] for p, j in zip(prompts, joint)]
    tail = _ids(tokenizer, [RESPONSE_TAIL])[0]
    cache: list[int] = []

    def template_len() -> int:
        if not cache:
            cache.append(check_max_length(tokenizer, max_length, prefix))
        return cache[0]

    rows, n_truncated = [], 0
    for p, r in zip(prompts, responses):
        p, r, truncated = _assemble(prefix + p, r, eos, max_length, template_len, tail)
        rows.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r, "truncated": truncated})
        n_truncated += truncated
    return rows, n_truncated


def encode_example(tokenizer, ex: Example, max_length: int, *, add_bos: bool | None = None) -> dict:
    """{"input_ids", "labels" (-100 on the prompt), "truncated"} for one example, at most max_length long.

    add_bos: None follows the tokenizer's default (see `default_prefix`); True/False forces it.
    """
    prefix = _prefix(tokenizer, add_bos)
    return _encode_batch(tokenizer, [ex], max_length, prefix)[0][0]


def encode_all(tokenizer, examples: list[Example], max_length: int, *,
               add_bos: bool | None = None) -> tuple[list[dict], int]:
    """encode_example over a list (tokenized in two batched calls: the prompts, and prompt + response); returns
    (rows, number truncated)."""
    return _encode_batch(tokenizer, list(examples), max_length, _prefix(tokenizer, add_bos))


def _prefix(tokenizer, add_bos: bool | None) -> list[int]:
    if add_bos is not None and not isinstance(add_bos, bool):  # the string "False" would read as true
        raise DataError(f"add_bos must be True, False or None, got {add_bos!r}")
    if add_bos is None:
        return default_prefix(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise DataError("add_bos=True but the tokenizer has no bos_token")
    return [tokenizer.bos_token_id] if add_bos else []


def collate(encoded: list[dict], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to exactly [B, max_length]: input_ids (pad_id), labels (-100), attention_mask (1 on real tokens)."""
    if not encoded:
        raise DataError("cannot collate an empty batch")
    ids, labels, mask = [], [], []
    for i, row in enumerate(encoded):
        n = len(row["input_ids"])
        if n > max_length or len(row["labels"]) != n:
            raise DataError(f"batch row {i} has {n} tokens and {len(row['labels'])} labels; "
                            f"expected equal lengths of at most max_length={max_length}")
        pad = max_length - n
        ids.append(list(row["input_ids"]) + [pad_id] * pad)
        labels.append(list(row["labels"]) + [IGNORE_INDEX] * pad)
        mask.append([1] * n + [0] * pad)
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"booster_fast.BatchStream:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_batch_memory(batch_size: int, max_length: int, encoded: list[dict], share: float = 0.25) -> None:
    """DataError where one collated batch ([batch_size, max_length], three int64 tensors) would take more than
    `share` of this machine's memory: every batch is padded to max_length (one shape for CUDA graphs, and the
    merged pass concatenates the two batches), so a max_length far beyond the rows only exhausts memory. The
    message names the longest of the `encoded` rows."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    need = 3 * 8 * batch_size * max_length
    if need > share * memory:
        raise DataError(f"max_length {max_length} (--max-length) pads each batch of {batch_size} rows to "
                        f"{need / 2**30:.1f} GiB, more than {share:.0%} of this machine's {memory / 2**30:.0f} GiB; "
                        f"the longest row here has {max((len(r['input_ids']) for r in encoded), default=0)} tokens")


class BatchStream:
    """Infinite shuffled epochs of collated batches; exact resume; rank shards of one global batch.

    Epoch e is `torch.randperm(N)` under a generator seeded from (seed, e) — independent of batch size,
    rank and world size. Global batch i of an epoch is rows perm[i·G : (i+1)·G] with G = batch_size·world_size;
    rank r yields its slice [r·batch_size, (r+1)·batch_size). The incomplete last global batch is dropped.
    """

    def __init__(self, encoded: list[dict], batch_size: int, max_length: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        given = {"batch_size": batch_size, "max_length": max_length, "pad_id": pad_id, "seed": seed, "rank": rank,
                 "world_size": world_size}
        for key, value in given.items():
            if not is_integer(value):  # 2.0 failed in the first next(), True meant 1, seed 0.0 was not seed 0
                raise DataError(f"BatchStream: {key} must be an integer, got {value!r}")
        batch_size, max_length, pad_id, seed = int(batch_size), int(max_length), int(pad_id), int(seed)
        rank, world_size = int(rank), int(world_size)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; "
                            f"got batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if max_length < 1 or pad_id < 0:
            raise DataError(f"BatchStream: need max_length >= 1 and pad_id >= 0; got max_length={max_length}, "
                            f"pad_id={pad_id}")
        if batch_size * world_size > len(encoded):
            raise DataError(f"batch larger than the data set: batch_size*world_size = {batch_size}*{world_size} "
                            f"= {batch_size * world_size} > {len(encoded)} rows")
        check_batch_memory(batch_size, max_length, encoded)
        self.encoded, self.batch_size, self.max_length, self.pad_id = encoded, batch_size, max_length, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(encoded) // self.global_batch
        self.epoch, self.position = 0, 0
        self._perm: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self.encoded), generator=g).tolist())
        return self._perm[1]

    def __iter__(self):
        return self

    def next_indices(self) -> list[int]:
        """This rank's row indices for the next batch (advances the stream)."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.rank * self.batch_size
        self.position += 1
        return self.permutation(self.epoch)[start: start + self.batch_size]

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self.encoded[i] for i in self.next_indices()], self.max_length, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": len(self.encoded), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_rows", len(self.encoded)), ("global_batch", self.global_batch)):
            if key in state and state[key] != mine:
                raise DataError(f"cannot resume the batch stream: saved {key}={state[key]} but this run has {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ------------------------------------------------------------------------------------------------
# Hugging Face hub
# ------------------------------------------------------------------------------------------------
def load_hub(repo: str, name: str | None, split: str, hint: str = ""):
    """datasets.load_dataset, or a one-line DataError naming what to download (offline, no cache, hub errors)."""
    from .models import hub_reachable, quiet_hub

    try:
        import datasets
        import datasets.config

        before = datasets.config.HF_HUB_OFFLINE
        # the hub out of reach: the cache only, at once (datasets would retry each request with back-off)
        datasets.config.HF_HUB_OFFLINE = before or not hub_reachable()
        try:
            with quiet_hub():  # its retry lines: the failure is reported once, below
                return datasets.load_dataset(repo, name, split=split)
        finally:
            datasets.config.HF_HUB_OFFLINE = before
    except Exception as e:  # ConnectionError offline, DatasetNotFoundError, FileNotFoundError, hub HTTP errors
        cfg = f", '{name}'" if name else ""
        raise DataError(_one_line(
            f"cannot load the Hugging Face data set {repo}{f' ({name})' if name else ''} split {split!r} "
            f"({described(e, 160)}); no network or cached copy here: on a machine with network run "
            f"`python -c \"import datasets; datasets.load_dataset('{repo}'{cfg})\"` and copy ~/.cache/huggingface "
            f"here{hint}")) from None


def _check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> None:
    if split not in allowed:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")


def _examples(rows: list[dict]) -> list[Example]:
    return [Example(r["instruction"], r["input"], r["output"]) for r in rows]


def load_safety_data(data: str, split: str = "train", harmful_data: str | None = None,
                     need_harmful: bool = True) -> tuple[list[Example], list[Example]]:
    """(alignment examples: harmful prompt -> refusal, harmful examples: harmful prompt -> harmful answer).

    data: "builtin" (generated corpus, 2000 train / 200 test pairs over shared prompts), "beavertails" (the
    paper's RepNoise refusal pairs from the hub; rows BEAVERTAILS_ROWS[split]), or a .json/.jsonl path whose
    rows are either prompt/refusal/response (both sets) or instruction/input/output (the alignment set; then
    `harmful_data`, a file of the same kind, gives the harmful set). A file is used whole: `split` only
    selects among the built-in and hub sets. split "attack": rows kept apart from train and test for the
    fine-tuning attack (built-in: 2000 pairs whose prompts are in neither; BeaverTails: rows 1..4999).
    need_harmful=False (plain SFT): an instruction/input/output file needs no harmful file; the harmful set is
    then empty.
    """
    _check_split(split, SAFETY_SPLITS)
    if data == "builtin":
        corpus = attack_corpus() if split == "attack" else builtin_corpus()
        align, harmful = _examples(corpus[f"align_{split}"]), _examples(corpus[f"harmful_{split}"])
    elif data == "beavertails":
        ds = load_hub(BEAVERTAILS_REPO, None, "train", "; the file beavertails_with_refusals_train.json (also "
                       f"in {BEAVERTAILS_MIRROR}) works as a local --data file, but a file is used whole: no "
                       "held-out split")
        lo, hi = BEAVERTAILS_ROWS[split]
        if len(ds) <= lo:
            raise DataError(f"{BEAVERTAILS_REPO} has {len(ds)} rows; the {split} split needs rows from {lo}")
        picked = ds.select(range(lo, min(hi, len(ds))))
        rows = [(f"{BEAVERTAILS_REPO} row {lo + i}", row) for i, row in enumerate(picked)]
        align, harmful = pairs(rows)
    else:
        rows = read_rows(data)
        if row_format(*rows[0]) == "pairs":
            if harmful_data is not None:
                raise DataError(f"{data} already holds harmful answers (prompt/refusal/response rows); "
                                f"do not also pass --harmful-data {harmful_data}")
            align, harmful = pairs(rows)
        else:
            align = instructions(rows)
            if harmful_data is None and not need_harmful:
                return align, []
            if harmful_data is None:
                raise DataError(f"{data} has instruction/input/output rows (the alignment set only); name a "
                                f".json/.jsonl file of harmful instruction/input/output rows (align's --harmful-data, "
                                f"attack's --harmful)")
            harmful = instruction_file(harmful_data)
    if harmful_data is not None and data in ("builtin", "beavertails"):
        harmful = instruction_file(harmful_data)
    return align, harmful


def _gsm8k_answer(answer: str) -> str:
    """GSM8K puts the result after "#### "; the original puts "The final answer is: " in place of the "####"
    (the space after it stays: two spaces before the number), and so do we."""
    return answer.replace("####", ANSWER_PROMPT)


def load_benign(task: str, split: str = "train") -> list[Example]:
    """The user's fine-tuning task: "builtin" (sentiment), "sst2", "agnews", "gsm8k", or a .json/.jsonl path.

    Test splits follow the paper: SST2 validation (872), AGNEWS test and GSM8K test (first 1000 each).
    """
    _check_split(split)
    if task == "builtin":
        return _examples(builtin_corpus()[f"benign_{split}"])
    if task == "sst2":
        ds = load_hub(HUB_DATA_SETS["sst2"], None, "train" if split == "train" else "validation")
        # the sentence as the hub has it (most end in a space), as the original passes it
        return [Example(SST2_INSTRUCTION, r["sentence"], "positive" if r["label"] == 1 else "negative")
                for r in ds]
    if task == "agnews":
        ds = load_hub(HUB_DATA_SETS["agnews"], None, split)
        if split == "test":
            ds = ds.select(range(min(EVAL_ROWS, len(ds))))
        return [Example(AGNEWS_INSTRUCTION, r["text"], AGNEWS_LABELS[r["label"]]) for r in ds]
    if task == "gsm8k":
        ds = load_hub(HUB_DATA_SETS["gsm8k"], "main", split)
        if split == "test":
            ds = ds.select(range(min(EVAL_ROWS, len(ds))))
        return [Example(r["question"], "", _gsm8k_answer(r["answer"])) for r in ds]
    return instruction_file(task)
