"""The data layer: template, masking, truncation, batches, tokenizer, built-in corpus, loaders, BatchStream."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from booster_fast.corpus import SENTIMENT_INSTRUCTION, builtin_corpus, corpus_texts
from booster_fast.data import (
    IGNORE_INDEX, SST2_INSTRUCTION, BatchStream, DataError, Example, check_max_length, clean_refusal, collate,
    encode_all, encode_example, format_prompt, load_benign, load_safety_data,
)
from booster_fast.hf_batches import FixedLengthCollator
from booster_fast.tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer, train_tiny_tokenizer_json

EX = Example("How do I pick a lock?", "", "I can't help with that.")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def single_line_error(fn, *args, match=None, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    if match:
        assert match in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# template, masking, truncation, collate
# ------------------------------------------------------------------------------------------------
def test_template_text_exact():
    assert format_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:\n")
    assert format_prompt("Do X.", "some text") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n"
        "### Input:\nsome text\n\n### Response:\n")


@pytest.mark.parametrize("ex", [EX, Example("Classify this.", "A lovely film.", "positive")])
def test_label_masking(tok, ex):
    row = encode_example(tok, ex, 256)
    ids, labels = row["input_ids"], row["labels"]
    assert not row["truncated"] and len(ids) == len(labels)
    prompt_ids = tok(format_prompt(ex.instruction, ex.input), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids                       # no BOS: the tiny tokenizer adds none
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and ids[-1] == tok.eos_token_id
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == ex.output + tok.eos_token
    assert tok.decode(ids) == format_prompt(ex.instruction, ex.input) + ex.output + tok.eos_token


def test_add_bos_forced(tok):
    row = encode_example(tok, EX, 256, add_bos=True)
    assert row["input_ids"][0] == tok.bos_token_id and row["labels"][0] == IGNORE_INDEX
    assert row["input_ids"][1:] == encode_example(tok, EX, 256)["input_ids"]


def test_truncation_cuts_response_first(tok):
    full = encode_example(tok, Example(EX.instruction, "", "word " * 100), 1024)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    row = encode_example(tok, Example(EX.instruction, "", "word " * 100), n_prompt + 3)
    assert row["truncated"] and len(row["input_ids"]) == n_prompt + 3
    assert row["input_ids"] == full["input_ids"][: n_prompt + 3]      # prompt intact, response cut, no EOS
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    one = encode_example(tok, EX, n_prompt + 1)                      # room for exactly one response token
    assert one["truncated"] and sum(t != IGNORE_INDEX for t in one["labels"]) == 1
    # room for the prompt alone: the prompt body gives way, so that a response token is still learnt
    exact = encode_example(tok, Example(EX.instruction, "", "word " * 100), n_prompt)
    assert exact["truncated"] and len(exact["input_ids"]) == n_prompt
    assert sum(t != IGNORE_INDEX for t in exact["labels"]) >= 1


def test_long_prompt_keeps_template_tail(tok):
    ex = Example("please " * 300, "", "I can't help with that.")
    row = encode_example(tok, ex, 128)
    assert row["truncated"] and len(row["input_ids"]) == 128
    n = row["labels"].count(IGNORE_INDEX)
    assert tok.decode(row["input_ids"][:n]).endswith("\n\n### Response:\n")
    assert tok.decode(row["input_ids"][:n]).startswith("Below is an instruction")
    assert 1 <= 128 - n <= 32


def test_too_short_for_template(tok):
    template = check_max_length(tok, 256)
    assert template == len(tok(format_prompt(""), add_special_tokens=False)["input_ids"])
    check_max_length(tok, template + 1)
    msg = single_line_error(check_max_length, tok, template, match=f"max_length={template}")
    assert str(template + 1) in msg and "template" in msg
    msg = single_line_error(encode_example, tok, EX, 10, match="max_length=10")
    assert str(template) in msg


@pytest.mark.parametrize("kwargs,match", [
    (dict(add_bos="False"), "add_bos must be True, False or None, got 'False'"),
    (dict(add_bos=1), "add_bos must be True, False or None, got 1"),
    (dict(examples=[EX, {"instruction": "Hi", "input": "", "output": "Hello"}]),
     "example 1 is a dict ({'instruction': 'Hi', "),
    (dict(examples=[("Hi", "", "Hello")]), "example 0 is a tuple (('Hi', '', 'Hello')), not a "
                                           "booster_fast.data.Example(instruction, input, output)"),
    (dict(max_length=256.0), "max_length must be an integer >= 2, got 256.0"),
    (dict(max_length=True), "max_length must be an integer >= 2, got True"),
])
def test_encode_all_refuses_bad_arguments(tok, kwargs, match):
    """A string add_bos (which would read as true), rows that are no Example (which would fail on an attribute)
    and a fractional max_length are one DataError naming what is expected."""
    args = {"examples": [EX], "max_length": 256, **kwargs}
    single_line_error(encode_all, tok, match=match, **args)


def test_encode_all_takes_a_numpy_max_length(tok):
    for max_length in (256, 40):  # whole, and cut to fit
        assert encode_all(tok, [EX], np.int64(max_length)) == encode_all(tok, [EX], max_length)
    assert encode_all(tok, [EX], np.int64(40))[1] == 1
    assert encode_example(tok, EX, np.int32(256), add_bos=False) == encode_example(tok, EX, 256)


def test_collate_shapes_and_padding(tok):
    rows, n_trunc = encode_all(tok, [EX, Example("Hi", "", "Hello there, how are you today?")], 96)
    assert n_trunc == 0
    batch = collate(rows, 96, tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for v in batch.values():
        assert v.shape == (2, 96) and v.dtype == torch.long
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (96 - n)
    single_line_error(collate, [], 96, 0, match="empty")
    single_line_error(collate, rows, 8, 0, match="max_length=8")
    # a row exactly max_length long (every truncated row is): no pad, every position real
    full, n_trunc = encode_all(tok, [Example("Hi", "", "x " * 200)], 80)
    assert n_trunc == 1 and len(full[0]["input_ids"]) == 80
    batch = collate(full, 80, tok.pad_token_id)
    assert batch["attention_mask"].all() and batch["labels"][0].tolist() == full[0]["labels"]


def test_encode_all_counts_truncated(tok):
    rows, n_trunc = encode_all(tok, [EX, Example("Hi", "", "x " * 200), EX], 80)
    assert n_trunc == 1 and [r["truncated"] for r in rows] == [False, True, False]
    assert rows[0] == encode_example(tok, EX, 80)


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------
def test_tokenizer_specials_and_size(tok):
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.padding_side == "right"
    assert 300 < len(tok) <= TINY_VOCAB_SIZE
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]  # no auto BOS/EOS


@pytest.mark.parametrize("text", [
    "plain ascii text", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "",
    "ünïcödé — “quotes” 😀 中文 עברית", "\x00\x01 control \x7f", "### Response:\n", "a  b   c    d",
])
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.unk_token_id not in tok(text)["input_ids"]


def test_tokenizer_round_trip_corpus(tok):
    texts = corpus_texts()[::37]
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"]):
        assert tok.decode(ids) == text


def test_the_tokenizer_is_trained_on_every_field_of_the_corpus():
    """instruction, input (the benign reviews) and output of every split, and the prompt templates."""
    from booster_fast.data import PROMPT_INPUT, PROMPT_NO_INPUT

    texts = set(corpus_texts())
    rows = [r for split in builtin_corpus(0).values() for r in split]
    assert all(r[f] in texts for r in rows for f in ("instruction", "input", "output") if r[f])
    assert any(r["input"] for r in rows), "no row has an input: the check would miss that field"
    assert PROMPT_NO_INPUT.format(instruction="", input="") in texts and PROMPT_INPUT.format(instruction="",
                                                                                             input="") in texts


def test_the_tokenizer_cache_key_follows_its_recipe(monkeypatch):
    """A cached vocabulary is reused only for the same texts, recipe and tokenizers release."""
    from booster_fast import tokenizer as T

    key = T.corpus_key(["a", "b"])
    assert T.corpus_key(["a", "b"]) == key and T.corpus_key(["a", "c"]) != key and T.corpus_key(["ab"]) != key
    for name, value in (("TOKENIZER_VERSION", "2"), ("TINY_VOCAB_SIZE", 1234), ("MIN_FREQUENCY", 3)):
        with monkeypatch.context() as m:
            m.setattr(T, name, value)
            assert T.corpus_key(["a", "b"]) != key, name
    monkeypatch.setattr(T.tokenizers, "__version__", "0.0.0")
    assert T.corpus_key(["a", "b"]) != key


def test_tokenizer_deterministic(tok):
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()
    assert train_tiny_tokenizer_json() == train_tiny_tokenizer_json()     # uncached, in process


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_corpus_and_tokenizer_deterministic_across_processes(tmp_path):
    """Another interpreter, another PYTHONHASHSEED, no disk cache: the same corpus and the same vocabulary."""
    code = ("import hashlib, json; from booster_fast.corpus import builtin_corpus; "
            "from booster_fast.tokenizer import train_tiny_tokenizer_json as t; "
            "h = lambda s: hashlib.sha256(s.encode()).hexdigest(); "
            "print(h(json.dumps(builtin_corpus(0), sort_keys=True)), h(t()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "BOOSTER_FAST_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [sha(json.dumps(builtin_corpus(0), sort_keys=True)), sha(train_tiny_tokenizer_json())]


def test_tokenizer_disk_cache(tmp_path, monkeypatch):
    from booster_fast import tokenizer as T
    monkeypatch.setenv("BOOSTER_FAST_CACHE", str(tmp_path))
    T._tokenizer_json.cache_clear()
    try:
        first = T.build_tiny_tokenizer()
        files = list(tmp_path.glob("tiny-tokenizer-*.json"))
        assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
        files[0].write_text("{torn", encoding="utf-8")               # a bad cache file is retrained
        T._tokenizer_json.cache_clear()
        assert T.build_tiny_tokenizer().get_vocab() == first.get_vocab()
        json.loads(files[0].read_text(encoding="utf-8"))
    finally:
        T._tokenizer_json.cache_clear()


# ------------------------------------------------------------------------------------------------
# built-in corpus
# ------------------------------------------------------------------------------------------------
def test_builtin_corpus_sizes_and_fields():
    c = builtin_corpus()
    assert {k: len(v) for k, v in c.items()} == {
        "align_train": 2000, "harmful_train": 2000, "benign_train": 2000,
        "align_test": 200, "harmful_test": 200, "benign_test": 200}
    for rows in c.values():
        for r in rows:
            assert set(r) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in r.values())
    for split in ("train", "test"):
        assert all(r["input"] == "" for r in c[f"align_{split}"] + c[f"harmful_{split}"])
        assert all(r["instruction"] == SENTIMENT_INSTRUCTION and r["input"] for r in c[f"benign_{split}"])
        labels = [r["output"] for r in c[f"benign_{split}"]]
        assert set(labels) == {"positive", "negative"} and labels.count("positive") == len(labels) // 2


def test_builtin_corpus_deterministic():
    assert builtin_corpus(0) == builtin_corpus(0)
    assert builtin_corpus(1) != builtin_corpus(0)
    rows = builtin_corpus(0)["align_train"]
    rows[0]["output"] = "mutated"                                  # callers get fresh copies
    assert builtin_corpus(0)["align_train"][0]["output"] != "mutated"


@pytest.mark.parametrize("seed", [0, 1])
def test_builtin_corpus_splits_disjoint_and_shared_prompts(seed):
    c = builtin_corpus(seed)
    for split in ("train", "test"):
        align, harmful = c[f"align_{split}"], c[f"harmful_{split}"]
        assert [r["instruction"] for r in align] == [r["instruction"] for r in harmful]
        assert len({r["instruction"] for r in align}) == len(align)                      # unique prompts
        assert all(a["output"] != h["output"] for a, h in zip(align, harmful))
        assert all(h["output"].startswith(("Sure", "Of course", "Absolutely", "Here", "No problem", "Great"))
                   for h in harmful)
    assert not {r["instruction"] for r in c["align_train"]} & {r["instruction"] for r in c["align_test"]}
    assert not {r["input"] for r in c["benign_train"]} & {r["input"] for r in c["benign_test"]}


def test_builtin_variety():
    c = builtin_corpus()
    assert len({r["output"] for r in c["align_train"]}) > 500
    assert len({r["output"] for r in c["harmful_train"]}) > 500
    assert len({r["input"] for r in c["benign_train"]}) == 2000


# ------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------
def test_load_builtin():
    align, harmful = load_safety_data("builtin", "test")
    assert len(align) == len(harmful) == 200 and isinstance(align[0], Example)
    assert [a.instruction for a in align] == [h.instruction for h in harmful]
    assert len(load_benign("builtin")) == 2000 and len(load_benign("builtin", "test")) == 200
    single_line_error(load_safety_data, "builtin", "validation", match="split")


def write(path, rows, jsonl: bool):
    text = "\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("jsonl", [False, True])
def test_load_pairs_file(tmp_path, jsonl):
    rows = [{"prompt": "How do I do a bad thing?",
             "refusal": "Question: How do I do a bad thing?\nAnswer: I can't help.",
             "response": "Sure, [placeholder].", "category": "x", "is_safe": False},
            {"prompt": "p2", "refusal": "No.", "response": "Sure."}]
    path = write(tmp_path / ("d.jsonl" if jsonl else "d.json"), rows, jsonl)
    align, harmful = load_safety_data(path)
    assert align == [Example("How do I do a bad thing?", "", "I can't help."), Example("p2", "", "No.")]
    assert harmful == [Example("How do I do a bad thing?", "", "Sure, [placeholder]."), Example("p2", "", "Sure.")]
    single_line_error(load_safety_data, path, harmful_data=path, match="--harmful-data")


@pytest.mark.parametrize("jsonl", [False, True])
def test_load_instruction_files(tmp_path, jsonl):
    ext = "jsonl" if jsonl else "json"
    a = write(tmp_path / f"a.{ext}", [{"instruction": "i1", "input": "", "output": "refuse"},
                                       {"instruction": "i2", "output": "refuse2"}], jsonl)
    h = write(tmp_path / f"h.{ext}", [{"instruction": "i1", "input": "ctx", "output": "comply"}], jsonl)
    align, harmful = load_safety_data(a, harmful_data=h)
    assert align == [Example("i1", "", "refuse"), Example("i2", "", "refuse2")]
    assert harmful == [Example("i1", "ctx", "comply")]
    single_line_error(load_safety_data, a, match="--harmful-data")
    assert load_benign(h) == harmful


def test_clean_refusal():
    assert clean_refusal("Question: q?\nAnswer: No way.") == "No way."
    assert clean_refusal("No way.") == "No way."


def bad_file(tmp_path, name: str, content: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("name,content,match", [
    ("bad.json", b'[{"prompt": "a", "refusal": "b"', "not valid JSON"),
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": \n', "line 2"),
    ("bad.json", b'[{"instruction": "caf\xe9", "output": "b"}]', "not UTF-8"),
    ("bad.json", b'{"instruction": "a", "output": "b"}', "JSON array"),
    ("bad.json", b'[["a", "b"]]', "row 1: expected a JSON object"),
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n[1]\n', "line 2: expected a JSON object"),
    ("bad.json", b'[{"prompt": "a", "refusal": "b", "response": "c"}, {"prompt": "a", "refusal": "b"}]',
     "row 2: missing field 'response'"),
    ("bad.json", b'[{"prompt": "a", "refusal": 3, "response": "c"}]', "row 1: field 'refusal' must be a string"),
    ("bad.json", b'[{"prompt": "a", "refusal": "b"}]', "row 1: missing field 'response'"),  # the row that decides
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": null}\n',
     "line 2: field 'output' must be a string"),
    ("bad.json", b'[{"text": "a"}]', "unrecognised row"),
    ("bad.json", b"[]", "empty data set"),
    ("bad.jsonl", b"\n\n", "empty data set"),
    ("bad.json", b"", "empty data set (the file holds no text)"),  # not json's "Expecting value"
    ("bad.csv", b"a,b\n", "unsupported file type"),
    ("bad.json", b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n' + b"[" * 100_000 + b"]" * 100_000, "line 2: JSON nested"),
])
def test_malformed_files(tmp_path, name, content, match):
    path = bad_file(tmp_path, name, content)
    msg = single_line_error(load_safety_data, path, harmful_data=None, match=match)
    assert path in msg


def test_json_lines_in_a_json_file_and_a_null_input_are_read(tmp_path):
    """A .json file holding JSON Lines (one object per line) is read as such, with line numbers in messages; an
    instruction row's optional input may be null (as exported data sets write a missing one)."""
    from booster_fast.data_files import instruction_file, read_rows

    path = tmp_path / "d.json"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": null, "output": "d"}\n')
    assert instruction_file(str(path)) == [Example("a", "", "b"), Example("c", "", "d")]
    assert [loc.rsplit(" ", 2)[-2:] for loc, _ in read_rows(str(path))] == [["line", "1"], ["line", "2"]]


def test_missing_file_and_harmful_format(tmp_path):
    single_line_error(load_safety_data, str(tmp_path / "nope.json"), match="no such file")
    (tmp_path / "dir.json").mkdir()
    single_line_error(load_safety_data, str(tmp_path / "dir.json"), match="a directory, not a .json/.jsonl file")
    a = write(tmp_path / "a.json", [{"instruction": "i", "output": "o"}], False)
    pairs = write(tmp_path / "p.json", [{"prompt": "i", "refusal": "r", "response": "o"}], False)
    single_line_error(load_safety_data, a, harmful_data=pairs, match="instruction/input/output")
    single_line_error(load_safety_data, a, harmful_data=str(tmp_path / "nope.jsonl"), match="no such file")
    single_line_error(load_benign, pairs, match="instruction/input/output")


def test_hub_loaders_fail_offline_with_one_line():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"      # conftest: never touch the network in tests
    msg = single_line_error(load_safety_data, "beavertails", match="anonymous4486/booster_dataset")
    assert "load_dataset" in msg and "beavertails_with_refusals_train.json" in msg
    for task, name in (("sst2", "stanfordnlp/sst2"), ("agnews", "fancyzhx/ag_news"), ("gsm8k", "openai/gsm8k")):
        single_line_error(load_benign, task, match=name)


def test_gsm8k_answer_format():
    from booster_fast.data import _gsm8k_answer
    assert _gsm8k_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == \
        "She has 3 + 4 = <<3+4=7>>7 apples.\nThe final answer is:  7"  # the original's two spaces


# ------------------------------------------------------------------------------------------------
# BatchStream
# ------------------------------------------------------------------------------------------------
def fake_rows(n: int) -> list[dict]:
    return [{"input_ids": [100 + i, 7], "labels": [-100, 7]} for i in range(n)]


def row_ids(batch) -> list[int]:
    return (batch["input_ids"][:, 0] - 100).tolist()


def test_batchstream_deterministic_and_covers_epoch():
    rows = fake_rows(23)
    a, b = BatchStream(rows, 4, 8, 0, seed=3), BatchStream(rows, 4, 8, 0, seed=3)
    assert a.batches_per_epoch == 5
    epoch0 = [row_ids(next(a)) for _ in range(5)]
    assert epoch0 == [row_ids(next(b)) for _ in range(5)]
    seen = [i for batch in epoch0 for i in batch]
    assert len(seen) == len(set(seen)) == 20                      # no repeats; last 3 rows dropped
    assert a.state_dict()["epoch"] == 0
    epoch1 = [row_ids(next(a)) for _ in range(5)]
    assert a.state_dict()["epoch"] == 1 and epoch1 != epoch0      # reshuffled
    other = BatchStream(rows, 4, 8, 0, seed=4)
    assert [row_ids(next(other)) for _ in range(5)] != epoch0
    batch = next(a)
    assert batch["input_ids"].shape == (4, 8) and batch["attention_mask"][:, 2:].sum() == 0


def test_batchstream_resume():
    rows = fake_rows(17)
    ref = BatchStream(rows, 3, 8, 0, seed=11)
    stream = [row_ids(next(ref)) for _ in range(14)]
    for cut in (0, 2, 5, 7):
        first = BatchStream(rows, 3, 8, 0, seed=11)
        for _ in range(cut):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))          # survives a JSON checkpoint
        resumed = BatchStream(rows, 3, 8, 0, seed=11)
        resumed.load_state_dict(state)
        assert [row_ids(next(resumed)) for _ in range(14 - cut)] == stream[cut:]
    single_line_error(BatchStream(rows, 3, 8, 0, seed=12).load_state_dict, state, match="seed")
    # another batch size, or the same per process on more processes, or other rows: the position means something else
    single_line_error(BatchStream(rows, 4, 8, 0, seed=11).load_state_dict, state, match="global_batch=3")
    single_line_error(BatchStream(rows, 3, 8, 0, seed=11, world_size=2).load_state_dict, state,
                      match="global_batch=3 but this run has 6")
    single_line_error(BatchStream(fake_rows(18), 3, 8, 0, seed=11).load_state_dict, state, match="num_rows=17")


def test_batchstream_ranks_union_equals_single_process():
    rows = fake_rows(50)
    single = BatchStream(rows, 6, 8, 0, seed=5)
    ranks = [BatchStream(rows, 3, 8, 0, seed=5, rank=r, world_size=2) for r in range(2)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch == 8
    for _ in range(20):                                           # across an epoch boundary
        whole = next(single)
        parts = [next(r) for r in ranks]
        for key in whole:
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))


def test_batchstream_errors():
    single_line_error(BatchStream, fake_rows(5), 3, 8, 0, seed=0, world_size=2, match="batch larger than the data set")
    single_line_error(BatchStream, fake_rows(5), 2, 8, 0, seed=0, rank=2, world_size=2, match="rank")


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=2.0), "BatchStream: batch_size must be an integer, got 2.0"),
    (dict(batch_size=True), "BatchStream: batch_size must be an integer, got True"),
    (dict(max_length=8.0), "BatchStream: max_length must be an integer, got 8.0"),
    (dict(max_length=0), "BatchStream: need max_length >= 1 and pad_id >= 0; got max_length=0, pad_id=0"),
    (dict(pad_id=None), "BatchStream: pad_id must be an integer, got None"),
    (dict(pad_id=-1), "BatchStream: need max_length >= 1 and pad_id >= 0; got max_length=8, pad_id=-1"),
    (dict(seed=0.0), "BatchStream: seed must be an integer, got 0.0"),
    (dict(seed="3"), "BatchStream: seed must be an integer, got '3'"),
    (dict(rank=0.0), "BatchStream: rank must be an integer, got 0.0"),
    (dict(world_size=True), "BatchStream: world_size must be an integer, got True"),
])
def test_batchstream_refuses_bad_numbers_at_the_call(kwargs, match):
    """2.0 would fail in the first next() (slice indices), True would mean 1, seed 0.0 would shuffle otherwise
    than seed 0 yet resume as if equal: one DataError naming the argument and its value."""
    args = {"batch_size": 4, "max_length": 8, "pad_id": 0, "seed": 3, **kwargs}
    single_line_error(BatchStream, fake_rows(12), match=match, **args)


def test_batchstream_takes_numpy_integers():
    rows = fake_rows(23)
    a = BatchStream(rows, np.int64(4), np.int32(8), np.int64(0), seed=np.int64(3), rank=np.int64(0),
                    world_size=np.int64(1))
    b = BatchStream(rows, 4, 8, 0, seed=3)
    assert [row_ids(next(a)) for _ in range(7)] == [row_ids(next(b)) for _ in range(7)]
    assert a.state_dict() == b.state_dict() and type(a.state_dict()["seed"]) is int
    json.dumps(a.state_dict())  # a checkpoint's JSON takes it


@pytest.mark.parametrize("kwargs,match", [
    (dict(pad_id=None), "FixedLengthCollator: pad_id must be an integer >= 0 (the tokenizer's pad_token_id), got "
                        "None; a tokenizer without a pad token gives None: set tokenizer.pad_token first, e.g. "
                        "tokenizer.pad_token = tokenizer.eos_token"),
    (dict(pad_id=True), "FixedLengthCollator: pad_id must be an integer >= 0 (the tokenizer's pad_token_id), got True"),
    (dict(pad_id=0.0), "FixedLengthCollator: pad_id must be an integer >= 0 (the tokenizer's pad_token_id), got 0.0"),
    (dict(pad_id=-1), "FixedLengthCollator: pad_id must be an integer >= 0 (the tokenizer's pad_token_id), got -1"),
    (dict(max_length=0), "FixedLengthCollator: max_length must be an integer >= 1, got 0"),
    (dict(max_length=64.0), "FixedLengthCollator: max_length must be an integer >= 1, got 64.0"),
    (dict(max_length=None), "FixedLengthCollator: max_length must be an integer >= 1, got None"),
])
def test_fixed_length_collator_refuses_bad_arguments(kwargs, match):
    """A tokenizer without a pad token gives pad_id None, which would fail only inside trainer.train()."""
    with pytest.raises(ValueError) as e:
        FixedLengthCollator(**{"pad_id": 0, "max_length": 8, **kwargs})
    assert str(e.value) == match


def test_fixed_length_collator_takes_numpy_integers():
    rows = [{"input_ids": [5, 6], "labels": [-100, 6]}]
    batch = FixedLengthCollator(np.int64(1), np.int64(4))(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 1, 1]] and batch["labels"].tolist() == [[-100, 6, -100, -100]]


def test_hub_rows_are_converted(monkeypatch):
    """With load_dataset stubbed by in-memory data sets: row ranges, refusal cleaning, benign formats."""
    import datasets

    fake = {
        "anonymous4486/booster_dataset": [{"prompt": f"p{i}", "refusal": f"Question: p{i}\nAnswer: no {i}",
                                           "response": f"sure {i}", "category": "c", "is_safe": False}
                                          for i in range(10_300)],
        "stanfordnlp/sst2": [{"idx": 0, "sentence": "a fine film ", "label": 1},
                             {"idx": 1, "sentence": "bad", "label": 0}],
        "fancyzhx/ag_news": [{"text": f"news {i}", "label": i % 4} for i in range(1200)],
        "openai/gsm8k": [{"question": "1+1?", "answer": "1+1=2\n#### 2"}],
    }
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda repo, name=None, split=None: datasets.Dataset.from_list(fake[repo]))
    align, harmful = load_safety_data("beavertails")
    assert len(align) == len(harmful) == 5000
    assert align[0] == Example("p5000", "", "no 5000") and harmful[-1] == Example("p9999", "", "sure 9999")
    assert len(load_safety_data("beavertails", "test")[0]) == 300           # rows 10000.. as far as they go
    assert load_benign("sst2") == [Example(SST2_INSTRUCTION, "a fine film ", "positive"),  # as the hub has it
                                   Example(SST2_INSTRUCTION, "bad", "negative")]
    news = load_benign("agnews", "test")
    assert len(news) == 1000 and [e.output for e in news[:4]] == ["World", "Sports", "Business", "Sci/Tech"]
    assert load_benign("gsm8k") == [Example("1+1?", "", "1+1=2\nThe final answer is:  2")]


def test_a_prompt_too_long_for_max_length_leaves_the_response_a_quarter(tok):
    """Prompt body cut (its template tail kept): the response keeps max_length // 4 tokens, cut (no EOS)."""
    row = encode_example(tok, Example("please " * 300, "", "word " * 100), 128)
    assert row["truncated"] and len(row["input_ids"]) == 128
    learnt = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert len(learnt) == 128 // 4 and tok.eos_token_id not in learnt
    assert row["input_ids"][-32:] == learnt


def test_builtin_alignment_data_takes_its_harmful_rows_from_harmful_data(tmp_path):
    rows = [{"instruction": f"bad {i}", "input": "", "output": f"harm {i}"} for i in range(3)]
    path = tmp_path / "harmful.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    align, harmful = load_safety_data("builtin", harmful_data=str(path))
    assert align == load_safety_data("builtin")[0]
    assert harmful == [Example(r["instruction"], "", r["output"]) for r in rows]


def test_a_byte_order_mark_and_an_upper_case_suffix_are_read(tmp_path):
    """A file saved with a UTF-8 byte order mark (Windows editors), or named .JSON/.JSONL, is read as any other."""
    from booster_fast.data_files import instruction_file

    row = '{"instruction": "a", "output": "b"}'
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf[" + row.encode() + b"]")
    (tmp_path / "UPPER.JSONL").write_text(row + "\n")
    for name in ("bom.json", "UPPER.JSONL"):
        assert instruction_file(str(tmp_path / name)) == [Example("a", "", "b")], name


def test_a_refusal_that_only_starts_like_repnoises_is_kept_whole():
    assert clean_refusal("Question: why not?") == "Question: why not?"


def test_a_harmful_file_of_pairs_gives_the_harmful_responses(tmp_path):
    """load_harmful_file on prompt/refusal/response rows: prompt -> response (the harmful answer), not the refusal;
    instruction rows as they are."""
    from booster_fast.data_files import load_harmful_file

    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "How?", "refusal": "No.", "response": "Like so."}\n')
    assert load_harmful_file(str(p)) == [Example("How?", "", "Like so.")]
    q = tmp_path / "inst.json"
    q.write_text('[{"instruction": "Do it.", "input": "x", "output": "Done."}]')
    assert load_harmful_file(str(q)) == [Example("Do it.", "x", "Done.")]


def test_a_batch_beyond_the_machines_memory_is_refused_up_front():
    """Every batch is padded to max_length: a max_length whose batches alone would fill memory (1e9 was killed
    for it) is one DataError naming the flag and the data's longest row, before any batch is made."""
    rows = fake_rows(8)
    with pytest.raises(DataError, match=r"max_length 1000000000000 \(--max-length\) pads each batch of 4 rows to "
                                        r".* GiB, more than 25% of this machine's .* the longest row here has 2 "):
        BatchStream(rows, 4, 10**12, 0, seed=1)
    assert next(BatchStream(rows, 4, 4096, 0, seed=1))["input_ids"].shape == (4, 4096)  # a usual length still pads


def _metaspace_tokenizer():
    """A small SentencePiece-style tokenizer (a '▁' marks each word start, and the start of every text, as
    Llama-2's does), trained here on Alpaca prompts and answers; newlines are tokens of their own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [format_prompt("Analyze the sentiment", "great movie") + "positive",
             format_prompt("Say no") + "negative answer"] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_the_response_is_tokenized_after_its_prompt_as_the_original_does():
    """The original tokenizes prompt + response together and masks the prompt's own token count. Tokenized on
    its own, a SentencePiece answer would start with a word-start token ('▁', 'negative') that the prompt-then-
    answer text never has ('negative' after the newline)."""
    tok = _metaspace_tokenizer()
    ex = Example("Say no", "", "negative")
    row = encode_example(tok, ex, 64)
    prompt = tok(format_prompt("Say no"), add_special_tokens=False)["input_ids"]
    joint = tok(format_prompt("Say no") + "negative", add_special_tokens=False)["input_ids"]
    learnt = [t for t in row["labels"] if t != -100]
    assert row["input_ids"] == joint + [tok.eos_token_id] and learnt == joint[len(prompt):] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(learnt[:-1]) == ["negative"]
    assert tok("negative", add_special_tokens=False)["input_ids"] != learnt[:-1]  # what tokenizing apart gave
    assert row["labels"][:len(prompt)] == [-100] * len(prompt) and row["labels"][len(prompt)] != -100
    # batched encoding agrees row by row
    rows, _ = encode_all(tok, [ex, Example("Analyze the sentiment", "great movie", "positive")], 64)
    assert rows[0]["input_ids"] == row["input_ids"] and rows[0]["labels"] == row["labels"]
