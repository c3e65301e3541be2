"""Where `attack` and `eval` get their model and their harmful rows from.

- Any peft LoRA adapter directory (here: `save_pretrained` of a tiny peft model, no run_config.json) can be
  attacked and evaluated; the base comes from --base-model or adapter_config.json, the rest from the documented
  defaults, and the loaded LoRA weights (and base) are the saved ones.
- The attack's harmful rows are kept apart from the alignment rows: the built-in attack split shares no prompt
  with train or test, BeaverTails' attack rows are the original's 1..4999; a file is used whole and says so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil

import pytest
import torch

import booster_fast as bf
from booster_fast import adapters, attack, corpus
from booster_fast.cli import UsageError, main
from booster_fast.corpus import ATTACK_SIZE, attack_corpus, builtin_corpus
from booster_fast.data import Example, load_safety_data

from test_eval_experiment_inputs import plain_adapter  # an adapter directory peft would write, no weights

SMALL_ATTACK = ["--samples", "20", "--steps", "1", "--eval-every", "1", "--batch-size", "4", "--eval-rows", "8",
                "--lr", "1e-3"]
SMALL_EVAL = ["--judge", "refusal", "--num-prompts", "4", "--num-task", "4", "--max-new-tokens", "4",
              "--task-max-new-tokens", "2"]


def lora_state(model) -> dict[str, torch.Tensor]:
    """LoRA weights by peft's saved key (no adapter name), as float32 copies."""
    return {k.replace(".default", ""): v.detach().float().clone()
            for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(adapter dir, the in-memory peft model): a tiny model (load_model's default seed 0) with LoRA weights set to
    random values (peft starts B at zero, which would make any loaded B look right), saved by save_pretrained only."""
    model, _ = bf.load_model("tiny", device="cpu")
    torch.manual_seed(0)
    model = bf.add_lora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("plain") / "adapter"
    model.save_pretrained(str(d))
    assert not (d / "run_config.json").exists()
    # no base named: null, or "" on older peft/transformers stacks (resolve_base reads both as none)
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] in (None, "")
    return d, model.eval()


@pytest.fixture
def spy_load(monkeypatch):
    """Record the LoRA weights of every model `load_adapter` hands out, as loaded (before any training)."""
    seen = []
    real = adapters.load_adapter

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(lora_state(out[0]))
        return out

    monkeypatch.setattr(adapters, "load_adapter", spy)
    return seen


def one_line_exit_2(argv, capsys, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("booster-fast: error:"), lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- plain adapters
def test_attack_on_a_plain_adapter(plain, spy_load, tmp_path, monkeypatch):
    d, model = plain
    pools = []
    real_mix = attack.poison_mix
    monkeypatch.setattr(attack, "poison_mix", lambda b, h, *a, **k: pools.append(h) or real_mix(b, h, *a, **k))
    out = tmp_path / "attacked"
    assert main(["attack", "--adapter", str(d), "--base-model", "tiny", "--output", str(out), *SMALL_ATTACK]) == 0

    # the LoRA weights loaded are the saved ones, all of them
    saved = lora_state(model)
    assert len(spy_load) == 1 and spy_load[0].keys() == saved.keys() and saved
    assert all(torch.equal(spy_load[0][k], saved[k]) for k in saved)
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["base"] == {"model": "tiny", "quant": "none", "seed": 0, "dtype": None}
    assert cfg["base_from"] == "--base-model"
    assert cfg["max_length"] == 256 and cfg["seed"] == 43 and cfg["aligned_with"] is None   # the paper's defaults
    assert cfg["harmful"] == "builtin" and cfg["harmful_split"] == "attack"
    assert cfg["harmful_disjoint_from_alignment"] is True and "attack split" in cfg["harmful_source"]
    assert pools[0] == load_safety_data("builtin", "attack")[1]

    # and the base is the one the adapter was made on (seed 0): the held-out loss before the first step is
    # the saved model's own
    from booster_fast.data import collate, encode_all
    _, test = load_safety_data("builtin", "test")
    tok = bf.load_model("tiny", device="cpu")[1]
    enc, _ = encode_all(tok, test[:8], 256)
    expected = attack.heldout_loss(model, [collate(enc, 256, tok.pad_token_id)], "cpu").item()
    step0 = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0 and math.isclose(step0["harmful_loss"], expected, rel_tol=1e-5)

    # the attacked run is a run directory: eval finds its base (seed 0 included) in its run_config.json
    res = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(out), "--output", str(res), *SMALL_EVAL]) == 0
    result = json.loads(res.read_text())
    assert result["base"] == cfg["base"] and result["base_from"] == "run_config.json"


def test_eval_on_a_plain_adapter(plain, spy_load, tmp_path):
    d, model = plain
    res = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(d), "--base-model", "tiny", "--output", str(res), *SMALL_EVAL]) == 0
    saved = lora_state(model)
    assert len(spy_load) == 1 and all(torch.equal(spy_load[0][k], saved[k]) for k in saved)
    result = json.loads(res.read_text())
    assert result["base"] == {"model": "tiny", "quant": "none", "seed": 0, "dtype": None}
    assert result["base_from"] == "--base-model"
    assert result["harmful"]["n"] == 4 and "built-in" in result["harmful"]["prompts"]
    # the same answers as the saved model gives: the base is right too, not only the LoRA weights
    from booster_fast.evaluate import generate
    tok = bf.load_model("tiny", device="cpu")[1]
    prompts = [(e.instruction, e.input) for e in load_safety_data("builtin", "test")[1][:4]]
    answers = generate(model, tok, prompts, 4, 64, "cpu")
    assert [x["answer"] for x in result["examples"]["harmful"]] == answers


@pytest.mark.parametrize("command", ["attack", "eval"])
@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_the_base_is_loaded_with_its_trust_remote_code_flag(command, flag, plain, tmp_path, monkeypatch):
    """attack and eval take --trust-remote-code for the base under the adapter, as align does for the model it
    aligns; without it, no model code runs."""
    import booster_fast.models

    seen = []

    def load_model(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(booster_fast.models, "load_model", load_model)
    small = SMALL_ATTACK if command == "attack" else SMALL_EVAL
    with pytest.raises(RuntimeError, match="stop here"):
        main([command, "--adapter", str(plain[0]), "--base-model", "tiny", "--output", str(tmp_path / "out"), *small,
              *flag])
    assert seen == [bool(flag)]


def test_base_model_from_adapter_config(plain, tmp_path):
    """adapter_config.json's base_model_name_or_path names the base when there is no run_config.json."""
    d, _ = plain
    named = tmp_path / "named"
    shutil.copytree(d, named)
    cfg = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "tiny"}))
    res = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(named), "--output", str(res), *SMALL_EVAL]) == 0
    result = json.loads(res.read_text())
    assert result["base"]["model"] == "tiny" and result["base_from"] == "adapter_config.json"


def test_resolve_base_precedence(plain, tmp_path):
    import argparse

    d, _ = plain

    def ns(adapter, **kw):
        return argparse.Namespace(adapter=str(adapter), **{"base_model": None, "quant": None, "base_seed": None, **kw})

    named = tmp_path / "named"
    shutil.copytree(d, named)
    cfg = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/models/llama"}))
    assert adapters.resolve_base(ns(named), {}) == ({"model": "/models/llama", "quant": "none", "seed": 0, "dtype": None},
                                                  "adapter_config.json")
    assert adapters.resolve_base(ns(named, base_model="tiny", quant="nf4", base_seed=5), {}) == (
        {"model": "tiny", "quant": "nf4", "seed": 5, "dtype": None}, "--base-model")
    run = {"model": "llama-1b-shape", "quant": "none", "seed": 43, "dtype": "fp32"}  # an align run's run_config
    assert adapters.resolve_base(ns(named), run) == (
        {"model": "llama-1b-shape", "quant": "none", "seed": 43, "dtype": "fp32"}, "run_config.json")
    assert adapters.resolve_base(ns(named, base_model="tiny"), run)[0]["model"] == "tiny"
    assert adapters.resolve_base(ns(named, base_seed=0), run)[0]["seed"] == 0  # a seed of 0 is a seed
    with pytest.raises(UsageError, match="--base-model"):
        adapters.resolve_base(ns(d), {})


@pytest.mark.parametrize("command", ["attack", "eval"])
def test_plain_adapter_bad_input_is_one_line(command, plain, tmp_path, capsys):
    d, _ = plain
    work = tmp_path / "work"
    work.mkdir()
    tail = (["--output", str(work / "o")] + SMALL_ATTACK if command == "attack"
            else ["--output", str(work / "e.json")] + SMALL_EVAL)
    # no base model anywhere
    one_line_exit_2([command, "--adapter", str(d), *tail], capsys, "--base-model", "adapter_config.json")
    # not an adapter directory
    (tmp_path / "empty").mkdir()
    one_line_exit_2([command, "--adapter", str(tmp_path / "empty"), *tail], capsys, "no adapter_config.json")
    # an adapter that does not fit the base: its target modules do not exist there
    wrong = tmp_path / "wrong"
    shutil.copytree(d, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["no_such_proj"]}))
    one_line_exit_2([command, "--adapter", str(wrong), "--base-model", "tiny", *tail], capsys,
                    "cannot load the adapter", "--base-model")
    # not LoRA
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    one_line_exit_2([command, "--adapter", str(wrong), "--base-model", "tiny", *tail], capsys, "not LoRA")
    assert list(work.iterdir()) == [], "a failed command must leave nothing behind"


# ------------------------------------------------------------------------------------------- harmful rows
@pytest.mark.parametrize("seed", [0, 1])
def test_builtin_attack_split_is_disjoint_from_train_and_test(seed):
    c, a = builtin_corpus(seed), attack_corpus(seed)
    prompts = [r["instruction"] for r in a["harmful_attack"]]
    assert len(prompts) == len(set(prompts)) == ATTACK_SIZE
    assert prompts == [r["instruction"] for r in a["align_attack"]]         # one prompt, refusal vs harmful
    assert all(r["output"].startswith(("Sure", "Of course", "Absolutely", "Here", "No problem", "Great"))
               for r in a["harmful_attack"])
    train = {r["instruction"] for r in c["align_train"]}
    test = {r["instruction"] for r in c["align_test"]}
    assert not set(prompts) & train and not set(prompts) & test
    # every attack prompt asks for a train-split activity: the test activities stay unseen by the attack too
    pools = corpus._combo_pools(seed)
    train_acts = {act for _, act in pools["train"]}
    test_acts = {act for _, act in pools["test"]}
    assert all(any(act in p for act in train_acts) for p in prompts)
    assert not any(act in p for p in prompts for act in test_acts)
    assert attack_corpus(seed) == a                                          # deterministic


def test_generator_has_ample_distinct_prompts_for_the_attack_split():
    """The train combinations give far more distinct prompts than train + attack take (rejection sampling of
    the attack split stays cheap, and could grow)."""
    pools = corpus._combo_pools(0)
    distinct = {c + t.format(a=act) + s for _, act in pools["train"]
                for c in corpus.CONTEXTS for t in corpus.REQUEST_TEMPLATES for s in corpus.SUFFIXES}
    taken = len(builtin_corpus(0)["align_train"]) + ATTACK_SIZE
    assert len(distinct) > 50 * taken, (len(distinct), taken)


def test_the_attack_split_leaves_train_and_test_unchanged():
    """The attack split has its own random stream: the train and test rows (and so the tiny tokenizer trained
    on them) are those of the release before it. Pinned: a deliberate corpus change updates this hash."""
    digest = hashlib.sha256(json.dumps(builtin_corpus(0), sort_keys=True).encode()).hexdigest()
    assert digest == "708928f86620f578621b88d860f67e8dcafd1b6e08c0bce061d6a9bf568397d4"


def test_beavertails_attack_rows_are_the_originals(monkeypatch):
    """Stubbed hub data: the attack split is rows 1..4999 (the original's `0 < index < 5000`, never row 0), apart
    from the alignment rows 5000..9999 and the held-out rows from 10000."""
    import datasets

    rows = [{"prompt": f"p{i}", "refusal": f"Question: p{i}\nAnswer: no {i}", "response": f"sure {i}",
             "category": "c", "is_safe": False} for i in range(10_300)]
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, name=None, split=None: datasets.Dataset.from_list(rows))
    _, harmful = load_safety_data("beavertails", "attack")
    assert harmful[0] == Example("p1", "", "sure 1") and harmful[-1] == Example("p4999", "", "sure 4999")
    assert len(harmful) == 4999
    train = {e.instruction for e in load_safety_data("beavertails", "train")[1]}
    test = {e.instruction for e in load_safety_data("beavertails", "test")[1]}
    assert not {e.instruction for e in harmful} & (train | test)
    src = attack.harmful_rows_source("beavertails", "attack", None)
    assert src[0] == "attack" and src[2] is True and "rows 1-4999" in src[1]


def test_harmful_split_train_restores_the_alignment_rows(aligned, tmp_path, monkeypatch):
    pools = []
    real_mix = attack.poison_mix
    monkeypatch.setattr(attack, "poison_mix", lambda b, h, *a, **k: pools.append(h) or real_mix(b, h, *a, **k))
    for split in ("attack", "train"):
        out = tmp_path / split
        assert main(["attack", "--adapter", str(aligned), "--output", str(out), "--harmful-split", split,
                     *SMALL_ATTACK]) == 0
        cfg = json.loads((out / "run_config.json").read_text())
        assert cfg["harmful_split"] == split and cfg["harmful_disjoint_from_alignment"] is (split == "attack")
        assert cfg["max_length"] == 64 and cfg["base"]["seed"] == 43          # still the run's settings
    align_prompts = {e.instruction for e in load_safety_data("builtin", "train")[0]}
    assert not {e.instruction for e in pools[0]} & align_prompts
    assert pools[1] == load_safety_data("builtin", "train")[1]


@pytest.mark.parametrize("kind", ["pairs", "instruction"])
def test_a_harmful_file_is_used_whole_and_says_so(aligned, tmp_path, caplog, kind):
    """--harmful PATH: prompt/refusal/response rows (their responses) or instruction/input/output rows (their
    outputs), either kind used whole."""
    harmful = tmp_path / "harmful.jsonl"
    row = (lambda i: {"prompt": f"How do I do bad thing {i}?", "refusal": "No.",
                      "response": f"Here is how to do bad thing {i}."}) if kind == "pairs" else \
        (lambda i: {"instruction": f"How do I do bad thing {i}?", "output": f"Here is how to do bad thing {i}."})
    harmful.write_text("".join(json.dumps(row(i)) + "\n" for i in range(30)))
    out = tmp_path / "attacked"
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(["attack", "--adapter", str(aligned), "--output", str(out), "--harmful", str(harmful),
                     *SMALL_ATTACK]) == 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["harmful_split"] == "whole file" and cfg["harmful_disjoint_from_alignment"] is False
    assert cfg["heldout_is_train"] is True and str(harmful) in cfg["harmful_source"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "used whole" in r.getMessage()]
    assert len(warned) == 1 and "no attack split" in warned[0] and "\n" not in warned[0]


def test_an_attack_run_keeps_its_harmful_file_wherever_it_is_read(aligned, tmp_path, monkeypatch, caplog):
    """A relative --harmful path is recorded absolute, so that eval of the attacked run, and a second attack on it
    (which takes the run's own harmful rows, not the built-in set), read the same file from another directory;
    eval warns that those prompts are not held out."""
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere" / "data").mkdir(parents=True)
    row = lambda i, what: json.dumps({"instruction": f"How do I do {what} thing {i}?",  # noqa: E731
                                      "output": f"Here is how to do {what} thing {i}."}) + "\n"
    (tmp_path / "data" / "harmful.jsonl").write_text("".join(row(i, "bad") for i in range(30)))
    # a file of the same name elsewhere, which a relative path would pick up there
    (tmp_path / "elsewhere" / "data" / "harmful.jsonl").write_text("".join(row(i, "other") for i in range(30)))
    pools = []
    real_mix = attack.poison_mix
    monkeypatch.setattr(attack, "poison_mix", lambda b, h, *a, **k: pools.append(h) or real_mix(b, h, *a, **k))
    monkeypatch.chdir(tmp_path)
    assert main(["attack", "--adapter", str(aligned), "--output", "first", "--harmful", "data/harmful.jsonl",
                 *SMALL_ATTACK]) == 0
    first = json.loads((tmp_path / "first" / "run_config.json").read_text())
    assert first["harmful"] == str(tmp_path / "data" / "harmful.jsonl")

    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["attack", "--adapter", str(tmp_path / "first"), "--output", "second", *SMALL_ATTACK]) == 0
    second = json.loads((tmp_path / "elsewhere" / "second" / "run_config.json").read_text())
    assert second["harmful"] == first["harmful"] and second["harmful_split"] == "whole file"
    assert pools[1] == pools[0] and "bad thing" in pools[0][0].instruction
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(["eval", "--adapter", str(tmp_path / "first"), "--output", "eval.json", *SMALL_EVAL]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"eval: the harmful prompts are the run's own data file {first['harmful']}, which it trained on: the harmful "
        "score is not measured on held-out prompts (--prompts builtin|beavertails|PATH for others)"]
    result = json.loads((tmp_path / "elsewhere" / "eval.json").read_text())
    assert first["harmful"] in result["harmful"]["prompts"]
    assert all("bad thing" in x["prompt"] for x in result["examples"]["harmful"])


def test_an_sft_runs_instruction_data_is_not_taken_for_harmful_rows(tmp_path, capsys):
    """An SFT run may align on instruction/input/output rows alone: they are refusals, not harmful rows. Attacking
    it without --harmful is the one-line error that asks for harmful data, not an attack poisoned with refusals;
    --harmful naming such a file takes its rows as harmful ones."""
    rows = tmp_path / "refusals.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"How do I do bad thing {i}?", "output": "I cannot help."})
                            + "\n" for i in range(12)))
    run = tmp_path / "sft"
    assert main(["align", "--method", "sft", "--data", str(rows), "--output", str(run), "--steps", "1",
                 "--max-length", "64", "--batch-size", "2", "--save-every", "0"]) == 0
    capsys.readouterr()
    out = tmp_path / "attacked"
    assert main(["attack", "--adapter", str(run), "--output", str(out), *SMALL_ATTACK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has instruction/input/output rows (the alignment set only)" in err[0], err
    assert not out.exists()


def test_an_unfinished_run_is_no_adapter(tmp_path):
    """A run directory still marked .incomplete (an interrupted align) is refused, naming --resume."""
    d = plain_adapter(tmp_path / "run", "tiny")
    (d / "run_config.json").write_text(json.dumps({"model": "tiny"}))
    assert adapters.read_run_config(d) == {"model": "tiny"}
    (d / adapters.INCOMPLETE).write_text("")
    with pytest.raises(UsageError, match="has not finished .*--resume"):
        adapters.read_run_config(d)


def test_only_a_checkpoint_folder_takes_its_runs_config(tmp_path):
    """RUN/checkpoints/step-N reads RUN's run_config.json; an adapter at RUN/other/x is a plain adapter."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"model": "tiny", "seed": 7}))
    assert adapters.read_run_config(plain_adapter(run / "checkpoints" / "step-000002", "tiny"))["seed"] == 7
    assert adapters.read_run_config(plain_adapter(run / "exports" / "adapter", "tiny")) == {}


@pytest.mark.parametrize("value", [True, 1.5, "3", [3]])
def test_config_int_refuses_what_is_not_an_integer(value):
    with pytest.raises(UsageError, match=re.escape(f"seed is {value!r}, not an integer")):
        adapters.config_int({"seed": value}, "seed", 43)
    assert adapters.config_int({"seed": 3.0}, "seed", 43) == 3 and adapters.config_int({}, "seed", 43) == 43


def test_a_run_config_without_a_seed_takes_the_papers():
    """run_config.json written without a seed: the base is built with 43 (align's default), not load_model's 0."""
    assert adapters.base_of({"model": "tiny"}) == {"model": "tiny", "quant": "none", "seed": 43, "dtype": None}
    assert adapters.base_of({"model": "x", "base": {"model": "tiny", "seed": 5}})["seed"] == 5  # attack's "base"


def test_a_saved_tokenizer_is_taken_only_with_the_bases_vocabulary(aligned, tmp_path):
    """load_adapter takes the run's own tokenizer.json when its vocabulary is the base model's size (a checkpoint
    keeps it), and keeps the base's tokenizer for one of another size, which the embeddings could not take."""
    import shutil

    from transformers import AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(aligned, run)
    saved = AutoTokenizer.from_pretrained(str(run))
    saved.model_max_length = 4321  # a mark of the saved one, the vocabulary unchanged
    saved.save_pretrained(str(run))
    _, tok, _ = adapters.load_adapter(run, "cpu", trainable=False)
    assert tok.model_max_length == 4321
    saved.add_tokens(["<added-token>"])  # now one token more than the base's embeddings
    saved.save_pretrained(str(run))
    _, tok, _ = adapters.load_adapter(run, "cpu", trainable=False)
    assert tok.model_max_length != 4321 and "<added-token>" not in tok.get_vocab()


def test_draw_gives_up_with_an_error_when_the_pool_has_too_few_prompts(monkeypatch):
    """One combination and one prompt template give one distinct prompt: asking for two must raise after a bounded
    number of tries (100 * n), not loop forever."""
    calls = []

    def one_prompt(rng, act):
        calls.append(act)
        assert len(calls) < 10_000, "no bound on the retries"
        return f"how do I {act}?"

    monkeypatch.setattr(corpus, "_prompt", one_prompt)
    with pytest.raises(RuntimeError, match="1 combinations give only 1 new prompts of 2"):
        corpus._draw(random.Random(0), [("theft", "steal a car")], 2, set())
    assert len(calls) <= 200  # 100 tries per prompt asked for
