"""A tiny byte-level BPE tokenizer trained on the built-in corpus, for the embedded offline model.

Byte-level means every string round-trips: `decode(encode(x)) == x` for any Unicode text, with no <unk>
ever produced (256 byte symbols are the base alphabet; no normalizer; no prefix space). The vocabulary is
learnt from `corpus_texts()` with the `tokenizers` BPE trainer, whose merge order is a pure function of
the pair counts (ties broken by token ids), so every call and every process yields the same vocabulary.

Special tokens take ids 0-3: <pad>, <s>, </s>, <unk>. No BOS/EOS is added automatically (no
post-processor): the data layer appends EOS to every response itself and a BOS carries no information for
a model trained from scratch on one template; `data.default_prefix` sees that this tokenizer adds none.

Training takes well under a second but is still cached: per process with `functools.lru_cache` (the
serialised JSON; each call returns a fresh wrapper, so callers may change e.g. padding_side safely) and on
disk under ~/.cache/booster_fast/ (or $BOOSTER_FAST_CACHE), keyed by a hash of the corpus, this file's
version and the `tokenizers` version, written atomically (temp file + os.replace). A checkpoint should still
save its tokenizer: another `tokenizers` version may learn a different vocabulary.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

from booster_fast.atomic import write_text_atomic
from booster_fast.corpus import corpus_texts

TINY_VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
MIN_FREQUENCY = 2
TOKENIZER_VERSION = "1"      # bump when the training recipe changes (invalidates the disk cache)


def cache_dir() -> Path:
    """$BOOSTER_FAST_CACHE, or ~/.cache/booster_fast where it is unset or empty."""
    return Path(os.environ.get("BOOSTER_FAST_CACHE") or Path.home() / ".cache" / "booster_fast")


def corpus_key(texts: list[str]) -> str:
    h = hashlib.sha256()
    h.update(f"tiny-bpe:{TOKENIZER_VERSION}:{TINY_VOCAB_SIZE}:{MIN_FREQUENCY}:{tokenizers.__version__}\0".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def train_tiny_tokenizer_json(texts: list[str] | None = None) -> str:
    """Train the byte-level BPE (no caching) and return its serialised JSON."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, min_frequency=MIN_FREQUENCY, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts() if texts is None else texts, trainer=trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    texts = corpus_texts()
    path = cache_dir() / f"tiny-tokenizer-{corpus_key(texts)}.json"
    try:
        text = path.read_text(encoding="utf-8")
        Tokenizer.from_str(text)                    # validate: a torn or foreign file is retrained
        return text
    except Exception:  # noqa: BLE001  (missing, unreadable, torn or foreign cache file -> retrain)
        pass
    text = train_tiny_tokenizer_json(texts)
    try:
        write_text_atomic(path, text)
    except OSError:
        pass                                        # read-only home: the disk cache is optional
    return text


def wrap(tokenizer_json: str) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a serialised `tokenizers` BPE with our special tokens."""
    from transformers import PreTrainedTokenizerFast     # imported late: training needs only `tokenizers`

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="right", clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer (vocab <= TINY_VOCAB_SIZE; ids 0-3 = <pad> <s> </s> <unk>); a fresh wrapper per call."""
    return wrap(_tokenizer_json())
