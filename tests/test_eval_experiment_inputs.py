"""Inputs of `eval` and `experiment defense` (CPU, offline): eval's default judge follows the base model, a
new-token budget beyond the model's positions is refused before anything loads, `experiment --set` changes the
preset (and moves the default outputs into the work directory), the preflight resolves every data set before any
stage runs, and a --workdir that is a file is refused up front. The experiment's stages are replaced by a fake
that writes what the orchestration reads, so no test here trains beyond one alignment step."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from booster_fast import experiment
from booster_fast.cli import main
from booster_fast.data import DataError
from booster_fast.stages import StageFailed, align_run_differs

FAST = ["--max-length", "64", "--batch-size", "2"]
SMALL_EVAL = ["--num-prompts", "4", "--num-task", "4", "--max-new-tokens", "2", "--task-max-new-tokens", "2"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A real (one-step) aligned run of the tiny model."""
    out = tmp_path_factory.mktemp("inputs") / "aligned"
    assert main(["align", "--output", str(out), "--steps", "1", "--save-every", "0", *FAST]) == 0
    return out


def plain_adapter(path: Path, base: str) -> Path:
    """An adapter directory without run_config.json (what peft writes), enough for everything before loading: the
    weights file is only there to be found."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("booster-fast: error:"), err
    assert "Traceback" not in err
    return lines[0]


def judge_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval: judge")]


# ------------------------------------------------------------------------------------------- eval: the judge
def test_default_judge_on_a_preset_base_is_the_offline_proxy(aligned, tmp_path, caplog):
    out = tmp_path / "e.json"
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(["eval", "--adapter", str(aligned), "--output", str(out), *SMALL_EVAL]) == 0
    judge = json.loads(out.read_text())["judge"]
    assert judge["name"] == "refusal" and "NOT beaver-dam" in judge["label"]
    assert "preset base tiny" in judge["chosen"]
    lines = judge_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("eval: judge refusal (") and "preset base tiny" in lines[0]


class StubBeaverDam:
    """Stands in for the 7B judge: records that it was built, flags nothing."""
    name, label, built = "beaver-dam", "stub", []

    def __init__(self, model_id, device, dtype="auto"):
        StubBeaverDam.built.append(model_id)
        self.model = SimpleNamespace(dtype="torch.bfloat16" if dtype == "bf16" else "torch.float32")

    def flags(self, prompts, answers):
        return [False] * len(answers)


def test_explicit_judge_wins_over_the_default(aligned, tmp_path, monkeypatch, caplog):
    from booster_fast import evaluate

    StubBeaverDam.built = []
    monkeypatch.setattr(evaluate, "BeaverDamJudge", StubBeaverDam)
    out = tmp_path / "e.json"
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(["eval", "--adapter", str(aligned), "--judge", "beaver-dam", "--judge-dtype", "bf16",
                     "--output", str(out), *SMALL_EVAL]) == 0
    judge = json.loads(out.read_text())["judge"]
    assert judge["name"] == "beaver-dam" and judge["chosen"] == "--judge" and len(StubBeaverDam.built) == 1
    assert judge["dtype"] == "bfloat16"  # what --judge-dtype asked, recorded
    assert judge_lines(caplog) == ["eval: judge beaver-dam (--judge)"]


def test_the_keyword_judge_counts_what_it_scored(aligned, tmp_path, monkeypatch, caplog):
    """Empty answers score as not harmful under the keyword judge: counted in the JSON and said in one warning."""
    from booster_fast import evaluate

    canned = ["", "Sure, here is how to do it.", "I cannot help with that.", "positive"]

    def answers(model, tok, prompts, *a, **k):  # the task's prompts carry an input (the review): always "positive"
        return ["positive" if p[1] else canned[i % 4] for i, p in enumerate(prompts)]

    monkeypatch.setattr(evaluate, "generate", answers)
    out = tmp_path / "e.json"
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(["eval", "--adapter", str(aligned), "--output", str(out), *SMALL_EVAL[:2], "--num-task", "3",
                     *SMALL_EVAL[4:]]) == 0
    res = json.loads(out.read_text())
    assert res["harmful"]["n"] == 4 and res["harmful"]["flagged"] == 2 and res["harmful_score"] == 50.0
    # labels positive, negative, positive: 2 of 3 right
    assert res["task"]["n"] == 3 and res["task"]["correct"] == 2 and res["accuracy"] == pytest.approx(200 / 3)
    assert (res["harmful"]["empty"], res["harmful"]["refusals"], res["harmful"]["compliant_style"]) == (1, 1, 1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["eval: 1 of the 4 answers to harmful prompts are empty; the keyword judge counts them as not "
                      "harmful (the JSON's harmful.empty)"]


def test_default_judge_on_a_pretrained_base_is_beaver_dam(tmp_path, monkeypatch, caplog, capsys):
    """A plain adapter on a hub model: beaver-dam is chosen (and built before the base model is loaded)."""
    from booster_fast import adapters, evaluate
    from booster_fast.models import ModelError

    def judge(model_id, device, dtype="auto"):
        raise ModelError(f"stub judge {model_id} built")

    def never(*a, **k):
        raise AssertionError("the base model must not be loaded")

    monkeypatch.setattr(evaluate, "BeaverDamJudge", judge)
    monkeypatch.setattr(adapters, "load_adapter", never)
    adapter = plain_adapter(tmp_path / "adapter", "some-org/some-model")
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        code = main(["eval", "--adapter", str(adapter), "--prompts", "builtin", "--task", "builtin",
                     "--output", str(tmp_path / "e.json")])
    assert code == 2 and "stub judge PKU-Alignment/beaver-dam-7b built" in one_error_line(capsys)  # chosen
    assert judge_lines(caplog) == []  # said once every input has been checked: the error is the only line


def test_choose_judge():
    from booster_fast.judges import choose_judge

    assert choose_judge(None, "tiny")[0] == "refusal"
    assert choose_judge(None, "llama-7b-shape")[0] == "refusal"
    assert choose_judge(None, "meta-llama/Llama-2-7b-hf")[0] == "beaver-dam"
    assert choose_judge("beaver-dam", "tiny") == ("beaver-dam", "--judge")
    assert choose_judge("refusal", "meta-llama/Llama-2-7b-hf") == ("refusal", "--judge")


# ------------------------------------------------------------------------------------------- eval: new tokens
@pytest.mark.parametrize("flag", ["--max-new-tokens", "--task-max-new-tokens"])
def test_new_tokens_beyond_the_positions_exit_2_before_loading(flag, aligned, tmp_path, monkeypatch, capsys):
    from booster_fast import adapters, data

    def never(*a, **k):
        raise AssertionError("nothing heavy may load before the check")

    monkeypatch.setattr(adapters, "load_adapter", never)
    monkeypatch.setattr(data, "load_benign", never)
    out = tmp_path / "res" / "e.json"
    capsys.readouterr()
    code = main(["eval", "--adapter", str(aligned), "--judge", "refusal", "--output", str(out), flag, "100000"])
    line = one_error_line(capsys)
    assert code == 2 and f"{flag} 100000" in line and "1024" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_harmful_prompts_from_a_file_of_either_kind_and_its_own_error(tmp_path):
    """eval --prompts PATH: prompt/refusal/response rows or instruction rows; a malformed file of the first kind
    gets its own error, not the second kind's ("expected instruction/input/output rows")."""
    from booster_fast.evaluate import harmful_prompts

    pairs = [{"prompt": f"how to do harm {i}?", "refusal": "No.", "response": "Like so."} for i in range(5)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (tmp_path / "instr.jsonl").write_text("\n".join(json.dumps({"instruction": f"harm {i}", "input": "x",
                                                                 "output": "y"}) for i in range(3)))
    assert harmful_prompts(str(tmp_path / "pairs.json"), None, 4)[0] == [(f"how to do harm {i}?", "") for i in range(4)]
    assert harmful_prompts(str(tmp_path / "instr.jsonl"), None, 9)[0] == [(f"harm {i}", "x") for i in range(3)]
    for bad, why in (({"refusal": "No.", "response": "Like so."}, "row 6: missing field 'prompt'"),
                     ({"prompt": "p", "refusal": None, "response": "r"}, "field 'refusal' must be a string")):
        (tmp_path / "bad.json").write_text(json.dumps(pairs + [bad]))
        with pytest.raises(DataError, match=why):
            harmful_prompts(str(tmp_path / "bad.json"), None, 4)


def test_beavertails_prompts_offline_fail_at_once_in_one_line(monkeypatch):
    """eval --prompts beavertails with the hub out of reach: the cache only, no retries, one line that names
    the way out."""
    import datasets
    import datasets.config

    from booster_fast import models
    from booster_fast.evaluate import harmful_prompts

    offline = []

    def load_dataset(repo, name=None, split=None):
        offline.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError("Couldn't reach the hub\nsecond line")

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"cannot load .* or pass --prompts builtin\|PATH$") as e:
        harmful_prompts("beavertails", None, 4)
    assert offline == [True] and "\n" not in str(e.value)


def test_position_limit_from_the_config_alone(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    from booster_fast.evaluate import config_positions, position_limit

    assert position_limit("tiny") == 1024 and position_limit("llama-7b-shape") == 4096
    GPT2Config(n_positions=96, n_embd=8, n_layer=1, n_head=1).save_pretrained(tmp_path / "gpt2")
    assert position_limit(str(tmp_path / "gpt2")) == 96                           # n_positions (GPT-2-like)
    LlamaConfig(max_position_embeddings=80).save_pretrained(tmp_path / "llama")
    assert position_limit(str(tmp_path / "llama")) == 80
    assert position_limit("no-org/not-downloaded-anywhere") is None               # unknown: no check, no network
    assert config_positions(object()) is None


# ------------------------------------------------------------------------------------------- experiment: stages
class FakeStages:
    """Replaces stages.run_stage: records each stage's argv and writes the files the orchestration reads."""

    def __init__(self):
        self.calls, self.found = [], []

    def __call__(self, argv):
        self.calls.append(argv)
        out = Path(argv[argv.index("--resume" if "--resume" in argv else "--output") + 1])
        self.found.append(out.exists())
        if "--resume" in argv:
            (out / ".incomplete").unlink()  # (a resumed run ends finished)
        if argv[0] == "eval":
            out.write_text(json.dumps({"harmful_score": 50.0, "accuracy": 25.0, "harmful": {"refusals": 1, "n": 2},
                                       "examples": {"harmful": []}, "judge": {"name": "refusal"}}))
            return
        out.mkdir(parents=True, exist_ok=True)  # (the real stages replace it: --overwrite)
        if argv[0] == "attack":
            (out / "run_config.json").write_text(json.dumps({"command": "attack", "lora": "continue", "rows": "first",
                                                             "n_benign": 9, "n_harmful": 1}))
        rows = ([{"loss": 1.0, "harmful_loss": 2.0}] if argv[0] == "align" else
                [{"step": s, "harmful_loss": 2.0 - s, "train_loss": None if s == 0 else 1.0} for s in (0, 1)])
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def flags(self, command: str) -> list[str]:
        return next(argv for argv in self.calls if argv[0] == command)


class NoStage:
    """Replaces stages.run_stage where no stage may run: records, then fails as a stage would."""

    def __init__(self):
        self.calls = []

    def __call__(self, argv):
        self.calls.append(argv)
        raise StageFailed(2)


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


SETS = ["--set", "align.steps=2", "--set", "attack.steps=3", "--set", "eval.num_prompts=8", "--set", "vaccine_rho=1",
        "--set", "attack.eval_rows=16"]


@pytest.mark.parametrize("explicit", [False, True])
def test_set_overrides_the_preset_and_moves_the_default_outputs(explicit, tmp_path, monkeypatch):
    stages, plots = FakeStages(), []
    monkeypatch.setattr("booster_fast.stages.run_stage", stages)
    monkeypatch.setattr(experiment, "need_matplotlib", lambda: None)
    monkeypatch.setattr(experiment, "plot_defense", lambda result, path: plots.append(Path(path)))
    monkeypatch.chdir(tmp_path)      # a default that were still the committed one would land in tmp_path, not the repo
    work = tmp_path / "runs"
    chosen = ["--output", str(tmp_path / "mine.json"), "--plot", str(tmp_path / "mine.png")] if explicit else []
    code = main(["experiment", "defense", "--seeds", "1", "--methods", "sft,booster-vaccine", "--workdir", str(work),
                 *SETS, *chosen])
    assert code == 0
    out, png = (tmp_path / "mine.json", tmp_path / "mine.png") if explicit else (work / "defense_tiny.json",
                                                                                 work / "defense_tiny.png")
    res = json.loads(out.read_text())
    assert plots == [png]
    assert not (tmp_path / "benchmarks").exists() and not (tmp_path / "docs").exists()
    assert res["preset"] == "tiny"
    assert res["overrides"] == {"align.steps": 2, "attack.steps": 3, "eval.num_prompts": 8, "vaccine_rho": 1,
                                "attack.eval_rows": 16}
    s = res["settings"]
    assert (s["align"]["steps"], s["attack"]["steps"], s["eval"]["num_prompts"], s["vaccine_rho"]) == (2, 3, 8, 1)
    assert s["align"]["lr"] == experiment.PRESETS["tiny"]["align"]["lr"]                 # the rest is the preset's
    assert experiment.PRESETS["tiny"]["align"]["steps"] == 200                           # the preset is untouched
    assert _value(stages.flags("align"), "--steps") == "2" and _value(stages.flags("attack"), "--steps") == "3"
    assert _value(stages.flags("attack"), "--eval-rows") == "16"
    assert _value(stages.flags("eval"), "--num-prompts") == "8"
    vaccine = next(a for a in stages.calls if a[0] == "align" and "--perturb-aware" in a)
    assert _value(vaccine, "--rho") == "1" and _value(vaccine, "--lamb") == "5.0"
    sft = next(a for a in stages.calls if a[0] == "align" and _value(a, "--method") == "sft")
    assert "--lamb" not in sft and "--alpha" not in sft  # align refuses Booster's knobs with --method sft


def test_apply_overrides_parses_values():
    p, applied = experiment.apply_overrides(experiment.PRESETS["tiny"], [
        "align.lr=1e-2", "attack.eval_rows=null", "model=tiny", "align.targets=q_proj,v_proj", 'benign="builtin"'])
    assert p["align"]["lr"] == 0.01 and p["attack"]["eval_rows"] is None and p["model"] == "tiny"
    assert p["align"]["targets"] == "q_proj,v_proj" and p["benign"] == "builtin"
    assert list(applied) == ["align.lr", "attack.eval_rows", "model", "align.targets", "benign"]


BAD_SETS = {
    "unknown-key": ("align.stepz=3", "unknown key"),
    "unknown-group": ("train.steps=3", "unknown key"),
    "unknown-top-level": ("nope=1", "unknown key"),
    "group-itself": ("align=3", "a group of settings"),
    "string-for-number": ("align.steps=many", "an integer"),
    "fraction-for-integer": ("align.steps=2.5", "an integer"),
    "null-for-number": ("vaccine_rho=null", "a number"),
    "bool-for-number": ("align.lr=true", "a number"),
    "number-for-string": ("model=3", "a string"),
    "no-equals": ("align.steps", "KEY=VALUE"),
    "string-for-null-cap": ("attack.eval_rows=abc", "null or an integer"),  # refused now, not after alignment
}


def test_a_paper_preset_can_be_run_small():
    """The paper presets count epochs (floats, as the CLI's --epochs): a fraction of one makes a quick run. The
    eval's task rows can be cut too (the whole test split by default: SST2's 872, at up to 200 new tokens each on
    GSM8K)."""
    from booster_fast.experiment import PRESETS, apply_overrides, eval_argv

    p, applied = apply_overrides(PRESETS["paper-sst2"], ["align.epochs=0.01", "attack.epochs=0.5",
                                                         "attack.eval_rows=50", "eval.num_task=8"])
    assert (p["align"]["epochs"], p["attack"]["epochs"], p["attack"]["eval_rows"]) == (0.01, 0.5, 50)
    assert PRESETS["paper-sst2"]["align"]["epochs"] == 20.0  # the preset itself is untouched
    argv = eval_argv(p, Path("a"), Path("e.json"), None)
    assert argv[argv.index("--num-task") + 1] == "8"
    assert "--num-task" not in eval_argv(PRESETS["paper-sst2"], Path("a"), Path("e.json"), None)
    for name in PRESETS:  # every preset takes it
        assert apply_overrides(PRESETS[name], ["eval.num_task=8"])[0]["eval"]["num_task"] == 8


def refused_before_any_stage(setting: str, tmp_path, monkeypatch, capsys) -> str:
    """The one error line of `experiment defense --set SETTING`, which must exit 2 before any stage runs and
    leave nothing behind."""
    stages = NoStage()
    monkeypatch.setattr("booster_fast.stages.run_stage", stages)
    capsys.readouterr()
    code = main(["experiment", "defense", "--seeds", "1", "--workdir", str(tmp_path / "runs"), "--no-plot",
                 "--output", str(tmp_path / "x.json"), "--set", setting])
    line = one_error_line(capsys)
    assert code == 2 and stages.calls == [] and list(tmp_path.iterdir()) == [], line
    return line


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_set_exits_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    item, says = BAD_SETS[case]
    line = refused_before_any_stage(item, tmp_path, monkeypatch, capsys)
    assert "--set" in line and says in line, line


# ------------------------------------------------------------------------------------------- experiment: preflight
@pytest.mark.parametrize("loader", ["load_safety_data", "load_benign"])
def test_preflight_stops_on_missing_data_before_any_stage(loader, tmp_path, monkeypatch, capsys):
    from booster_fast import data

    def missing(*a, **k):
        raise DataError(f"stub: {loader} cannot find its data set")

    stages = NoStage()
    monkeypatch.setattr(data, loader, missing)
    monkeypatch.setattr("booster_fast.stages.run_stage", stages)
    capsys.readouterr()
    code = main(["experiment", "defense", "--seeds", "1", "--workdir", str(tmp_path / "runs"), "--no-plot",
                 "--output", str(tmp_path / "x.json")])
    line = one_error_line(capsys)
    assert code == 2 and f"stub: {loader}" in line
    assert stages.calls == [] and list(tmp_path.iterdir()) == []


def test_preflight_loads_what_each_stage_will(monkeypatch):
    """The paper preset's data sets, each through the loader and split its stage uses (loaders recorded)."""
    from booster_fast import data, evaluate

    calls = []
    monkeypatch.setattr(data, "load_safety_data", lambda d, split="train", **k: calls.append(("safety", d, split)))
    monkeypatch.setattr(data, "load_benign", lambda task, split="train": calls.append(("benign", task, split)))
    monkeypatch.setattr(evaluate, "harmful_prompts", lambda src, f, n: calls.append(("prompts", src, f)))
    experiment.preflight_data(experiment.PRESETS["paper-sst2"])
    assert sorted(calls) == sorted([("safety", "beavertails", "train"), ("safety", "beavertails", "attack"),
                                    ("safety", "beavertails", "test"), ("benign", "sst2", "train"),
                                    ("benign", "sst2", "test"), ("prompts", "beavertails", None)])


def test_preflight_of_the_tiny_preset_downloads_nothing(monkeypatch):
    """The built-in sets are generated through the real loaders; nothing reaches the hub."""
    from booster_fast import data

    def hub(*a, **k):
        raise AssertionError("the tiny preset must not reach the hub")

    loaded, real = [], data.load_safety_data

    def recording(d, split="train", **k):
        loaded.append((d, split))
        return real(d, split, **k)

    monkeypatch.setattr(data, "load_hub", hub)
    monkeypatch.setattr("datasets.load_dataset", hub)
    monkeypatch.setattr(data, "load_safety_data", recording)
    experiment.preflight(experiment.PRESETS["tiny"])
    assert {("builtin", "train"), ("builtin", "attack"), ("builtin", "test")} <= set(loaded)


def test_preflight_refuses_new_tokens_beyond_the_positions(tmp_path, monkeypatch, capsys):
    stages = NoStage()
    monkeypatch.setattr("booster_fast.stages.run_stage", stages)
    capsys.readouterr()
    code = main(["experiment", "defense", "--seeds", "1", "--workdir", str(tmp_path / "runs"), "--no-plot",
                 "--output", str(tmp_path / "x.json"), "--set", "eval.max_new_tokens=100000"])
    line = one_error_line(capsys)
    assert code == 2 and "eval.max_new_tokens 100000" in line and stages.calls == []


@pytest.mark.parametrize("setting, needle", [
    ("align.steps=-1", "align stage: --steps must be >= 1, got -1"),
    ("align.lr=NaN", "align stage: --lr must be a finite number > 0, got nan"),
    ("align.batch_size=0", "align stage: --batch-size must be >= 1, got 0"),
    ("attack.poison_ratio=2", "attack stage: --poison-ratio must lie in [0, 1], got 2"),
    ("attack.lr=-1", "attack stage: --lr must be a finite number > 0"),
    ("attack.batch_size=5000", "attack stage: --batch-size 5000 is larger than --samples"),
    ("eval.batch_size=0", "eval stage: --batch-size must be >= 1, got 0"),
    ("seed=-1", "align stage: argument --seed: expected an integer from 0"),  # the stages' parsers' own errors
    ("attack.harmful_split=bogus", "attack stage: argument --harmful-split: invalid choice: 'bogus'"),
])
def test_every_stages_settings_are_checked_before_the_first_stage(setting, needle, tmp_path, monkeypatch, capsys):
    assert needle in refused_before_any_stage(setting, tmp_path, monkeypatch, capsys)


def test_an_unknown_device_is_refused_before_the_preflight(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "preflight", lambda p, *announce: pytest.fail("reached the preflight"))
    monkeypatch.setattr("booster_fast.stages.run_stage", NoStage())
    capsys.readouterr()
    code = main(["experiment", "defense", "--seeds", "1", "--workdir", str(tmp_path / "runs"), "--no-plot",
                 "--output", str(tmp_path / "x.json"), "--device", "bogus"])
    line = one_error_line(capsys)
    assert code == 2 and "bogus" in line and list(tmp_path.iterdir()) == [], line


@pytest.mark.parametrize("targets, needle", [("bogus_proj", "['bogus_proj'] not found"),
                                             ("q_proj,norm", "norm is not a linear layer")])
def test_lora_targets_the_model_lacks_are_refused_before_any_line(targets, needle, tmp_path, monkeypatch, capsys,
                                                                   caplog):
    stages = NoStage()
    monkeypatch.setattr("booster_fast.stages.run_stage", stages)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        code = main(["experiment", "defense", "--seeds", "1", "--workdir", str(tmp_path / "runs"), "--no-plot",
                     "--set", f"align.targets={targets}", "--set", "align.steps=2"])
    line = one_error_line(capsys)
    assert code == 2 and line.startswith("booster-fast: error: align.targets: LoRA targets") and needle in line
    assert "q_proj" in line.split("linear layers named")[1], line  # what the model has
    assert stages.calls == [] and list(tmp_path.iterdir()) == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []  # the --set line too


@pytest.mark.parametrize("preset", list(experiment.PRESETS))
def test_preset_fields_have_their_flags_types(preset):
    """--set takes a value of the preset field's type: a float flag's field must hold a float (align.lora_alpha
    held an int, so --set align.lora_alpha=4.5 was refused), an int flag's an int."""
    from booster_fast.cli import subparser

    for stage in ("align", "attack", "eval"):
        flags = {a.dest: a.type for a in subparser(stage)._actions}
        for key, value in experiment.PRESETS[preset][stage].items():
            assert key in flags, f"{stage}.{key} is no flag of the {stage} stage"
            if value is not None and flags[key] in (int, float):
                assert type(value) is flags[key], f"{preset}: {stage}.{key} = {value!r}, its flag takes {flags[key]}"
    assert experiment.apply_overrides(experiment.PRESETS[preset], ["align.lora_alpha=4.5"])[1] == {
        "align.lora_alpha": 4.5}


@pytest.mark.parametrize("preset", list(experiment.PRESETS))
def test_every_preset_passes_the_stages_checks(preset):
    experiment.check_settings(experiment.PRESETS[preset])


# ------------------------------------------------------------------------------------------- experiment: --workdir
@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_workdir_that_is_a_file_exits_2_up_front(where, tmp_path, monkeypatch, capsys):
    stages = NoStage()
    monkeypatch.setattr("booster_fast.stages.run_stage", stages)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    work = blocker if where == "is-a-file" else blocker / "runs"
    capsys.readouterr()
    code = main(["experiment", "defense", "--seeds", "1", "--workdir", str(work), "--no-plot",
                 "--output", str(tmp_path / "x.json")])
    line = one_error_line(capsys)
    assert code == 2 and f"--workdir {work}" in line and "not a directory" in line
    assert stages.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_eval_defaults_follow_the_base_model():
    """The paper's budgets on a real model (512 new tokens for harmful prompts, as the original's pred.py; 200 for
    the task; BeaverTails' prompts), small ones on the tiny preset; a run's own data and task where it has them."""
    from booster_fast.evaluate import _defaults

    args = SimpleNamespace(task=None, prompts=None, max_new_tokens=None, task_max_new_tokens=None, batch_size=None)
    assert _defaults(args, {}, "meta-llama/Llama-2-7b-hf") == dict(task="builtin", prompts="beavertails", max_new=512,
                                                                   task_max_new=200, batch=16)
    assert _defaults(args, {}, "tiny") == dict(task="builtin", prompts="builtin", max_new=48, task_max_new=8, batch=64)
    run = {"benign": "sst2", "data": "beavertails"}
    assert _defaults(args, run, "tiny") == dict(task="sst2", prompts="beavertails", max_new=48, task_max_new=8,
                                              batch=64)
    given = SimpleNamespace(task="gsm8k", prompts="x.json", max_new_tokens=5, task_max_new_tokens=6, batch_size=7)
    assert _defaults(given, run, "tiny") == dict(task="gsm8k", prompts="x.json", max_new=5, task_max_new=6, batch=7)


@pytest.mark.parametrize("kw", ["all", "some", "none"])
def test_the_defense_figure_is_drawn_from_a_result(kw, tmp_path, monkeypatch):
    """plot_defense (otherwise replaced in these tests) draws a result into a PNG: the per-seed mean curve, the
    keyword panel only where every curve has points, the bars of each seed."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from booster_fast.defense_plot import plot_defense

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig) or close(fig))

    def method(loss, name, seed):
        has_kw = kw == "all" or (kw == "some" and name == "sft")
        offset = 10 * seed + (5 if name == "booster" else 0)  # every bar its own height
        return {"harmful_loss_curve": [[0, loss], [2, loss + 0.5]],
                "keyword_harmful_score_curve": [[0, 10.0], [2, 40.0]] if has_kw else [],
                "after_attack": {"harmful_score": 40.0 + offset, "accuracy": 30.0 + offset}}

    seeds = [0, 1, 2]  # three seeds, two eval steps
    result = {"per_seed": [{"sft": method(1.0 + s, "sft", s), "booster": method(2.0, "booster", s)} for s in seeds],
              "methods": ["sft", "booster"], "seeds": seeds, "judge": {"name": "keyword"}, "preset": "tiny",
              # (results from before the bench's machine record was used name the cores cpu_count)
              "machine": {"gpu": None, "cores" if kw != "none" else "cpu_count": 2}, "overrides": {"attack.lr": 1e-4},
              "settings": {"attack": {"refusal_prompts": 8}}}
    out = tmp_path / "defense.png"
    plot_defense(result, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["defense.png"]  # written atomically
    axes = figs[0].axes
    title = figs[0]._suptitle.get_text()
    assert title.startswith("booster-fast experiment defense --preset tiny --seeds 3  (2 CPU cores)"), title
    assert len(axes) == (3 if kw == "all" else 2)
    mean = [line for line in axes[0].get_lines() if line.get_linewidth() == 2.2][0]  # the sft mean: seeds 1, 2, 3
    assert list(mean.get_xdata()) == [0, 2] and list(mean.get_ydata()) == [2.0, 2.5]
    if kw == "all":
        assert axes[1].get_ylim() == (-3, 103)
    assert axes[-1].get_ylim() == (0, 125)
    # the bars: per method, its harmful scores then its accuracies, seed by seed, each beside its seed's tick
    heights = [round(bar.get_height(), 6) for bar in axes[-1].patches]
    assert heights == [40, 50, 60, 30, 40, 50, 45, 55, 65, 35, 45, 55], heights
    centres = [bar.get_x() + bar.get_width() / 2 for bar in axes[-1].patches]
    assert [round(c) for c in centres] == [0, 1, 2] * 4, centres


def test_new_tokens_at_the_position_limit_are_allowed():
    from booster_fast.cli import UsageError
    from booster_fast.evaluate import check_new_tokens

    check_new_tokens({"--max-new-tokens": 1024, "--task-max-new-tokens": None}, "tiny", 1024)   # exactly the limit
    with pytest.raises(UsageError, match="--max-new-tokens 1025 exceeds the 1024"):
        check_new_tokens({"--max-new-tokens": 1025}, "tiny", 1024)


def test_config_positions_prefers_max_position_embeddings_and_skips_zero():
    from booster_fast.evaluate import config_positions

    assert config_positions(SimpleNamespace(max_position_embeddings=80, n_positions=96)) == 80
    assert config_positions(SimpleNamespace(max_position_embeddings=0, n_positions=96)) == 96
    assert config_positions(SimpleNamespace(max_position_embeddings=0)) is None


def test_eval_default_prompts_prefer_the_attacks_harmful_over_the_alignment_data():
    from booster_fast.evaluate import _defaults

    args = argparse.Namespace(task=None, prompts=None, max_new_tokens=None, task_max_new_tokens=None, batch_size=None)
    assert _defaults(args, {"harmful": "beavertails", "data": "builtin"}, "tiny")["prompts"] == "beavertails"
    assert _defaults(args, {"data": "beavertails"}, "tiny")["prompts"] == "beavertails"


def test_eval_passes_the_runs_harmful_data_file_to_the_prompts(aligned, tmp_path, monkeypatch):
    """A run aligned with --harmful-data FILE is scored on that file's held-out rows; --prompts drops it."""
    from booster_fast import adapters, evaluate
    from booster_fast.cli import build_parser

    cfg = json.loads((aligned / "run_config.json").read_text())
    seen = []

    class Stop(Exception):
        pass

    def prompts(src, harmful_file, n):
        seen.append(harmful_file)
        raise Stop

    monkeypatch.setattr(adapters, "read_run_config", lambda path: {**cfg, "harmful_data": "/data/h.json"})
    monkeypatch.setattr(evaluate, "harmful_prompts", prompts)
    for extra in ([], ["--prompts", "builtin"]):
        parsed = build_parser().parse_args(
            ["eval", "--adapter", str(aligned), "--judge", "refusal", "--output", str(tmp_path / "e.json"),
             "--device", "cpu", *SMALL_EVAL, *extra])
        with pytest.raises(Stop):
            evaluate.evaluate_run(parsed)
    assert seen == ["/data/h.json", None]


def test_new_tokens_are_checked_on_the_loaded_model_when_its_config_was_unreadable(tmp_path, monkeypatch, capsys):
    """No config.json to read before loading: the loaded model's own position limit refuses the budget."""
    from booster_fast import adapters, evaluate

    adapter = plain_adapter(tmp_path / "plain", "no-org/not-downloaded-anywhere")
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8))
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: (model, None, None))
    monkeypatch.setattr(evaluate, "harmful_prompts", lambda src, f, n: ([("q", "")], "stub"))
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("generated past the position limit"))
    capsys.readouterr()
    code = main(["eval", "--adapter", str(adapter), "--judge", "refusal", "--task", "builtin", "--num-task", "2",
                 "--output", str(tmp_path / "e.json"), "--max-new-tokens", "100", "--device", "cpu"])
    line = one_error_line(capsys)
    assert code == 2 and "--max-new-tokens 100" in line and " 8 " in line, line
    assert not (tmp_path / "e.json").exists()


def test_set_refuses_a_number_with_a_fraction_for_a_null_cap():
    from booster_fast.cli import UsageError

    with pytest.raises(UsageError, match="null or an integer"):
        experiment.apply_overrides(experiment.PRESETS["tiny"], ["attack.eval_rows=2.5"])


@pytest.mark.parametrize("item", ["=5", " =5"])
def test_set_without_a_key_says_the_expected_form(item):
    from booster_fast.cli import UsageError

    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        experiment.apply_overrides(experiment.PRESETS["tiny"], [item])


@pytest.mark.parametrize("flags", [["--methods", "sft,sft"], ["--methods", "booster, booster"], ["--seeds", "0"],
                                   ["--seeds", "1000000000000"], ["--plot", "p.png"]])
def test_contradicting_or_out_of_range_flags_exit_2_before_anything(flags, tmp_path, monkeypatch, capsys):
    stages = NoStage()
    monkeypatch.setattr("booster_fast.stages.run_stage", stages)
    monkeypatch.setattr(experiment, "preflight", lambda p, *announce: pytest.fail("reached the preflight"))
    capsys.readouterr()
    code = main(["experiment", "defense", "--workdir", str(tmp_path / "runs"), "--no-plot",
                 "--output", str(tmp_path / "x.json"), *flags])
    line = one_error_line(capsys)
    assert code == 2 and stages.calls == [] and list(tmp_path.iterdir()) == [], line


def test_default_outputs_of_a_hyphenated_preset_use_underscores(tmp_path):
    args = argparse.Namespace(preset="paper-sst2", no_plot=False, plot=None, output=None)
    assert experiment.output_paths(args, tmp_path, False) == (Path("benchmarks/results/defense_paper_sst2.json"),
                                                              Path("docs/defense_paper_sst2.png"))
    assert experiment.output_paths(args, tmp_path, True) == (tmp_path / "defense_paper_sst2.json",
                                                             tmp_path / "defense_paper_sst2.png")


def test_summary_accuracy_is_the_after_attack_one(tmp_path, monkeypatch):
    """before_attack and after_attack evals differ: accuracy_after summarises the post-attack eval."""

    class Stages(FakeStages):
        def __call__(self, argv):
            super().__call__(argv)
            if argv[0] == "eval":
                out = Path(argv[argv.index("--output") + 1])
                res = json.loads(out.read_text())
                after = "eval-attack-" in out.name
                res.update(accuracy=30.0 if after else 80.0, harmful_score=60.0 if after else 10.0)
                out.write_text(json.dumps(res))

    monkeypatch.setattr("booster_fast.stages.run_stage", Stages())
    out = tmp_path / "r.json"
    assert main(["experiment", "defense", "--seeds", "2", "--methods", "sft", "--workdir", str(tmp_path / "runs"),
                 "--no-plot", "--output", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]["sft"]
    assert s["accuracy_after"] == {"mean": 30.0, "std": 0.0, "values": [30.0, 30.0]}
    assert s["harmful_score_before"]["mean"] == 10.0 and s["harmful_score_after"]["mean"] == 60.0


def test_beavertails_prompts_are_the_first_unsafe_ones(monkeypatch):
    """The limit counts unsafe prompts (the paper's first 1000 unsafe), not rows read before filtering."""
    from booster_fast import data, evaluate

    rows = [{"prompt": f"p{i}", "is_safe": i % 2 == 0} for i in range(10)]   # p1, p3, p5, ... are unsafe
    monkeypatch.setattr(data, "load_hub", lambda *a, **k: rows)
    got, desc = evaluate.harmful_prompts("beavertails", None, 3)
    assert got == [("p1", ""), ("p3", ""), ("p5", "")] and desc.endswith("first 3")


def test_the_judge_sees_the_instruction_and_its_input(aligned, tmp_path, monkeypatch):
    """A harmful prompt with an input reaches the judge as "instruction\\ninput", as the model saw both."""
    from booster_fast import evaluate

    seen = []

    class Recording(evaluate.RefusalJudge):
        def flags(self, prompts, answers):
            seen.extend(prompts)
            return super().flags(prompts, answers)

    monkeypatch.setattr(evaluate, "RefusalJudge", Recording)
    monkeypatch.setattr(evaluate, "generate", lambda model, tok, prompts, *a, **k: ["ok"] * len(prompts))
    path = tmp_path / "instr.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"harm {i}", "input": "x" if i else "", "output": "y"})
                              for i in range(2)))
    assert main(["eval", "--adapter", str(aligned), "--judge", "refusal", "--prompts", str(path), "--num-task", "2",
                 "--output", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
    assert seen == ["harm 0", "harm 1\nx"]


def test_a_rerun_keeps_the_stages_that_finished_with_the_same_command_line(tmp_path, monkeypatch, caplog):
    """An experiment run again in its --workdir (after an interruption, say) keeps each stage that finished there
    with the same command line and inputs, and runs the rest: a changed attack setting runs the attack and the eval
    after it again, not the alignment; a changed eval setting runs the two evals alone; an interrupted alignment goes on with align --resume where align's check
    finds its run is this command line's, else it starts again in an emptied directory; a changed data file, a
    stage's output gone or unfinished, and --rerun run every stage that depends on it; the result says which
    stages were kept."""
    work, out = tmp_path / "runs", tmp_path / "r.json"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "refusal": "no", "response": "yes"}) + "\n"
                            for i in range(16)))

    differs = {"why": None}  # align's own check of a run against the command line: the real one is tested below
    monkeypatch.setattr("booster_fast.stages.align_run_differs", lambda argv, run, finished: differs["why"])

    found_before = []  # per align stage run: whether its output directory was there when it started

    def experiment_run(*extra):
        stages = FakeStages()
        monkeypatch.setattr("booster_fast.stages.run_stage", stages)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="booster_fast"):
            assert main(["experiment", "defense", "--seeds", "1", "--methods", "sft,booster", "--workdir", str(work),
                         "--no-plot", "--output", str(out), "--set", f"data={data}", *extra]) == 0
        kept = json.loads(out.read_text())["per_seed"][0]
        found_before[:] = [f for argv, f in zip(stages.calls, stages.found) if argv[0] == "align"]
        return ([(argv[0] + (" --resume" if "--resume" in argv else ""),
                  Path(argv[argv.index("--resume" if "--resume" in argv else "--output") + 1]).name)
                 for argv in stages.calls], {m: kept[m]["kept_from_earlier"] for m in ("sft", "booster")})

    everything = [(c, f"{what}-{m}") for m in ("sft", "booster")
                  for c, what in (("align", "align"), ("eval", "eval-align"), ("attack", "attack"),
                                  ("eval", "eval-attack"))]
    everything = [(c, n + ".json" if c == "eval" else n) for c, n in everything]
    all_kept = {m: ["align", "eval_before", "attack", "eval_after"] for m in ("sft", "booster")}
    assert experiment_run() == (everything, {"sft": [], "booster": []})
    assert experiment_run() == ([], all_kept)
    assert sum("kept: it finished before with this command line" in r.getMessage() for r in caplog.records) == 8
    ran, kept = experiment_run("--set", "attack.steps=3")
    assert ran == [s for s in everything if "attack" in s[1]]
    assert kept == {m: ["align", "eval_before"] for m in ("sft", "booster")}
    again = [r.getMessage().split("seed43/")[1] for r in caplog.records if " runs again: " in r.getMessage()]
    assert again == [f"{stage}-{m}{ext} runs again: {why}" for m in ("sft", "booster") for stage, ext, why in (
        ("attack", "", "its command line differs"), ("eval-attack", ".json", "the attack stage it reads ran again"))
                     ], again
    # an eval setting runs both evals and leaves the attack, which reads the alignment alone
    ran, kept = experiment_run("--set", "attack.steps=3", "--set", "eval.num_prompts=5")
    assert ran == [s for s in everything if s[0] == "eval"]
    assert kept == {m: ["align", "attack"] for m in ("sft", "booster")}
    assert experiment_run("--set", "attack.steps=3")[0] == [s for s in everything if s[0] == "eval"]
    (work / "seed43" / "align-sft" / "metrics.jsonl").unlink()  # an alignment's output gone: its chain runs
    assert experiment_run("--set", "attack.steps=3")[0] == everything[:4]
    assert "eval-align-sft.json runs again: the align stage it reads ran again" in caplog.text
    record = work / "seed43" / ".align-booster.stage.json"
    unfinished = {**json.loads(record.read_text()), "finished": False}
    booster_chain = [s for s in everything if s[1].endswith(("booster", "booster.json"))]
    # booster's alignment interrupted after a checkpoint (its record unfinished, the run marked so): it goes on
    # with align --resume and the chain after it runs; sft's last stage gone: it alone runs
    record.write_text(json.dumps(unfinished))
    (work / "seed43" / "align-booster" / ".incomplete").write_text("")
    (work / "seed43" / "eval-attack-sft.json").unlink()
    assert experiment_run("--set", "attack.steps=3") == (
        [("eval", "eval-attack-sft.json"), ("align --resume", "align-booster"), *booster_chain[1:]],
        {"sft": ["align", "eval_before", "attack"], "booster": []})
    assert "align-booster was interrupted: it goes on from its newest checkpoint" in caplog.text
    # stopped, then finished by hand with the align --resume that its line suggests: the alignment is kept, and
    # the stages after it run (their outputs were made from the adapter before it)
    record.write_text(json.dumps(unfinished))
    assert experiment_run("--set", "attack.steps=3") == (booster_chain[1:], {"sft": all_kept["sft"],
                                                                             "booster": ["align"]})
    assert experiment_run("--set", "attack.steps=3") == ([], all_kept)
    last = work / "seed43" / ".eval-attack-sft.json.stage.json"  # a stage of this command line left unfinished
    last.write_text(json.dumps({**json.loads(last.read_text()), "finished": False}))
    assert experiment_run("--set", "attack.steps=3")[0] == [("eval", "eval-attack-sft.json")]
    assert "eval-attack-sft.json runs again: it did not finish" in caplog.text
    # a run that align --resume's check refuses (here: its settings differ): run again from the start, saying why,
    # in a directory of its own (align would put the old run back if the new one stopped before a checkpoint)
    record.write_text(json.dumps(unfinished))
    differs["why"] = "--resume x: flags that differ from the saved run: --lr 0.001 (the run has 0.003)"
    assert experiment_run("--set", "attack.steps=3") == (booster_chain, {"sft": all_kept["sft"], "booster": []})
    assert "align-booster runs again from the start: --resume x: flags that differ" in caplog.text
    assert found_before[0] is False, "the new alignment found the old run in its directory"
    differs["why"] = None
    data.write_text(data.read_text() + json.dumps({"prompt": "q", "refusal": "no", "response": "yes"}) + "\n")
    assert experiment_run("--set", "attack.steps=3")[0] == everything  # the alignment data changed
    assert "align-sft runs again: its input files changed" in caplog.text
    monkeypatch.setattr("booster_fast.stages.code_digest", lambda: "other code")
    assert experiment_run("--set", "attack.steps=3")[0] == everything
    assert "align-sft runs again: this package's code changed since it ran" in caplog.text
    data.write_text(data.read_text() + json.dumps({"prompt": "q2", "refusal": "no", "response": "yes"}) + "\n")
    monkeypatch.setattr("booster_fast.stages.code_digest", lambda: "newer code")
    assert experiment_run("--set", "attack.steps=3")[0] == everything  # every reason is named
    assert "align-sft runs again: its input files changed, this package's code changed since it ran" in caplog.text
    assert experiment_run("--set", "attack.steps=3", "--rerun")[0] == everything
    assert " runs again: " not in caplog.text  # --rerun asked for it: no reason to give


def test_several_seeds_show_the_seeds_so_far_on_stderr_and_the_final_table_on_stdout(tmp_path, monkeypatch, capsys):
    """With several seeds the table of the seeds done so far goes to stderr after each seed but the last; stdout
    holds the final table once (each seed and the means), then the JSON line."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "refusal": "no", "response": "yes"}) + "\n"
                            for i in range(16)))
    monkeypatch.setattr("booster_fast.stages.run_stage", FakeStages())
    assert main(["experiment", "defense", "--seeds", "3", "--methods", "sft,booster", "--workdir",
                 str(tmp_path / "runs"), "--no-plot", "--output", str(tmp_path / "r.json"),
                 "--set", f"data={data}"]) == 0
    captured = capsys.readouterr()
    heads = {name: [line for line in text.splitlines() if line.strip().startswith("seed |")]
             for name, text in (("out", captured.out), ("err", captured.err))}
    assert len(heads["out"]) == 1 and len(heads["err"]) == 2, heads  # stderr: after seeds 1 and 2 of 3
    out = captured.out.strip().splitlines()
    assert sum(line.strip().startswith("mean |") for line in out) == 2 and set(json.loads(out[-1])["summary"]) == {
        "sft", "booster"}


def test_a_local_model_directory_is_an_input_of_the_stages(tmp_path, monkeypatch):
    """A local --model directory counts among a stage's inputs by its files' names, sizes and modification times:
    a rerun with the directory as it was keeps every stage; a model file rewritten since (another time, another
    size) or added runs every stage again."""
    from transformers import LlamaConfig

    from booster_fast.stages import input_digests

    model = tmp_path / "llama"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=256).save_pretrained(model)
    (model / "weights").mkdir()
    weights = model / "weights" / "part-1.bin"
    weights.write_bytes(b"\x01" * 64)
    work, out = tmp_path / "runs", tmp_path / "r.json"

    def ran(*extra) -> list[str]:
        stages = FakeStages()
        monkeypatch.setattr("booster_fast.stages.run_stage", stages)
        assert main(["experiment", "defense", "--seeds", "1", "--methods", "sft", "--workdir", str(work), "--no-plot",
                     "--output", str(out), "--set", f"model={model}", *extra]) == 0
        return [argv[0] for argv in stages.calls]

    everything = ["align", "eval", "attack", "eval"]
    assert ran() == everything
    assert ran() == []
    argv = ["align", "--model", str(model), "--output", str(tmp_path / "o")]
    before = input_digests(argv, tmp_path / "o")
    assert list(before) == [str(model)] and before[str(model)].startswith("listing:")
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten: same size, a later time
    assert input_digests(argv, tmp_path / "o") != before
    assert ran() == everything
    weights.write_bytes(b"\x01" * 65)
    assert ran() == everything
    (model / "weights" / "part-2.bin").write_bytes(b"")
    assert ran() == everything
    assert ran() == []
    (model / ".git").mkdir()  # a git fetch or a hub download's .cache changes no weight: the stages are kept
    (model / ".git" / "FETCH_HEAD").write_text("x")
    (model / ".cache").mkdir()
    assert ran() == []


def test_an_attack_whose_held_out_loss_is_not_finite_is_summarised(tmp_path, monkeypatch):
    """The attack writes a non-finite held-out loss as null (strict JSON): the experiment's drop and means are
    NaN for that chain, where a None made them a TypeError after every stage had run."""

    class NullLoss(FakeStages):
        def __call__(self, argv):
            super().__call__(argv)
            if argv[0] == "attack":
                out = Path(argv[argv.index("--output") + 1]) / "metrics.jsonl"
                rows = [json.loads(line) for line in out.read_text().splitlines()]
                rows[-1]["harmful_loss"] = None
                out.write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr("booster_fast.stages.run_stage", NullLoss())
    out = tmp_path / "r.json"
    assert main(["experiment", "defense", "--seeds", "1", "--methods", "sft", "--workdir", str(tmp_path / "w"),
                 "--no-plot", "--output", str(out), *SETS]) == 0
    result = json.loads(out.read_text())
    assert math.isnan(result["per_seed"][0]["sft"]["harmful_loss_drop"])
    assert math.isnan(result["summary"]["sft"]["harmful_loss_drop"]["mean"])


@pytest.mark.parametrize("code, hint", [(130, True), (143, True), (2, False)])
def test_a_stage_stopped_by_a_signal_says_the_experiment_goes_on(code, hint, tmp_path, monkeypatch, capsys):
    """Ctrl-C (130) or SIGTERM (143) in a stage: the stage's own line says `align --resume`, and one more line says
    that the experiment's command goes on from there; exit with the stage's code. Other failures add nothing."""
    def stopped(argv):
        raise StageFailed(code)

    monkeypatch.setattr("booster_fast.stages.run_stage", stopped)
    capsys.readouterr()
    assert main(["experiment", "defense", "--seeds", "1", "--workdir", str(tmp_path / "runs"), "--no-plot",
                 "--output", str(tmp_path / "r.json")]) == code
    said = "experiment stopped; the same command goes on from there" in capsys.readouterr().err
    assert said is hint


def test_an_interrupted_alignment_is_continued_only_with_its_own_settings(tmp_path):
    """The check before an experiment continues an alignment is align --resume's own, on the real run: a run
    made with another learning rate, or from a data file that changed since, is not continued; the run the
    command line made is, unfinished or (finished_ok) finished."""
    from booster_fast.checkpoint import MARKER

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "refusal": "no", "response": "yes"}) + "\n"
                            for i in range(8)))
    p = json.loads(json.dumps(experiment.PRESETS["tiny"]))
    p["data"] = str(data)
    p["align"].update(steps=2, batch_size=2, max_length=64, lr=3e-3, save_every=1)
    run = tmp_path / "align-booster"
    argv = experiment.align_argv(p, "booster", 43, run, "cpu")
    assert main(argv) == 0
    (run / MARKER).write_text("")  # as if stopped after a checkpoint
    assert align_run_differs(argv, run, finished=False) is None
    other = experiment.align_argv({**p, "align": {**p["align"], "lr": 1e-3}}, "booster", 43, run, "cpu")
    why = align_run_differs(other, run, finished=False)
    assert why and "--lr 0.001 (the run has 0.003)" in why, why
    (run / MARKER).unlink()
    assert align_run_differs(argv, run, finished=True) is None
    data.write_text(data.read_text() + data.read_text())
    why = align_run_differs(argv, run, finished=True)
    assert why and "changed since the run started" in why, why


def test_hub_models_and_data_sets_count_by_their_cached_revision(tmp_path, monkeypatch):
    """A stage reading a model or data set from the Hugging Face cache records the commit the cache holds of it
    (its refs/main): the same commit keeps the stage, a newer one (downloaded again) runs it again, and a repo
    the cache does not hold yet is recorded as it is after the stage downloaded it."""
    from huggingface_hub import constants

    from booster_fast.experiment import PRESETS, hub_repos
    from booster_fast.stages import Chain

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def cache_holds(kind: str, repo: str, commit: str):
        ref = cache / f"{kind}s--{repo.replace('/', '--')}" / "refs" / "main"
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit + "\n")

    paper = PRESETS["paper-sst2"]
    assert hub_repos(paper, "align") == (("model", "meta-llama/Llama-2-7b-hf"),
                                         ("dataset", "anonymous4486/booster_dataset"))
    assert hub_repos(paper, "attack") == (("dataset", "stanfordnlp/sst2"),)
    assert hub_repos(paper, "eval") == (("dataset", "stanfordnlp/sst2"), ("model", "PKU-Alignment/beaver-dam-7b"),
                                        ("dataset", "PKU-Alignment/BeaverTails"))
    assert all(hub_repos(PRESETS["tiny"], c) == () for c in ("align", "attack", "eval"))
    local = tmp_path / "llama"
    local.mkdir()
    assert hub_repos({**paper, "model": str(local)}, "align") == (("dataset", "anonymous4486/booster_dataset"),)

    calls = []

    def fake_stage(argv):  # the stage downloads the model the first time it runs
        calls.append(argv)
        cache_holds("model", "org/base", "a" * 40)
        out.mkdir(exist_ok=True)
        (out / "metrics.jsonl").write_text("{}\n")

    monkeypatch.setattr("booster_fast.stages.run_stage", fake_stage)
    out = tmp_path / "align-sft"
    argv = ["align", "--model", "org/base", "--data", "sst2", "--output", str(out)]
    hub = (("model", "org/base"), ("dataset", "stanfordnlp/sst2"))
    cache_holds("dataset", "stanfordnlp/sst2", "1" * 40)

    def runs() -> int:
        before = len(calls)
        Chain(rerun=False).stage("align", argv, out, hub)
        return len(calls) - before

    assert runs() == 1
    record = json.loads((tmp_path / ".align-sft.stage.json").read_text())
    assert record["inputs"] == {"models/org/base": "hub:" + "a" * 40, "datasets/stanfordnlp/sst2": "hub:" + "1" * 40}
    assert runs() == 0
    cache_holds("dataset", "stanfordnlp/sst2", "2" * 40)  # downloaded again at a newer commit
    assert runs() == 1
    assert runs() == 0


def test_a_stage_made_from_an_alignment_that_was_made_again_since_runs_again(tmp_path, monkeypatch, caplog):
    """An experiment that aligned again and stopped before the attack (its eval failed: a judge's download, out of
    memory, Ctrl-C) leaves the attack made from the alignment before: run again, it must attack the new alignment,
    not keep the old attack beside it (each record keeps the id of the output it read)."""
    from booster_fast.stages import StageFailed

    class FailingEval(FakeStages):
        def __call__(self, argv):
            if argv[0] == "eval":
                self.calls.append(argv)
                raise StageFailed(1)
            return super().__call__(argv)

    work, out = tmp_path / "runs", tmp_path / "r.json"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "refusal": "no", "response": "yes"}) + "\n"
                            for i in range(16)))
    command = ["experiment", "defense", "--seeds", "1", "--methods", "sft", "--workdir", str(work), "--no-plot",
               "--output", str(out), "--set", f"data={data}"]

    def run(stages, *extra):
        monkeypatch.setattr("booster_fast.stages.run_stage", stages)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="booster_fast"):
            code = main(command + list(extra))
        return code, [argv[0] for argv in stages.calls]

    assert run(FakeStages()) == (0, ["align", "eval", "attack", "eval"])
    assert run(FailingEval(), "--set", "align.lr=0.002") == (1, ["align", "eval"])
    assert run(FakeStages(), "--set", "align.lr=0.002") == (0, ["eval", "attack", "eval"])
    assert "attack-sft runs again: the align stage it reads was made again since it ran" in caplog.text
    assert run(FakeStages(), "--set", "align.lr=0.002") == (0, [])


def test_the_paper_presets_attack_at_the_original_scripts_poison_ratio():
    """The original's GSM8K scripts attack at p = 0.05, its SST2 and AGNEWS ones at 0.1."""
    from booster_fast.experiment import PRESETS

    assert {name: PRESETS[name]["attack"]["poison_ratio"] for name in ("paper-sst2", "paper-agnews", "paper-gsm8k")} \
        == {"paper-sst2": 0.1, "paper-agnews": 0.1, "paper-gsm8k": 0.05}


def test_a_data_file_edited_while_its_stage_ran_runs_the_stage_again(tmp_path, monkeypatch):
    """The record keeps the digest of the file as the stage read it, from before the run: a file edited while an
    alignment ran makes the next experiment run that stage again, not keep one trained on the old content."""
    from booster_fast.stages import Chain

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "q", "refusal": "no", "response": "yes"}\n')
    out = tmp_path / "align-sft"

    def stage(argv):
        out.mkdir(exist_ok=True)
        (out / "metrics.jsonl").write_text("{}\n")
        if len(calls) == 0:
            data.write_text(data.read_text() * 2)  # edited meanwhile
        calls.append(argv)

    calls = []
    monkeypatch.setattr("booster_fast.stages.run_stage", stage)
    argv = ["align", "--data", str(data), "--output", str(out)]
    Chain(rerun=False).stage("align", argv, out)
    Chain(rerun=False).stage("align", argv, out)
    Chain(rerun=False).stage("align", argv, out)
    assert len(calls) == 2  # run, run again (the file changed under the first), then kept
