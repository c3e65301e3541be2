"""`booster-fast attack` on the tiny model: non-finite updates are counted and stop a stalled attack, an align
checkpoint is attacked with its run's settings, bad input is one line with exit code 2, and SIGTERM leaves
nothing half-written behind."""
from __future__ import annotations

import json
import logging
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import booster_fast.fast as fast
from booster_fast.cli import main
from test_cli import read_metrics  # strict JSON

SMALL = ["--samples", "20", "--batch-size", "4", "--eval-rows", "8"]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)


def nan_loss_on(monkeypatch, calls):
    """Make the fast engine's training loss NaN on the given 1-based calls of its per-position losses (None: on
    every call); the held-out loss (attack.heldout_loss) is computed apart and stays finite."""
    real, n = fast.FastBooster._token_losses, [0]

    def token_losses(self, batch):
        n[0] += 1
        out = real(self, batch)
        return out * float("nan") if calls is None or n[0] in calls else out

    monkeypatch.setattr(fast.FastBooster, "_token_losses", token_losses)


def test_an_attack_whose_updates_are_all_skipped_stops_with_exit_3(aligned, tmp_path, monkeypatch, capsys):
    """A stalled attack must not read as a defence that held: every update skipped -> exit 3 after the first ten,
    one line, and no run directory (nor a temporary one) left."""
    nan_loss_on(monkeypatch, None)
    out = tmp_path / "stalled"
    capsys.readouterr()
    code = main(["attack", "--adapter", str(aligned), "--output", str(out), "--steps", "30", "--eval-every", "5",
                 *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("booster-fast: error: 10 attack updates skipped by step 10") and "the last 10 in a row" in err[-1]
    assert not out.exists() and leftovers(tmp_path) == []


def test_skipped_updates_are_counted_in_the_metrics(aligned, tmp_path, monkeypatch, caplog):
    """Some updates skipped (under --max-skipped): the run completes, each metrics line counts its interval's
    skipped updates, the training loss averages the others only, and a warning says how many."""
    nan_loss_on(monkeypatch, {2, 3})  # the 2nd and 3rd updates (one call per SFT update)
    out = tmp_path / "some"
    assert main(["attack", "--adapter", str(aligned), "--output", str(out), "--steps", "4", "--eval-every", "2",
                 *SMALL]) == 0
    rows = read_metrics(out)
    assert [r["skipped"] for r in rows] == [0, 1, 1]
    assert all(math.isfinite(r["train_loss"]) for r in rows[1:])
    assert "2 of 4 updates were skipped" in caplog.text


def test_a_checkpoint_of_an_align_run_is_attacked_with_the_runs_settings(aligned, tmp_path):
    """RUN/checkpoints/step-N has no run_config.json of its own: the run's gives the base (seed 43, as align
    built it, not load_model's default 0) and max_length, so the attack starts from the same model as an attack
    on the run directory itself (equal held-out loss at step 0)."""
    ckpt = aligned / "checkpoints" / "step-000002"
    assert ckpt.is_dir() and not (ckpt / "run_config.json").exists()
    step0 = {}
    for name, adapter in (("run", aligned), ("ckpt", ckpt)):
        out = tmp_path / name
        assert main(["attack", "--adapter", str(adapter), "--output", str(out), "--steps", "1", *SMALL]) == 0
        cfg = json.loads((out / "run_config.json").read_text())
        assert cfg["base"]["seed"] == 43 and cfg["max_length"] == 64 and cfg["aligned_with"] == "booster"
        assert cfg["adapter"] == str(adapter.absolute())
        step0[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["harmful_loss"]
    assert step0["ckpt"] == step0["run"]


@pytest.mark.parametrize("name, hint", [("step-2", True), ("step-02", True), ("step-3", False)])
def test_a_checkpoint_named_without_its_six_digits_gets_the_right_name(aligned, tmp_path, capsys, name, hint):
    """`--adapter RUN/checkpoints/step-2` names no folder: the error gives the six-digit one where it exists."""
    assert main(["attack", "--adapter", str(aligned / "checkpoints" / name), "--output", str(tmp_path / "out"),
                 "--steps", "1", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{name}: no such adapter directory" in err and "\n" not in err
    assert (f"(checkpoints have six digits: {aligned / 'checkpoints' / 'step-000002'})" in err) == hint, err
    assert not (tmp_path / "out").exists()


def test_the_refusal_probe_draws_no_bar_inside_the_attacks(aligned, tmp_path, capsys, caplog, monkeypatch):
    """--refusal-prompts generates at every eval inside the attack's progress bar: a second bar there would
    break the bar's line with cursor-up codes; the probe's generation draws none (bars drawn as on a terminal).
    Where stderr is no terminal, the attack logs one plain line per eval instead of its bar."""
    def attack(out):
        with caplog.at_level(logging.INFO, logger="booster_fast"):
            assert main(["attack", "--adapter", str(aligned), "--output", str(out), "--steps", "2", "--eval-every",
                         "1", "--refusal-prompts", "2", "--refusal-max-new-tokens", "4", *SMALL]) == 0
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attack: step ")]
        caplog.clear()
        return lines

    lines = attack(tmp_path / "plain")
    assert [line.split(",")[0] for line in lines] == ["attack: step 1/2", "attack: step 2/2"], lines
    assert all(", loss " in line and ", held-out harmful " in line for line in lines), lines
    assert re.search(r" steps/s, 0:00:\d\d left$", lines[0]) and lines[1].endswith(" steps/s"), lines
    capsys.readouterr()
    monkeypatch.setattr("booster_fast.progress.shown", lambda: True)
    assert attack(tmp_path / "out") == []  # the bar says it
    err = capsys.readouterr().err
    assert "attack" in err and "\x1b[A" not in err and "probe" not in err, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("keyword_harmful_score" in r for r in rows)


def _copy_adapter(src: Path, dst: Path, weights: bytes | None = None) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    if weights is not None:
        (dst / "adapter_model.safetensors").write_bytes(weights)
    return dst


EDITED_RUN_CONFIG = {"seed_not_int": ({"seed": "abc"}, "seed is 'abc', not an integer"),
                     "data_not_str": ({"data": 5}, "run_config.json's data is 5, not a string"),
                     "base_not_object": ({"base": "x"}, "run_config.json's base is 'x', not a JSON object")}


@pytest.mark.parametrize("case", ["lr_inf", "epochs_inf", "max_length_0", "corrupt_weights", "no_weights",
                                  *EDITED_RUN_CONFIG])
def test_bad_attack_input_is_one_line(case, aligned, tmp_path, capsys):
    adapter, extra, needle = aligned, [], None
    if case == "lr_inf":
        extra, needle = ["--lr", "inf"], "--lr must be a finite number"
    elif case == "epochs_inf":
        extra, needle = ["--epochs", "inf"], "--epochs must be a finite number"
    elif case == "max_length_0":
        extra, needle = ["--max-length", "0"], "--max-length must be >= 1"
    elif case == "corrupt_weights":
        adapter = _copy_adapter(aligned, tmp_path / "corrupt", b"not a safetensors file")
        extra, needle = ["--base-model", "tiny"], "cannot read the adapter weights"
    elif case == "no_weights":
        adapter = _copy_adapter(aligned, tmp_path / "empty")
        extra, needle = ["--base-model", "tiny"], "no adapter weights"
    else:
        adapter = tmp_path / "edited"
        adapter.mkdir()
        for f in aligned.iterdir():
            if f.is_file():
                (adapter / f.name).write_bytes(f.read_bytes())
        edit, needle = EDITED_RUN_CONFIG[case]
        cfg = json.loads((adapter / "run_config.json").read_text())
        (adapter / "run_config.json").write_text(json.dumps({**cfg, **edit}))
    out = tmp_path / "out"
    capsys.readouterr()
    steps = [] if case == "epochs_inf" else ["--steps", "1"]
    assert main(["attack", "--adapter", str(adapter), "--output", str(out), *steps, *SMALL, *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("booster-fast: error:") and needle in lines[0], lines
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_leaves_no_half_written_attack(aligned, tmp_path):
    """SIGTERM mid-attack: exit code 143, one line, and the temporary run directory removed."""
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "booster_fast", "attack", "--adapter", str(aligned), "--output",
                             str(out), "--steps", "500", "--eval-every", "100", *SMALL],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert leftovers(tmp_path), "the attack never started writing"
    time.sleep(1.0)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "booster-fast: terminated"
    assert "Traceback" not in err and not out.exists() and leftovers(tmp_path) == []


def test_sigterm_handler_is_put_back_after_a_command():
    """The SIGTERM handler run_reporting installs is the caller's again afterwards (a process embedding the CLI
    keeps its own)."""
    from booster_fast.cli import run_reporting

    before = signal.getsignal(signal.SIGTERM)
    seen = []
    assert run_reporting(lambda: seen.append(signal.getsignal(signal.SIGTERM)) or 0) == 0
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before


def test_a_full_disk_at_the_end_of_the_attack_is_one_line(aligned, tmp_path, capsys, monkeypatch):
    """The attacked adapter that cannot be written (a full disk after the whole attack) ends in one line with
    exit code 1, and leaves neither the output nor its temporary directory behind."""
    import errno

    from peft import PeftModel

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    out = tmp_path / "attacked"
    capsys.readouterr()
    assert main(["attack", "--adapter", str(aligned), "--benign", "builtin", "--samples", "8", "--steps", "1",
                 "--batch-size", "2", "--eval-rows", "2", "--output", str(out)]) == 1
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("booster-fast")]
    assert lines == [f"booster-fast: error: cannot write the attacked adapter to {out}: No space left on device"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_output_that_holds_a_run_is_refused_before_anything_loads(aligned, tmp_path, capsys, monkeypatch):
    """With a 7B base, loading the data, the model and the adapter takes minutes: the output is checked first."""
    from booster_fast import adapters, data

    def loaded(*a, **k):
        raise AssertionError("something was loaded before --output was checked")

    monkeypatch.setattr(data, "load_benign", loaded)
    monkeypatch.setattr(adapters, "load_adapter", loaded)
    before = sorted(p.name for p in aligned.iterdir())
    capsys.readouterr()
    assert main(["attack", "--adapter", str(aligned), "--output", str(aligned), "--steps", "1", *SMALL]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--output {aligned} is --adapter" in lines[0], lines  # the run it would replace
    assert sorted(p.name for p in aligned.iterdir()) == before


def test_the_current_directory_as_output(aligned, tmp_path, monkeypatch):
    """`--output .` in an empty directory: align and attack fill it, and leave nothing beside it."""
    for command, extra in (("align", ["--steps", "1", "--max-length", "64", "--batch-size", "2"]),
                           ("attack", ["--adapter", str(aligned), "--steps", "1", *SMALL])):
        here = tmp_path / command
        here.mkdir()
        monkeypatch.chdir(here)
        assert main([command, "--output", ".", *extra]) == 0
        assert {"adapter_model.safetensors", "run_config.json", "metrics.jsonl"} <= {p.name for p in here.iterdir()}
        assert json.loads((here / "run_config.json").read_text())["command"] == command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align", "attack"]


def test_the_last_step_is_evaluated_off_the_cadence(aligned, tmp_path):
    """--eval-every 2 over 3 steps: the held-out loss at 0, 2 and at the last step, 3."""
    out = tmp_path / "attacked"
    assert main(["attack", "--adapter", str(aligned), "--output", str(out), "--steps", "3", "--eval-every", "2",
                 *SMALL]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 2, 3] and all(math.isfinite(r["harmful_loss"]) for r in rows)


def test_an_unfinished_run_as_output_is_named_for_what_each_command_can_do(aligned, tmp_path, capsys):
    """align can continue an unfinished run (--resume); attack cannot, so it only offers --overwrite."""
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / ".incomplete").write_text("")
    capsys.readouterr()
    assert main(["align", "--output", str(run), "--steps", "1"]) == 2
    line = capsys.readouterr().err.strip()
    assert f"holds an unfinished run; continue it with --resume {run}, or pass --overwrite" in line
    assert main(["attack", "--adapter", str(aligned), "--output", str(run), "--steps", "1", *SMALL]) == 2
    line = capsys.readouterr().err.strip()
    assert line.endswith(f"--output {run} already holds a run; pass --overwrite to replace it")
