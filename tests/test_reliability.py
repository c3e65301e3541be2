"""Checkpoints, exact resume, signals and non-finite updates of `booster-fast align` (CPU, tiny model).

Three `python -m booster_fast align` subprocesses are started together and stopped mid-run, one by SIGKILL
(after its step-4 checkpoint appears), one by SIGTERM and one by SIGINT; while they run, the same run goes
uninterrupted in this process. Each interrupted run is then resumed in-process and must end with the same
adapter and optimizer state, bit for bit, and the same metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import booster_fast as bf
from booster_fast.checkpoint import MARKER, list_checkpoints, load_checkpoint, save_checkpoint
from booster_fast.cli import main
from test_cli import read_metrics

STEPS = 16
RUN = ["--steps", str(STEPS), "--max-length", "64", "--batch-size", "2", "--log-every", "1"]
# one intra-op thread here and in the subprocesses: the same arithmetic in every process (bit-exact comparisons
# need equal thread counts), and four processes on two cores do not oversubscribe them
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]


def one_error_line(err: str, progress: bool = False) -> str:
    """The one error line; with progress=True the run had started, so tqdm's bar may precede it."""
    lines = err.strip().splitlines()
    if progress:
        lines = [line for line in lines if not line.startswith("booster:")]
    assert len(lines) == 1 and lines[0].startswith("booster-fast: error:"), err
    return lines[0]


def assert_same_run(a: Path, b: Path):
    """Final adapters and final optimizer states equal bit for bit; same metrics but for timings."""
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) == 24
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = (torch.load(list_checkpoints(r)[-1][1] / "optimizer.pt", weights_only=True) for r in (a, b))
    sa, sb = oa["optimizer"]["state"], ob["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert without_time(read_metrics(a)) == without_time(read_metrics(b))
    assert [r["step"] for r in read_metrics(b)] == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------------ interrupted runs, resumed
def _metric_lines(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start three subprocess runs, stop each mid-run by its signal, and meanwhile run the same training
    uninterrupted in-process. Returns {name: (run dir, return code, stderr)} plus the reference dir."""
    root = tmp_path_factory.mktemp("reliability")
    plans = {  # name: (extra flags, trigger, signal)
        "kill": (["--save-every", "2"], lambda d: (d / "checkpoints" / "step-000004").is_dir(), signal.SIGKILL),
        "term": (["--save-every", "1000"], lambda d: _metric_lines(d) >= 2, signal.SIGTERM),
        "int": (["--save-every", "1000"], lambda d: _metric_lines(d) >= 3, signal.SIGINT),
    }
    procs = {}
    for name, (extra, _, _) in plans.items():
        err = open(root / f"{name}.stderr", "w")
        procs[name] = subprocess.Popen([sys.executable, "-m", "booster_fast", "align", "--output",
                                        str(root / name), *RUN, *extra],
                                       stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **ONE_THREAD})
        err.close()

    def drive():
        pending, deadline = set(plans), time.monotonic() + 240
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                _, trigger, sig = plans[name]
                if procs[name].poll() is not None:
                    pending.discard(name)            # ended by itself: the test below reports it
                elif trigger(root / name):
                    procs[name].send_signal(sig)
                    pending.discard(name)
            time.sleep(0.003)

    driver = threading.Thread(target=drive)
    driver.start()
    reference = root / "reference"
    code = main(["align", "--output", str(reference), *RUN, "--save-every", "2", "--keep-checkpoints", "2"])
    driver.join()
    out = {"reference": (reference, code, "")}
    for name, p in procs.items():
        rc = p.wait(timeout=240)
        out[name] = (root / name, rc, (root / f"{name}.stderr").read_text())
    return out


def test_uninterrupted_run_keeps_the_last_k_checkpoints(runs):
    run, code, _ = runs["reference"]
    assert code == 0
    assert [s for s, _ in list_checkpoints(run)] == [STEPS - 2, STEPS]
    assert not (run / MARKER).exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000014", "step-000016"]  # no .tmp-*
    assert all(r["skipped"] == 0.0 for r in read_metrics(run))


def test_sigkill_then_resume_is_bit_exact(runs, capsys, caplog):
    run, rc, err = runs["kill"]
    assert rc == -signal.SIGKILL, err
    assert (run / MARKER).exists() and not (run / "adapter_model.safetensors").exists()
    saved = [s for s, _ in list_checkpoints(run)]
    assert saved and 4 <= saved[-1] < STEPS and len(saved) <= 2
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(["align", "--resume", str(run)]) == 0, capsys.readouterr().err
    newest = run / "checkpoints" / f"step-{saved[-1]:06d}"
    assert any(f"resumed at step {saved[-1]} from {newest}" in r.getMessage() for r in caplog.records)
    assert not (run / MARKER).exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]   # killed writes cleaned
    assert_same_run(runs["reference"][0], run)


@pytest.mark.parametrize("name,sig,code", [("term", "SIGTERM", 143), ("int", "SIGINT", 130)])
def test_signal_checkpoints_exits_and_resumes(runs, name, sig, code, capsys):
    run, rc, err = runs[name]
    assert rc == code, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"booster-fast: interrupted at step (\d+) \({sig}\); resume with: "
                     rf"booster-fast align --resume (\S+)", last)
    assert m, last
    step = int(m.group(1))
    assert Path(m.group(2)) == run and 1 <= step < STEPS
    assert [s for s, _ in list_checkpoints(run)] == [step]          # written on the signal (--save-every 1000)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))
    assert (run / MARKER).exists()
    assert main(["align", "--resume", str(run), "--log-every", "5"]) == 0, capsys.readouterr().err
    assert_same_run(runs["reference"][0], run)


# ------------------------------------------------------------------------------ checkpoint in, checkpoint out
def _batches(tok):
    from booster_fast.data import BatchStream, encode_all, load_safety_data

    align, harmful = load_safety_data("builtin")
    sa = BatchStream(encode_all(tok, align[:64], 64)[0], 2, 64, tok.pad_token_id, 1)
    sh = BatchStream(encode_all(tok, harmful[:64], 64)[0], 2, 64, tok.pad_token_id, 2)
    return {"align": sa, "harmful": sh}


def _fresh(lora_seed=43):
    model, tok = bf.load_model("tiny", seed=43, device="cpu")
    torch.manual_seed(lora_seed)
    model = bf.add_lora(model)
    return model, tok, bf.Booster(model, bf.BoosterConfig(impl="fast"))


def test_a_failed_resave_of_a_step_keeps_its_earlier_copy(tmp_path, monkeypatch):
    """The same step saved again (a resume that ends where its checkpoint was): the old copy is set aside until
    the new one is in place, and put back when the new one cannot be; a good re-save leaves nothing aside."""
    model, tok, booster = _fresh()
    streams = _batches(tok)
    booster.step(next(streams["align"]), next(streams["harmful"]))
    (tmp_path / "checkpoints").mkdir()
    first = save_checkpoint(tmp_path, 3, model, booster, streams, {"skipped": 0, "metrics_bytes": 0}, keep=2)
    saved = (first / "trainer_state.json").read_text()
    real = Path.rename

    def failing(self, target):
        if self.name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, model, booster, streams, {"skipped": 1, "metrics_bytes": 0}, keep=2)
    assert (first / "trainer_state.json").read_text() == saved
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]
    monkeypatch.setattr(Path, "rename", real)
    save_checkpoint(tmp_path, 3, model, booster, streams, {"skipped": 1, "metrics_bytes": 0}, keep=2)
    assert json.loads((first / "trainer_state.json").read_text())["skipped"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_loading_the_adapter_restores_the_flat_buffer(tmp_path):
    """The fast engine's optimizer has ONE parameter, W; the LoRA parameters are views of it, so loading the
    peft adapter in place restores W, and the next update equals the uninterrupted one bit for bit."""
    model, tok, booster = _fresh()
    streams = _batches(tok)
    for _ in range(2):
        booster.step(next(streams["align"]), next(streams["harmful"]))
    (tmp_path / "checkpoints").mkdir()
    ckpt = save_checkpoint(tmp_path, 2, model, booster, streams, {"skipped": 0, "metrics_bytes": 0}, keep=1)

    model2, tok2, booster2 = _fresh(lora_seed=7)     # another LoRA init: everything must come from the checkpoint
    streams2 = _batches(tok2)
    W, W2 = booster.engine.flat.W, booster2.engine.flat.W
    assert not torch.equal(W, W2)
    state = load_checkpoint(ckpt, model2, booster2, streams2)
    assert state["step"] == 2
    assert torch.equal(W, W2)
    base, end = W2.untyped_storage().data_ptr(), W2.untyped_storage().data_ptr() + W2.untyped_storage().nbytes()
    assert all(base <= p.data_ptr() < end for p in model2.parameters() if p.requires_grad)  # still views of W
    s1, s2 = booster.optimizer.state[booster.engine.W], booster2.optimizer.state[booster2.engine.W]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert streams2["align"].state_dict() == streams["align"].state_dict()
    booster.step(next(streams["align"]), next(streams["harmful"]))
    booster2.step(next(streams2["align"]), next(streams2["harmful"]))
    assert torch.equal(W, W2)


# ------------------------------------------------------------------------------ non-finite updates
@pytest.fixture
def poison(monkeypatch):
    """poison(steps): those Booster steps (1-based) see a NaN in the LM head, so their update is non-finite."""
    bad: set[int] = set()
    orig = bf.Booster.step

    def step(self, a, h):
        self._n = getattr(self, "_n", 0) + 1
        if self._n not in bad:
            return orig(self, a, h)
        w = self.model.get_output_embeddings().weight
        saved = w.detach().clone()
        with torch.no_grad():
            w[0, 0] = float("nan")
        try:
            return orig(self, a, h)
        finally:
            with torch.no_grad():
                w.copy_(saved)

    monkeypatch.setattr(bf.Booster, "step", step)
    return bad.update


SMALL = ["--max-length", "64", "--batch-size", "2"]


def test_metrics_lines_are_strict_json():
    """A NaN or infinite metric (a harmful gradient norm that overflowed) is written as null, never as the NaN or
    Infinity that strict JSON readers refuse; integers and finite floats stay as they are."""
    from booster_fast.align import metrics_line

    line = metrics_line({"step": 3, "loss": 1.5, "harmful_grad_norm": float("inf"), "harmful_loss": float("nan"),
                         "x": -float("inf"), "skipped": 1})
    assert line == '{"step": 3, "loss": 1.5, "harmful_grad_norm": null, "harmful_loss": null, "x": null, "skipped": 1}\n'


def test_skipped_updates_are_counted_and_leave_weights_alone(tmp_path, poison):
    poison({2})
    out = tmp_path / "run"
    assert main(["align", "--output", str(out), "--steps", "4", *SMALL, "--save-every", "1",
                 "--keep-checkpoints", "4", "--max-skipped", "1", "--log-every", "3"]) == 0
    assert [r["skipped"] for r in read_metrics(out)] == [0.0, 1.0, 0.0, 0.0]
    c1, c2, c3 = (out / "checkpoints" / f"step-00000{i}" for i in (1, 2, 3))
    w1, w2, w3 = (load_file(str(c / "adapter_model.safetensors")) for c in (c1, c2, c3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)                # step 2 changed nothing...
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)            # ...step 3 trained again
    o1, o2 = (torch.load(c / "optimizer.pt", weights_only=True)["optimizer"]["state"][0] for c in (c1, c2))
    assert all(torch.equal(o1[k], o2[k]) for k in o1)                # optimizer state (and its step) untouched
    assert json.loads((c2 / "trainer_state.json").read_text())["skipped"] == 1


def test_too_many_skipped_updates_exit_3_keeping_the_last_good_checkpoint(tmp_path, poison, capsys):
    poison(set(range(3, 100)))
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["align", "--output", str(out), "--steps", "12", *SMALL, "--save-every", "2", "--log-every", "1",
                 "--max-skipped", "1"])
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert code == 3
    assert "--max-skipped 1" in line and "step-000002" in line, line
    # saved at the update before the skipped ones, which may itself have diverged: said so
    assert "(saved within the last 2 skipped updates or at the one before them" in line, line
    assert [s for s, _ in list_checkpoints(out)] == [2]             # nothing saved past the limit
    assert (out / MARKER).exists()
    # the kept run refuses conflicting flags, a second run into it, and resumes when asked
    code = main(["align", "--resume", str(out), "--lr", "0.001", "--seed", "43"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "--lr 0.001" in line and "--seed" not in line
    assert main(["align", "--output", str(out), *SMALL]) == 2
    assert "--resume" in one_error_line(capsys.readouterr().err)
    assert main(["align", "--resume", str(out), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err)
    # a checkpoint older than the update before the skipped ones (step 3; 4 was good, 5 and 6 skipped): no such note
    poison.__self__.clear()
    poison(set(range(5, 100)))
    older = tmp_path / "older"
    assert main(["align", "--output", str(older), "--steps", "12", *SMALL, "--save-every", "3", "--log-every", "1",
                 "--max-skipped", "1"]) == 3
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert "step-000003" in line and "saved within" not in line, line


def test_a_flag_changed_at_resume_holds_for_the_next_resume(tmp_path, poison, capsys):
    """--max-skipped raised when resuming is written into the run, so that the next resume (as the printed hint
    says: --resume alone) keeps it instead of the original value."""
    poison(set(range(3, 100)))
    out = tmp_path / "run"
    flags = [*SMALL, "--save-every", "2", "--log-every", "1"]
    assert main(["align", "--output", str(out), "--steps", "12", *flags, "--max-skipped", "1"]) == 3
    assert main(["align", "--resume", str(out), "--max-skipped", "4"]) == 3       # steps 3-7 skipped: 5 > 4
    assert json.loads((out / "run_config.json").read_text())["max_skipped"] == 4
    capsys.readouterr()
    assert main(["align", "--resume", str(out)]) == 3
    assert "--max-skipped 4" in one_error_line(capsys.readouterr().err, progress=True)


def test_resume_removes_the_run_that_overwrite_replaced(tmp_path):
    """--overwrite sets the old run aside until the new one has a checkpoint; a kill before that left it there
    for good. Resuming the new run (the one meant to replace it) removes it."""
    from booster_fast.checkpoint import RunDir

    out = tmp_path / "run"
    assert main(["align", "--output", str(out), "--steps", "1", *SMALL]) == 0
    RunDir.create(out, {"command": "align"})  # as a killed `--overwrite` run leaves it: neither commit nor abandon
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.old-")], "nothing was set aside"
    RunDir.reopen(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_abort_before_any_checkpoint_leaves_nothing(tmp_path, poison, capsys):
    poison(set(range(1, 100)))
    capsys.readouterr()
    assert main(["align", "--output", str(tmp_path / "a" / "run"), "--steps", "6", *SMALL,
                 "--max-skipped", "0", "--log-every", "2"]) == 3
    assert "nothing was kept" in one_error_line(capsys.readouterr().err, progress=True)
    assert list(tmp_path.iterdir()) == []


def test_reference_refuses_max_skipped(tmp_path, capsys):
    assert main(["align", "--output", str(tmp_path / "run"), "--impl", "reference", "--max-skipped", "3",
                 *SMALL]) == 2
    assert "--impl fast" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ resume: bad run dirs
def test_resume_refuses_what_it_cannot_resume(tmp_path, capsys):
    capsys.readouterr()
    assert main(["align", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such run" in one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["align", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no run" in one_error_line(capsys.readouterr().err)
    done = tmp_path / "done"
    assert main(["align", "--output", str(done), "--steps", "1", *SMALL]) == 0
    capsys.readouterr()
    assert main(["align", "--resume", str(done)]) == 2
    assert "finished" in one_error_line(capsys.readouterr().err)
    attacked = tmp_path / "attacked"  # another command's run (its config; as if unfinished): not an align run
    attacked.mkdir()
    (attacked / "run_config.json").write_text(json.dumps({**json.loads((done / "run_config.json").read_text()),
                                                          "command": "attack"}))
    (attacked / MARKER).write_text("")
    for command in ("align", "memory"):
        assert main([command, "--resume", str(attacked)]) == 2
        assert "'attack' wrote this run; --resume takes an align run" in one_error_line(capsys.readouterr().err)


def test_training_state_is_loaded_without_pickled_code(tmp_path, capsys):
    """A checkpoint whose optimizer.pt carries a pickled callable is refused (weights_only=True): one line,
    exit 2, and the callable never runs."""
    run = tmp_path / "run"
    assert main(["align", "--output", str(run), "--steps", "2", *SMALL, "--save-every", "1",
                 "--keep-checkpoints", "1"]) == 0  # one checkpoint: no older one to fall back to
    (run / MARKER).write_text("")                   # pretend it was interrupted after step 2
    touched = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (touched,))

    torch.save({"impl": "fast", "optimizer": Evil()}, run / "checkpoints" / "step-000002" / "optimizer.pt")
    capsys.readouterr()
    assert main(["align", "--resume", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    # the unpickler's reason, without torch's advice around it to load the file without weights_only
    assert "not a plain tensor checkpoint (UnpicklingError: Unsupported global" in line, line
    assert "weights_only" not in line, line
    assert not touched.exists()


def test_a_truncated_checkpoint_fails_the_resume_in_one_line_and_changes_nothing(tmp_path, capsys):
    """A truncated optimizer.pt in the only checkpoint: one line naming the file (it was wrapped twice and cut
    mid-sentence), and the failed resume leaves run_config.json as it was (a changed --log-every was written
    before the load)."""
    run = tmp_path / "run"
    assert main(["align", "--output", str(run), "--steps", "2", *SMALL, "--save-every", "1",
                 "--keep-checkpoints", "1"]) == 0
    (run / MARKER).write_text("")
    opt = run / "checkpoints" / "step-000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    config = (run / "run_config.json").read_bytes()
    capsys.readouterr()
    assert main(["align", "--resume", str(run), "--log-every", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "optimizer.pt is not a plain tensor checkpoint" in line and line.count("cannot resume") == 1, line
    assert (run / "run_config.json").read_bytes() == config


def test_resume_falls_back_past_an_unreadable_checkpoint(tmp_path, caplog):
    """The newest checkpoint unreadable (a disk fault): the run resumes from the one before it, with a warning,
    keeps the bad one aside as step-N.unreadable, writes step N again, and ends as an uninterrupted run does,
    bit for bit."""
    flags = ["--steps", "4", *SMALL, "--save-every", "1", "--keep-checkpoints", "3"]
    assert main(["align", "--output", str(tmp_path / "whole"), *flags]) == 0
    run = tmp_path / "run"
    assert main(["align", "--output", str(run), *flags]) == 0
    (run / MARKER).write_text("")  # as if killed after checkpoint 4, and before it step 3's
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "step-000003" / "rng.pt").write_bytes(b"garbage")
    assert main(["align", "--resume", str(run)]) == 0
    assert "resuming from step-000002, as step-000003 does not load (" in caplog.text
    assert "(UnpicklingError: Unsupported operand" in caplog.text and "weights_only" not in caplog.text
    assert (run / "checkpoints" / "step-000003.unreadable").is_dir()
    assert [s for s, _ in list_checkpoints(run)] == [2, 3, 4]
    wa, wb = (load_file(str(r / "adapter_model.safetensors")) for r in (tmp_path / "whole", run))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert without_time(read_metrics(run)) == without_time(read_metrics(tmp_path / "whole"))
    # the same step unreadable once more: set aside under a name of its own
    (run / MARKER).write_text("")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "step-000003" / "rng.pt").write_bytes(b"garbage")
    assert main(["align", "--resume", str(run)]) == 0
    assert (run / "checkpoints" / "step-000003.unreadable-1").is_dir()
    assert [s for s, _ in list_checkpoints(run)] == [2, 3, 4]


def test_resume_refuses_a_data_file_that_changed(tmp_path, monkeypatch, capsys):
    """A relative --data file is recorded by its absolute path with its SHA-256: the run resumes from another
    directory, and refuses (one line) once the file's rows changed, even with the row count kept."""
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(8)]
    Path("pairs.json").write_text(json.dumps(rows))
    flags = ["--data", "pairs.json", "--harmful-data", "pairs.json", "--save-every", "1"]
    assert main(["align", "--output", "run", "--steps", "2", *SMALL, *flags]) == 0
    cfg = json.loads(Path("run/run_config.json").read_text())
    data = str(tmp_path / "pairs.json")
    assert cfg["data"] == data and list(cfg["data_sha256"]) == [data] and len(cfg["data_sha256"][data]) == 64
    assert cfg["encoding"] == "joint"
    (tmp_path / "run" / MARKER).write_text("")  # pretend it was interrupted after step 2
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    monkeypatch.chdir(tmp_path.parent)
    assert main(["align", "--resume", str(tmp_path / "copy")]) == 0  # unchanged: resumes from another directory
    Path(data).write_text(json.dumps([{**r, "output": r["output"] + "!"} for r in rows]))
    capsys.readouterr()
    assert main(["align", "--resume", str(tmp_path / "run")]) == 2
    assert "pairs.json changed since the run started" in one_error_line(capsys.readouterr().err)


def test_sft_needs_no_harmful_data_and_resumes(tmp_path, capsys):
    """--method sft never draws a harmful batch: an instruction file aligns without --harmful-data (Booster still
    asks for it, in one line), and its checkpoints, which hold the alignment stream alone, resume."""
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(8)]
    data = tmp_path / "ins.json"
    data.write_text(json.dumps(rows))
    capsys.readouterr()
    assert main(["align", "--output", str(tmp_path / "b"), "--data", str(data), "--steps", "1", *SMALL]) == 2
    assert "--harmful-data" in one_error_line(capsys.readouterr().err)
    run = tmp_path / "sft"
    assert main(["align", "--output", str(run), "--method", "sft", "--data", str(data), "--steps", "2", *SMALL,
                 "--save-every", "1"]) == 0
    (run / MARKER).write_text("")  # pretend it was interrupted after step 2
    shutil.rmtree(run / "checkpoints" / "step-000002")
    assert main(["align", "--resume", str(run)]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


# ---- atomic writes (every JSON, PNG and cache file the commands write) ---------------------------------------
def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    """torch's, Python's and NumPy's generators continue after a save and load as if never interrupted (the CLI's
    runs draw nothing from them after the start, so the resume tests alone could not tell)."""
    import random

    import numpy as np

    from booster_fast.checkpoint import rng_state, set_rng_state

    def draws():
        return torch.rand(5).tolist(), random.random(), np.random.rand(3).tolist(), torch.randn(2).tolist()

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    draws()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draws()
    draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from booster_fast.atomic import write_atomic, write_json_atomic

    target = tmp_path / "sub" / "doc.json"
    write_json_atomic(target, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600

    def half(f):
        f.write(b'{"a": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_atomic(target, half)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["doc.json"], "a temporary file was left behind"


def test_atomic_json_write_error_is_one_line(tmp_path):
    from booster_fast.atomic import write_json_atomic
    from booster_fast.cli import OutputError

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*doc\.json"):
        write_json_atomic(blocker / "doc.json", {})


def test_an_output_under_a_dangling_link_is_refused_before_any_work(tmp_path):
    from booster_fast.atomic import check_writable_file
    from booster_fast.cli import UsageError

    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    with pytest.raises(UsageError, match="is not a directory"):
        check_writable_file(tmp_path / "gone" / "sub" / "doc.json", "--output")


def _saved_run(tmp_path, without=(), **saved):
    """An unfinished run folder holding only run_config.json: the CLI defaults for tiny, less `without`, plus
    `saved`."""
    from booster_fast.checkpoint import CONFIG
    from booster_fast.run_args import _cli_defaults

    run = tmp_path / "run"
    run.mkdir()
    config = {k: v for k, v in _cli_defaults("tiny").items() if k not in without}
    (run / CONFIG).write_text(json.dumps({**config, "output": str(run), **saved}))
    (run / MARKER).write_text("")
    return run


def _resume_args(run, **given):
    """align's parsed arguments for `--resume run`, with `given` on the command line."""
    from booster_fast.run_args import _cli_defaults

    return argparse.Namespace(**{**_cli_defaults("tiny"), "resume": str(run), **given})


def test_resume_of_a_run_older_than_a_flag_takes_the_flags_default(tmp_path):
    """A run saved before a flag existed ran at its default: resuming it with another value is a conflict (it
    was let through, changing the update mid-run), and a plain resume keeps the default."""
    from booster_fast.cli import UsageError
    from booster_fast.run_args import apply_resume

    run = _saved_run(tmp_path, without=("perturb_aware", "rho"))
    with pytest.raises(UsageError, match=r"--perturb-aware True \(the run has False\)"):
        apply_resume(_resume_args(run, perturb_aware=True))
    plain = _resume_args(run)
    apply_resume(plain)
    assert plain.perturb_aware is False and plain.rho == 5.0 and plain.resume_changes == {}


def test_resume_tells_a_flag_given_at_its_default_from_one_left_out(tmp_path, capsys):
    """`--lr 5e-4` on the command line is a value given, even though it is the default: resuming a run made at
    another lr with it is a conflict (it was silently kept at the run's), and a free flag given at its default
    (--save-every) changes the run's."""
    from booster_fast.cli import build_parser, given_flags
    from booster_fast.run_args import _cli_defaults, apply_resume

    defaults = _cli_defaults("tiny")
    run = _saved_run(tmp_path, lr=1e-3, lamb=3.0, save_every=5)
    capsys.readouterr()
    assert main(["align", "--resume", str(run), "--lr", str(defaults["lr"]), "--lamb", str(defaults["lamb"])]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--lr {defaults['lr']} (the run has 0.001)" in line
    assert f"--lamb {defaults['lamb']} (the run has 3.0)" in line

    def resumed(*flags):
        argv = ["align", "--resume", str(run), *flags]
        args = build_parser().parse_args(argv)
        args.given_flags = given_flags("align", argv)
        apply_resume(args)
        return args

    kept = resumed()
    assert (kept.save_every, kept.lr, kept.resume_changes) == (5, 1e-3, {})
    changed = resumed("--save-every", str(defaults["save_every"]))
    assert changed.save_every == defaults["save_every"] != 5
    assert changed.resume_changes == {"save_every": defaults["save_every"]} and not hasattr(changed, "given_flags")


def test_resume_of_a_run_recorded_with_a_relative_model_directory(tmp_path, monkeypatch):
    """Runs recorded before model directories were made absolute hold the relative name: resuming one from the
    same folder with that --model given again (made absolute by the command line) is no conflict."""
    from booster_fast.run_args import apply_resume

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "x").mkdir(parents=True)
    run = _saved_run(tmp_path, model="models/x", encoding="joint")  # (a model directory's run records its encoding)
    args = _resume_args(run, model=str(tmp_path / "models" / "x"))
    apply_resume(args)
    assert args.model == str(tmp_path / "models" / "x")


def test_a_run_whose_every_update_was_skipped_exits_3(tmp_path, poison, capsys):
    """Under the default --max-skipped (100), a short run that diverged from its first step used to exit 0 with an
    untrained adapter; a run whose every update was skipped now stops with exit code 3: after 10 updates, or at
    its end when it is shorter."""
    poison(set(range(1, 100)))
    capsys.readouterr()
    assert main(["align", "--output", str(tmp_path / "run"), "--steps", "6", *SMALL, "--log-every", "3"]) == 3
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert "6 updates skipped by step 6" in line and "the last 6 in a row" in line, line
    assert not (tmp_path / "run").exists()
    assert main(["align", "--output", str(tmp_path / "long"), "--steps", "30", *SMALL, "--log-every", "5"]) == 3
    assert "10 updates skipped by step 10" in one_error_line(capsys.readouterr().err, progress=True)


def test_a_run_that_diverged_after_finite_steps_exits_3(tmp_path, poison, capsys):
    """The step that diverges can itself be finite (an infinite weight decay, a huge lr): every later update is
    skipped, but the total stays under --max-skipped and 'every update' never holds. 10 skipped in a row stop the
    run; fewer, between good updates, do not."""
    poison(set(range(3, 100)))
    capsys.readouterr()
    assert main(["align", "--output", str(tmp_path / "run"), "--steps", "30", *SMALL, "--log-every", "4"]) == 3
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert "10 updates skipped by step 12" in line and "the last 10 in a row" in line, line
    poison.__self__.clear()  # the fixture's set of poisoned steps
    poison(set(range(1, 10)) | set(range(11, 20)))  # 9 in a row twice, one good update between
    assert main(["align", "--output", str(tmp_path / "ok"), "--steps", "21", *SMALL, "--log-every", "7"]) == 0


def test_a_streak_of_skipped_updates_continues_across_a_resume(tmp_path, poison, capsys):
    """The count of updates skipped in a row is part of a checkpoint: 6 before an interruption and 4 after it
    are 10 in a row, as in an uninterrupted run."""
    poison(set(range(3, 100)))
    run = tmp_path / "run"
    flags = [*SMALL, "--save-every", "8", "--log-every", "8"]
    assert main(["align", "--output", str(run), "--steps", "8", *flags]) == 0  # 6 skipped (3-8): under 10
    (run / MARKER).write_text("")
    config = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**config, "steps": 30}))  # as if the run were longer
    poison({1, 2})  # the resumed process's updates (counted from 1 again) are all skipped
    capsys.readouterr()
    assert main(["align", "--resume", str(run), "--log-every", "1"]) == 3
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert "10 updates skipped by step 12" in line and "the last 10 in a row" in line, line


def test_a_first_update_skipped_alone_does_not_stop_the_run(tmp_path, poison):
    poison({1})
    assert main(["align", "--output", str(tmp_path / "ok"), "--steps", "3", *SMALL, "--log-every", "1"]) == 0
    assert [r["skipped"] for r in read_metrics(tmp_path / "ok")] == [1.0, 0.0, 0.0]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    """A checkpoint that cannot be written (here: the disk full at the step-4 checkpoint) ends the run with one
    line naming the last checkpoint and exit code 1, no traceback and no half-written checkpoint; once there is
    room the run resumes from that checkpoint and ends as an uninterrupted one does."""
    import errno

    import booster_fast.checkpoint as checkpoint

    run, whole = tmp_path / "run", tmp_path / "whole"
    args = ["--steps", str(STEPS), "--max-length", "64", "--batch-size", "2", "--save-every", "2"]
    assert main(["align", "--output", str(whole), *args]) == 0
    real, saves = torch.save, []

    def save(obj, f, *a, **k):
        saves.append(f)
        if str(f).endswith("optimizer.pt") and "step-000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    capsys.readouterr()
    assert main(["align", "--output", str(run), *args]) == 1
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert "cannot write the checkpoint of step 4" in line and "No space left on device" in line
    assert f"the last checkpoint is {run / 'checkpoints' / 'step-000002'}" in line and "--resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert main(["align", "--resume", str(run)]) == 0
    assert_same_run(run, whole)


def test_a_short_write_of_torch_save_names_the_free_space(tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk as its writer's short write ("unexpected pos"), without the OS's error: the
    line says so and how much room the run's folder has."""
    import booster_fast.checkpoint as checkpoint
    from collections import namedtuple

    def save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1344 vs 1236")

    usage, asked = namedtuple("usage", "total used free"), []
    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr("booster_fast.atomic.shutil.disk_usage",
                        lambda p: asked.append(str(p)) or usage(10 << 20, 10 << 20, 3 << 19))
    capsys.readouterr()
    assert main(["align", "--output", str(tmp_path / "run"), "--steps", "2", *SMALL, "--save-every", "1"]) == 1
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert "cannot write the checkpoint of step 1" in line and "unexpected pos 1344 vs 1236" in line, line
    assert "(torch.save stopped short, as on a full disk: 1.5 MiB free there)" in line, line
    assert asked and set(asked) == {str(tmp_path / "run")}, asked  # the run's folder, not its parent's


@pytest.mark.parametrize("case", ["free space unreadable", "another writer failure"])
def test_the_free_space_note_only_where_it_is_known_and_fits(tmp_path, capsys, monkeypatch, case):
    """The note is left out where the free space cannot be read (the error line as it was, no traceback), and
    for torch's other writer failures, which are no short write."""
    import booster_fast.checkpoint as checkpoint
    from collections import namedtuple

    short = case == "free space unreadable"
    message = ("[enforce fail at inline_container.cc:672] . unexpected pos 1344 vs 1236" if short else
               "[enforce fail at inline_container.cc:590] . PytorchStreamWriter failed writing central directory")

    def save(obj, f, *a, **k):
        raise RuntimeError(message)

    def usage(p):
        if short:
            raise PermissionError(13, "Permission denied")
        return namedtuple("usage", "total used free")(10 << 20, 10 << 20, 3 << 19)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr("booster_fast.atomic.shutil.disk_usage", usage)
    capsys.readouterr()
    assert main(["align", "--output", str(tmp_path / "run"), "--steps", "2", *SMALL, "--save-every", "1"]) == 1
    line = one_error_line(capsys.readouterr().err, progress=True)
    assert message.split(". ", 1)[1] in line and "stopped short" not in line and "MiB free" not in line, line


FSIZE_RUN = ["--steps", "2", "--max-length", "64", "--batch-size", "2", "--save-every", "2"]


@pytest.fixture(scope="module")
def checkpoint_sizes(tmp_path_factory):
    """The sizes of the adapter and the optimizer state in the step-2 checkpoint of FSIZE_RUN."""
    sizes = tmp_path_factory.mktemp("sizes") / "run"
    assert main(["align", "--output", str(sizes), *FSIZE_RUN]) == 0
    ckpt = sizes / "checkpoints" / "step-000002"
    return {f: (ckpt / f).stat().st_size for f in ("adapter_model.safetensors", "optimizer.pt")}


@pytest.mark.parametrize("failing", ["adapter_model.safetensors", "optimizer.pt"])
def test_a_file_size_limit_at_a_checkpoint_is_one_line(failing, checkpoint_sizes, tmp_path, capsys):
    """A real failed write (a file-size limit, as a full disk fails a write): safetensors reports it as its own
    SafetensorError and torch.save as a RuntimeError, not an OSError; either is the same one line and exit code 1,
    without a half-written checkpoint. The limit is this process's soft one, for the run alone (Python ignores
    SIGXFSZ, so a write past it fails with EFBIG)."""
    import resource

    adapter, optimizer = checkpoint_sizes["adapter_model.safetensors"], checkpoint_sizes["optimizer.pt"]
    assert adapter < optimizer
    limit = adapter // 2 if failing == "adapter_model.safetensors" else (adapter + optimizer) // 2
    run = tmp_path / "run"
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    capsys.readouterr()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        code = main(["align", "--output", str(run), *FSIZE_RUN])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    errors = [x for x in err.splitlines() if x.startswith("booster-fast: error:")]
    assert len(errors) == 1 and f"cannot write the checkpoint of step 2 in {run}: " in errors[0], err
    # no checkpoint had been written: nothing of the run is kept, no temporary folder either
    assert list(tmp_path.iterdir()) == []


def test_a_data_file_that_cannot_be_read_is_one_usage_error(tmp_path, monkeypatch):
    """Fingerprinting --data (for --resume's check) comes before the loaders' own read errors."""
    from booster_fast import run_args
    from booster_fast.cli import UsageError

    data = tmp_path / "rows.json"
    data.write_text("[]")

    def denied(path, mode="r", *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(run_args, "open", denied, raising=False)
    args = type("Args", (), {"data": str(data), "harmful_data": None})()
    with pytest.raises(UsageError, match=r"rows\.json: cannot read \(Permission denied\)$"):
        run_args.data_fingerprints(args)


def test_a_signal_between_log_intervals_writes_the_pending_metrics_before_its_checkpoint(tmp_path, monkeypatch, capsys):
    """SIGTERM at step 3 of --log-every 5: the checkpoint brings steps 1-3's metrics to disk first (they were
    still on the device), records their byte offset, and the resumed run's metrics equal an uninterrupted run's."""
    flags = ["--steps", "6", *SMALL, "--log-every", "5", "--save-every", "0"]
    assert main(["align", "--output", str(tmp_path / "whole"), *flags]) == 0
    orig = bf.Booster.step

    def step(self, a, h):
        out = orig(self, a, h)
        self._n = getattr(self, "_n", 0) + 1
        if self._n == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # the align loop's handler sets its flag
        return out

    monkeypatch.setattr(bf.Booster, "step", step)
    run = tmp_path / "run"
    assert main(["align", "--output", str(run), *flags]) == 143
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    state = json.loads((run / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["metrics_bytes"] == (run / "metrics.jsonl").stat().st_size
    monkeypatch.setattr(bf.Booster, "step", orig)
    assert main(["align", "--resume", str(run)]) == 0
    assert without_time(read_metrics(run)) == without_time(read_metrics(tmp_path / "whole"))


@pytest.mark.parametrize("when", ["last step", "final save"])
def test_a_signal_as_the_run_ends_is_not_lost(tmp_path, monkeypatch, capsys, when):
    """SIGINT in the last step, or while the final checkpoint and adapter are written: the run completes (no step
    is left to checkpoint before), and the exit code still says it was stopped, so that an experiment or a
    scheduler that sent it stops too; the run is whole (all its metrics, its adapter, no unfinished mark)."""
    from booster_fast.checkpoint import RunDir

    flags = ["--steps", "3", *SMALL, "--save-every", "0"]
    if when == "last step":
        orig = bf.Booster.step

        def step(self, a, h):
            self._n = getattr(self, "_n", 0) + 1
            if self._n == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return orig(self, a, h)

        monkeypatch.setattr(bf.Booster, "step", step)
    else:
        finish = RunDir.finish

        def finishing(self, *a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            return finish(self, *a, **k)

        monkeypatch.setattr(RunDir, "finish", finishing)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["align", "--output", str(run), *flags]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"booster-fast: SIGINT arrived as the run ended; the run is complete in {run}", line
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3] and (run / "adapter_model.safetensors").exists()
    assert not (run / MARKER).exists()


def test_interrupts_a_second_sigterm_waits_a_second_sigint_does_not_and_handlers_are_put_back():
    from booster_fast.align import Interrupts

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with Interrupts() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGTERM)    # the step is still finished and checkpointed
        except KeyboardInterrupt:
            pytest.fail("a second SIGTERM raised KeyboardInterrupt: the run would stop without its checkpoint")
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)     # a second Ctrl-C: at once
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_failed_checkpoint_write_keeps_the_older_one_even_at_keep_1(tmp_path, monkeypatch):
    """Older checkpoints are pruned only once the new one is in place."""
    import booster_fast.checkpoint as checkpoint

    model, tok, booster = _fresh()
    streams = _batches(tok)
    booster.step(next(streams["align"]), next(streams["harmful"]))
    save_checkpoint(tmp_path, 2, model, booster, streams, {"skipped": 0, "metrics_bytes": 0}, keep=1)
    real = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 4, model, booster, streams, {"skipped": 0, "metrics_bytes": 0}, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_every_file_of_a_checkpoint_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    import booster_fast.atomic as atomic

    synced = []
    real = atomic.fsync_file
    monkeypatch.setattr(atomic, "fsync_file", lambda p: (synced.append(Path(p)), real(p)))
    import booster_fast.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "fsync_file", atomic.fsync_file)
    model, tok, booster = _fresh()
    streams = _batches(tok)
    final = save_checkpoint(tmp_path, 1, model, booster, streams, {"skipped": 0, "metrics_bytes": 0}, keep=1)
    files = {p.relative_to(final) for p in final.rglob("*") if p.is_file()}
    assert files and all(p.parent.name.startswith(".tmp-step-000001") for p in synced)
    assert {p.name for p in synced} >= {f.name for f in files}


def test_finish_removes_the_marker_only_once_the_final_files_are_in_place(tmp_path, monkeypatch):
    import booster_fast.checkpoint as checkpoint
    from booster_fast.checkpoint import RunDir

    model, tok, _ = _fresh()
    run = RunDir.create(tmp_path / "run", {"command": "align"})
    real, moved = os.replace, []

    def replace(src, dst):
        if moved:
            raise OSError(5, "Input/output error")
        moved.append(dst)
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError):
        run.finish(model, tok)
    assert (tmp_path / "run" / MARKER).exists()     # not a finished run: one final file is missing


def test_only_rank_0_sets_an_unreadable_checkpoint_aside(tmp_path):
    from booster_fast.checkpoint import load_newest

    model, tok, booster = _fresh()
    streams = _batches(tok)
    for step in (1, 2):
        booster.step(next(streams["align"]), next(streams["harmful"]))
        save_checkpoint(tmp_path, step, model, booster, streams, {"skipped": 0, "metrics_bytes": 0}, keep=2)
    (tmp_path / "checkpoints" / "step-000002" / "rng.pt").write_bytes(b"garbage")
    model2, tok2, booster2 = _fresh()
    state, path = load_newest(tmp_path, model2, booster2, _batches(tok2), 2, set_aside=False)
    assert state["step"] == 1 and path.name == "step-000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_reopen_removes_what_a_killed_write_left(tmp_path):
    from booster_fast.checkpoint import RunDir

    run = tmp_path / "run"
    for name in ("step-000002", ".tmp-step-000004-123", ".old-step-000002-123"):
        (run / "checkpoints" / name).mkdir(parents=True)
    (run / ".final-tmp-123").mkdir()
    RunDir.reopen(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert not (run / ".final-tmp-123").exists()


def test_a_durable_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    from booster_fast.atomic import write_text_atomic

    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    target = tmp_path / "doc.json"
    write_text_atomic(target, "{}", durable=True)
    assert str(tmp_path) in synced                                           # the rename
    assert any(Path(p).parent == tmp_path and Path(p).name.startswith(".doc.json.") for p in synced)  # the content


@pytest.mark.parametrize("flag, value", [("lr", 1e-3), ("weight_decay", 0.5), ("lamb", 3.0), ("alpha", 0.5),
                                         ("seed", 7), ("steps", 40), ("max_length", 96), ("batch_size", 4),
                                         ("grad_accum", 2), ("lora_r", 16), ("max_grad_norm", 0.5)])
def test_resume_refuses_a_flag_that_changes_the_update(tmp_path, flag, value):
    """Only the flags of RESUME_FREE (device, logging, checkpointing, --max-skipped) may change on --resume."""
    from booster_fast.cli import UsageError
    from booster_fast.run_args import apply_resume

    run = _saved_run(tmp_path)
    with pytest.raises(UsageError, match=f"--{flag.replace('_', '-')} {value} \\(the run has"):
        apply_resume(_resume_args(run, **{flag: value}))


def test_resume_refuses_an_output_that_names_another_run(tmp_path):
    from booster_fast.cli import UsageError
    from booster_fast.run_args import apply_resume

    run = _saved_run(tmp_path)
    with pytest.raises(UsageError, match="name different runs"):
        apply_resume(_resume_args(run, output=str(tmp_path / "other")))
    same = _resume_args(run, output=str(run))
    apply_resume(same)
    assert same.output == str(run)


def test_resume_refuses_a_run_whose_data_file_is_gone(tmp_path):
    from booster_fast.cli import UsageError
    from booster_fast.run_args import apply_resume

    gone = str(tmp_path / "rows.json")
    run = _saved_run(tmp_path, data=gone, data_sha256={gone: "0" * 64})
    with pytest.raises(UsageError, match="rows.json is gone"):
        apply_resume(_resume_args(run))


def test_resume_refuses_a_run_whose_tokens_were_made_otherwise(tmp_path, capsys):
    """A run recorded without "encoding" may have tokenized each response apart from its prompt: a Hugging Face
    model's tokenizer can give other tokens now, so its resume is refused in one line (the built-in models' tokenizer
    gives the same tokens, so theirs goes on); `memory --resume` only reads the flags, and takes either."""
    from booster_fast.cli import UsageError
    from booster_fast.run_args import apply_resume

    model = str(tmp_path / "llama")  # (not loaded: the check comes first)
    for saved, refused in (({"model": model}, r"records no token encoding \(versions before the record may have "
                                               r"tokenized each response apart from its prompt\)"),
                           ({"model": model, "encoding": "joint"}, None),
                           ({}, None),
                           ({"encoding": "apart"}, 'tokenized its examples as "apart"')):
        run = _saved_run(tmp_path, **saved)
        if refused:
            with pytest.raises(UsageError, match=f"^--resume {re.escape(str(run))}: the run {refused}; .*"
                                                 "start a new run$"):
                apply_resume(_resume_args(run))
            apply_resume(_resume_args(run), finished_ok=True)
        else:
            args = _resume_args(run)
            apply_resume(args)
            assert args.model == saved.get("model", "tiny")
        shutil.rmtree(run)


# ------------------------------------------------------------------------------ resume: damaged contents
def _json_edit(path: Path, edit):
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


# what a hand edit or a damaged disk can leave in a checkpoint whose files all still parse
CONTENT_DAMAGE = {
    "trainer_state_list": lambda c: (c / "trainer_state.json").write_text("[]"),
    "no_streams": lambda c: _json_edit(c / "trainer_state.json", lambda s: s.pop("streams")),
    "no_metrics_bytes": lambda c: _json_edit(c / "trainer_state.json", lambda s: s.pop("metrics_bytes")),
    "step_a_string": lambda c: _json_edit(c / "trainer_state.json", lambda s: s.update(step="abc")),
    "step_not_its_name": lambda c: _json_edit(c / "trainer_state.json", lambda s: s.update(step=999)),
    "stream_state_empty": lambda c: _json_edit(c / "trainer_state.json", lambda s: s["streams"].update(align={})),
    "optimizer_a_list": lambda c: torch.save([1, 2, 3], c / "optimizer.pt"),
    "rng_another_dict": lambda c: torch.save({"x": torch.zeros(3)}, c / "rng.pt"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run folder with checkpoints of steps 1 and 2 (read-only: copy it), and a model, Booster and streams to
    load them into."""
    run = tmp_path_factory.mktemp("two_checkpoints")
    model, tok, booster = _fresh()
    streams = _batches(tok)
    for step in (1, 2):
        booster.step(next(streams["align"]), next(streams["harmful"]))
        save_checkpoint(run, step, model, booster, streams, {"skipped": 0, "metrics_bytes": 0}, keep=2)
    return run, model, booster, streams


@pytest.mark.parametrize("damage", CONTENT_DAMAGE)
def test_a_checkpoint_whose_contents_do_not_fit_is_unreadable(two_checkpoints, tmp_path, damage):
    """A checkpoint whose files parse but hold the wrong structure is unreadable as a corrupt one is (it gave an
    AttributeError, KeyError or TypeError): with none left, the newest one's error in one line and nothing
    renamed; with a good older one, that one loads and the damaged one is set aside."""
    from booster_fast.checkpoint import CheckpointError, load_newest

    pristine, model, booster, streams = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    for _, path in list_checkpoints(run):
        CONTENT_DAMAGE[damage](path)
    with pytest.raises(CheckpointError, match="^cannot resume: [^\n]*step-000002") as e:
        load_newest(run, model, booster, streams, 2)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    shutil.rmtree(run / "checkpoints" / "step-000001")
    shutil.copytree(pristine / "checkpoints" / "step-000001", run / "checkpoints" / "step-000001")
    state, path = load_newest(run, model, booster, streams, 2)
    assert state["step"] == 1 and path.name == "step-000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002.unreadable"]


def test_a_checkpoint_past_the_runs_steps_is_refused(tmp_path, capsys):
    """A checkpoint whose step (its name and its state agreeing) lies past the run's length is no checkpoint of
    this run: one line, exit 2, not a run marked finished with the weights of an earlier step; and the run as it
    was, an unreadable newer checkpoint not set aside."""
    run = tmp_path / "run"
    assert main(["align", "--output", str(run), "--steps", "3", *SMALL, "--save-every", "1"]) == 0
    (run / MARKER).write_text("")  # stopped after its last checkpoint: that one, of step 3 of 3, resumes
    assert main(["align", "--resume", str(run)]) == 0 and not (run / MARKER).exists()
    (run / MARKER).write_text("")
    newest = list_checkpoints(run)[-1][1]
    shutil.copytree(newest, newest.with_name("step-000050"))
    (newest.with_name("step-000050") / "trainer_state.json").write_text("[]")
    _json_edit(newest / "trainer_state.json", lambda s: s.update(step=4))  # one step past the run
    newest.rename(newest.with_name("step-000004"))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["align", "--resume", str(run)]) == 2
    assert "step-000004 is of step 4, past the run's 3 steps" in one_error_line(capsys.readouterr().err)
    assert (run / MARKER).exists() and sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_resume_whose_every_checkpoint_does_not_fit_changes_nothing(tmp_path, capsys, caplog):
    """Every checkpoint's trainer_state.json a JSON list: one line (no warning before it), exit 2, the run as it
    was."""
    run = tmp_path / "run"
    assert main(["align", "--output", str(run), "--steps", "2", *SMALL, "--save-every", "1"]) == 0
    (run / MARKER).write_text("")
    for _, path in list_checkpoints(run):
        (path / "trainer_state.json").write_text("[]")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    caplog.clear()
    assert main(["align", "--resume", str(run), "--log-every", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "step-000002/trainer_state.json is unreadable" in line and "(and the 1 older checkpoint does not load " \
        "either)" in line, line
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("saved, error", [
    ({"batch_size": "abc"}, 'batch_size is "abc", not an int'),
    ({"lr": None}, "lr is null, not a number"),
    ({"steps": None, "epochs": "x"}, 'epochs is "x", not a number'),
    ({"lora_r": 2.5}, "lora_r is 2.5, not an int"),
    ({"model": 5}, "model is 5, not a string"),
    ({"impl": "zzz"}, 'impl is "zzz", not one of reference, fast'),
    ({"no_meta_term": "no"}, 'no_meta_term is "no", not true or false'),
    ({"data_sha256": [1]}, r"data_sha256 is \[1\], not a JSON object"),
])
def test_resume_refuses_a_hand_edited_run_config(tmp_path, saved, error):
    """Each flag read back from run_config.json must be a value align's parser could have given (they went on
    into the run and failed there with a traceback); the error names the file and the key."""
    from booster_fast.cli import UsageError
    from booster_fast.run_args import apply_resume

    run = _saved_run(tmp_path, **saved)
    with pytest.raises(UsageError, match=f"^--resume {re.escape(str(run))}: run_config.json: {error}"):
        apply_resume(_resume_args(run))


def test_resume_refuses_a_run_config_that_is_no_json_object(tmp_path, capsys):
    run = _saved_run(tmp_path)
    (run / "run_config.json").write_text("[]")
    for command in ("align", "memory"):
        capsys.readouterr()
        assert main([command, "--resume", str(run)]) == 2
        assert "run_config.json holds [], not a JSON object" in one_error_line(capsys.readouterr().err)
    assert (run / "run_config.json").read_text() == "[]"


def test_resume_refuses_checkpoints_or_metrics_of_the_wrong_kind(tmp_path, capsys):
    """A resumed run writes checkpoints/ and metrics.jsonl: a file in place of the one (it trained, then failed at
    its checkpoint) or a directory in place of the other (an IsADirectoryError traceback) is refused first."""
    run = _saved_run(tmp_path)
    (run / "checkpoints").write_text("")
    capsys.readouterr()
    assert main(["align", "--resume", str(run)]) == 2
    assert "checkpoints is not a directory" in one_error_line(capsys.readouterr().err)
    (run / "checkpoints").unlink()
    (run / "metrics.jsonl").mkdir()
    assert main(["align", "--resume", str(run)]) == 2
    assert "metrics.jsonl is not a file" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "metrics.jsonl", "run_config.json"]


def test_a_resume_without_a_checkpoint_keeps_the_metrics_it_restarts(tmp_path, caplog):
    """A run killed before its first checkpoint (or whose checkpoints were removed) starts again from step 0; the
    metrics it had recorded were truncated in silence: they are kept aside, and a warning says so."""
    run = tmp_path / "run"
    assert main(["align", "--output", str(run), "--steps", "2", *SMALL, "--log-every", "1"]) == 0
    (run / MARKER).write_text("")
    shutil.rmtree(run / "checkpoints")
    recorded = (run / "metrics.jsonl").read_bytes()
    assert main(["align", "--resume", str(run)]) == 0
    assert "holds no checkpoint, so the run starts again from step 0" in caplog.text
    assert (run / "metrics.jsonl.before-restart").read_bytes() == recorded
    assert without_time(read_metrics(run)) == without_time(json.loads(line) for line in recorded.splitlines())
