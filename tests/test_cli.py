"""The `booster-fast align` command line, end to end on the embedded tiny model (CPU, offline).

Runs `booster_fast.cli.main([...])` in-process; one subprocess checks `python -m booster_fast` itself
(entry point, exit code, and that the real stderr holds exactly one line on a user error).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from booster_fast import add_lora, load_model
from booster_fast.cli import main

SEED = 43                      # the CLI's default --seed
E2E = ["--max-length", "96", "--batch-size", "4"]
FAST = ["--max-length", "64", "--batch-size", "2"]     # the other runs: smaller still (2 CPU cores in CI)
METRIC_KEYS = {"step", "loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm", "skipped",
               "step_time_s"}


def align(out, *extra, steps=3, shape=FAST):
    return main(["align", "--output", str(out), "--steps", str(steps), *shape, *extra])


def strict_json(constant: str):
    raise AssertionError(f"{constant} in a metrics line: not strict JSON")


def read_metrics(run: Path) -> list[dict]:
    """The run's metrics lines, as strict JSON (a NaN or Infinity in them fails)."""
    return [json.loads(line, parse_constant=strict_json) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    assert align(out, "--log-every", "2", shape=E2E) == 0
    return out


# ------------------------------------------------------------------------------------------- end to end
def test_align_writes_metrics_and_adapter(run_dir):
    assert (run_dir / "adapter_config.json").is_file()
    assert (run_dir / "adapter_model.safetensors").is_file()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) == METRIC_KEYS
        for k in METRIC_KEYS - {"step", "skipped"}:
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["step"], k, r[k])
        assert type(r["skipped"]) is int and r["skipped"] == 0, r  # a flag, as attack's metrics count them
        assert r["harmful_grad_norm"] > 0 and r["step_time_s"] > 0
    # nothing but the run itself beside it (the temporary directory was renamed, not left behind)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]


def test_on_a_gpu_the_metrics_carry_the_peak_memory(tmp_path, monkeypatch):
    """On CUDA each metrics line (and the progress bar) carries the most memory the run's tensors have held so far,
    from the allocator's statistics; on the CPU there is none (the run above has no such key)."""
    import booster_fast.align as align_module

    assert align_module.peak_memory_gib(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**29)
    assert align_module.peak_memory_gib(torch.device("cuda")) == 1.5
    seen = []
    monkeypatch.setattr(align_module, "peak_memory_gib", lambda device: seen.append(device) or 2.25)
    out = tmp_path / "run"
    assert align(out, steps=2) == 0
    rows = read_metrics(out)
    assert [r["peak_mem_gib"] for r in rows] == [2.25, 2.25] and set(rows[0]) == METRIC_KEYS | {"peak_mem_gib"}
    assert seen and all(d == torch.device("cpu") for d in seen)


def test_saved_adapter_loads_with_peft(run_dir):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "adapter_model.safetensors"))
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and cfg["lora_alpha"] == 4
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj"}

    base, tok = load_model("tiny", seed=SEED, device="cpu")
    ids = torch.tensor([tok.encode("### Instruction:\nHow do I pick a lock?\n\n### Response:\n")])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()
    model = PeftModel.from_pretrained(base, str(run_dir))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys() and len(saved) == 3 * 4 * 2   # 3 targets x 4 layers x (A, B)
    for k, v in saved.items():
        assert torch.equal(loaded[k].cpu(), v), k
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == base_logits.shape and torch.isfinite(logits).all()
    assert not torch.allclose(logits, base_logits)          # the adapter is active (B is no longer 0)

    # training happened: every tensor differs from the run's own init (same seed, fresh add_lora)
    fresh_base, _ = load_model("tiny", seed=SEED, device="cpu")
    torch.manual_seed(SEED)
    fresh = get_peft_model_state_dict(add_lora(fresh_base, r=32, alpha=4, targets=("q_proj", "k_proj", "v_proj")))
    assert fresh.keys() == saved.keys()
    for k, v in saved.items():
        assert not torch.equal(fresh[k], v), k
    assert all(not fresh[k].any() for k in fresh if "lora_B" in k)         # peft's B init is 0...
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)   # ...and training moved it


@pytest.mark.slow
def test_the_readme_demo_that_learns_does(tmp_path):
    """README's second demo, run as written: the tiny model's alignment loss falls as the README says (from
    ~7.85 to below 7.0 in 40 steps), while the paper's settings, the first demo, hardly move it."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```bash", text.index("To watch it learn")) + len("```bash")
    argv = shlex.split(text[start:text.index("```", start)])
    assert argv[:4] == ["booster-fast", "align", "--output", "runs/demo-learns"], argv
    assert main(["align", "--output", str(tmp_path / "learns"), *argv[4:]]) == 0
    loss = [r["loss"] for r in read_metrics(tmp_path / "learns")]
    assert len(loss) == 40 and 7.7 < loss[0] < 8.0 and loss[-1] < 7.0, loss
    assert main(["align", "--output", str(tmp_path / "paper"), "--log-every", "20"]) == 0
    paper = [r["loss"] for r in read_metrics(tmp_path / "paper")]
    assert abs(sum(paper[-5:]) - sum(paper[:5])) / 5 < 0.2, paper


def test_the_readme_layout_names_every_module():
    """The README's annotated file tree lists every module of the package and of benchmarks/ (a module added
    without its line there was the usual way for the layout to fall behind)."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    files = [p for p in (*(root / "booster_fast").glob("*.py"), *(root / "benchmarks").glob("*.py"),
                         *(root / "benchmarks").glob("*.sh")) if not p.name.startswith("__")]
    assert len(files) > 40
    missing = [p.name for p in files if not re.search(rf"(?<![\w.]){re.escape(p.name)}(?![\w.])", layout)]
    assert not missing, f"not in the README's layout: {missing}"


def test_sft_method(tmp_path):
    out = tmp_path / "sft"
    assert align(out, "--method", "sft", steps=1) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1]
    for r in rows:
        assert math.isfinite(r["loss"])
        # SFT has no harmful pass: those metrics are absent (null), not NaN (invalid JSON)
        assert r["harmful_loss"] is None and r["harmful_grad_norm"] is None
    assert (out / "adapter_model.safetensors").is_file()


def test_reference_impl(tmp_path):
    out = tmp_path / "ref"
    assert align(out, "--impl", "reference", steps=1) == 0
    rows = read_metrics(out)
    assert len(rows) == 1 and all(math.isfinite(r[k]) for r in rows for k in METRIC_KEYS)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_perturb_aware_logs_the_perturbed_alignment_loss(tmp_path, impl):
    """--perturb-aware (Booster + Vaccine) adds `loss_perturbed`, the alignment loss under the attention-output
    perturbation: above `loss` (e climbs it), and a larger --rho climbs it further."""
    rows = {}
    for rho in ("0.5", "4"):
        out = tmp_path / f"{impl}-{rho}"
        assert align(out, "--impl", impl, "--perturb-aware", "--rho", rho, steps=1) == 0
        (rows[rho],) = read_metrics(out)
        assert set(rows[rho]) == METRIC_KEYS | {"loss_perturbed"}
        assert json.loads((out / "run_config.json").read_text())["rho"] == float(rho)
    assert rows["0.5"]["loss"] == pytest.approx(rows["4"]["loss"], rel=1e-6)  # the same loss at w
    assert rows["0.5"]["loss"] < rows["0.5"]["loss_perturbed"] < rows["4"]["loss_perturbed"]


def test_packing_on_and_off_log_the_same_run(tmp_path, caplog):
    """`align` packs the fast engine's batches by default; --packing off gives the same losses (fp32 summation
    order apart) on rows that packing shrinks (the built-in rows fill ~60% of 160 tokens)."""
    from booster_fast.data import BatchStream, encode_all, load_safety_data
    from booster_fast.packing import pack

    _, tok = load_model("tiny", device="cpu")
    rows = encode_all(tok, load_safety_data("builtin", "train")[0], 160)[0]
    first = next(BatchStream(rows, 4, 160, tok.pad_token_id, SEED))
    assert pack(first)["input_ids"].numel() < first["input_ids"].numel(), "packing would not shrink these rows"
    shape = ["--max-length", "160", "--batch-size", "4"]
    runs = {}
    for packing in ("on", "off"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="booster_fast"):
            assert align(tmp_path / packing, "--packing", packing, steps=2, shape=shape) == 0
        assert ("batches packed without their pads" in caplog.text) == (packing == "on")
        runs[packing] = read_metrics(tmp_path / packing)
    assert json.loads((tmp_path / "on" / "run_config.json").read_text())["packing"] == "on"
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"):
        got, want = ([r[key] for r in runs[p]] for p in ("on", "off"))
        assert got == pytest.approx(want, rel=1e-5), key


def test_nf4_on_cpu(tmp_path, caplog, monkeypatch):
    out = tmp_path / "nf4"
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # a CPU without bf16 instructions
        monkeypatch.setattr(torch.cpu, check, lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert align(out, "--quant", "nf4", steps=2) == 0
    assert "align: tiny (NF4 base weights) on cpu, booster/fast" in caplog.text  # the start line says so
    # NF4 computes in bf16 whatever --dtype says: the way to fp32 is without it
    assert "slower than with --quant none --dtype fp32" in caplog.text
    rows = read_metrics(out)
    assert len(rows) == 2
    assert all(math.isfinite(r[k]) for r in rows for k in METRIC_KEYS)


def test_overwrite_replaces_an_existing_run(tmp_path, run_dir, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = _snapshot(out)                                                 # files and checkpoints/
    capsys.readouterr()
    assert align(out, steps=1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("booster-fast: error:") and "--overwrite" in err[0]
    assert _snapshot(out) == before                                         # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    assert align(out, "--overwrite", steps=1) == 0
    assert [r["step"] for r in read_metrics(out)] == [1]                    # the new run replaced the old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]            # no .old / .tmp left over


# ------------------------------------------------------------------------------------------- bad input
def _bad_jsonl(tmp: Path) -> str:
    p = tmp / "inputs" / "bad.jsonl"
    p.parent.mkdir(exist_ok=True)
    p.write_text('{"prompt": "How?", "refusal": "No.", "response": "Like so."}\n{"prompt": "broken", \n')
    return str(p)


def _regular_file(tmp: Path) -> Path:
    f = tmp / "inputs" / "a_file"
    f.parent.mkdir(exist_ok=True)
    f.write_text("not a directory\n")
    return f


BAD = {
    "unknown-model": lambda tmp: (["--model", "no/such-model-xyz"], None),
    "missing-data": lambda tmp: (["--data", str(tmp / "inputs" / "missing.jsonl")], None),
    "malformed-jsonl": lambda tmp: (["--data", _bad_jsonl(tmp)], None),
    "negative-lamb": lambda tmp: (["--lamb", "-1"], None),
    "zero-alpha": lambda tmp: (["--alpha", "0"], None),
    "zero-rho": lambda tmp: (["--perturb-aware", "--rho", "0"], None),
    "perturb-aware-sft": lambda tmp: (["--perturb-aware", "--method", "sft"], None),
    "rho-without-perturb-aware": lambda tmp: (["--rho", "2"], None),
    "infinite-rho": lambda tmp: (["--perturb-aware", "--rho", "inf"], None),
    "max-length-too-short": lambda tmp: (["--max-length", "8"], None),
    "output-under-a-file": lambda tmp: ([], _regular_file(tmp) / "run"),
    "output-is-a-file": lambda tmp: ([], _regular_file(tmp)),
    "unknown-target": lambda tmp: (["--targets", "nonexistent_proj"], None),
    "cuda-without-cuda": lambda tmp: (["--device", "cuda"], None),
    "graphs-on-cpu": lambda tmp: (["--device", "cpu", "--graphs", "on"], None),
}


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    if case == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    extra, out = BAD[case](tmp_path)
    out = out or tmp_path / "run"
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = main(["align", "--output", str(out), "--steps", "1", *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("booster-fast: error:"), err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before          # no temp dir, no half-written run, inputs unchanged


@pytest.mark.parametrize("argv, needle", [
    (["align", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["align", "--seed", "99999999999999999999"], "argument --seed: expected an integer from 0 to 2**63 - 1"),
    (["align", "--seed", "-1"], "argument --seed: expected an integer from 0 to 2**63 - 1, got -1"),
    (["attack", "--adapter", "x", "--output", "y", "--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    (["eval", "--adapter", "x", "--output", "y", "--base-seed", "2e99"], "argument --base-seed: expected an integer"),
    (["align", "--steps", "2", "--epochs", "1"], "not allowed with argument"),
    (["align", "--save_steps", "5", "--logging_steps", "2"], "--save_steps -> --save-every, --logging_steps -> "
                                                               "--log-every"),
])
def test_argparse_errors_are_one_line(argv, needle, capsys):
    """argparse's own errors (a value of the wrong type, exclusive flags, an unknown name) are one line too, not a
    usage block; the original trainer's names get their hint."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert lines[0].startswith("booster-fast") and lines[0].endswith("--help)")


def test_module_entry_point_exit_code_and_real_stderr(tmp_path):
    """`python -m booster_fast`: exit code 2 and exactly one line on the real stderr (logging and progress
    output included), on an error raised after the model is loaded and the temporary run dir exists."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "booster_fast", "align", "--output", str(out), "--steps", "1",
                           "--max-length", "8", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("booster-fast: error:"), proc.stderr
    assert "max_length" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_cli_logs_its_own_info_and_only_warnings_of_others(tmp_path):
    """The CLI's log shows booster_fast's progress lines and other libraries' warnings, not their INFO chatter
    (httpx logs every request of a download at INFO)."""
    code = ("import logging, sys\n"
            "from booster_fast.cli import main\n"
            f"assert main(['align', '--output', {str(tmp_path / 'run')!r}, '--epochs', '-1']) == 2\n"
            "logging.getLogger('httpx').info('third-party info')\n"
            "logging.getLogger('some.library').warning('third-party warning')\n"
            "logging.getLogger('booster_fast').info('our progress')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "our progress" in proc.stderr and "third-party warning" in proc.stderr, proc.stderr
    assert "third-party info" not in proc.stderr, proc.stderr


def test_progress_is_plain_lines_where_stderr_is_kept_and_a_bar_on_a_terminal(tmp_path, monkeypatch):
    """stderr to a file (here a pipe): no bar, whose carriage-return frames would glue into one line there, but
    one plain line per --log-every interval, in the bar's order; a terminal gets the bar, TQDM_DISABLE none."""
    from booster_fast import progress

    proc = subprocess.run([sys.executable, "-m", "booster_fast", "align", "--output", str(tmp_path / "run"),
                           "--steps", "4", "--log-every", "2", *FAST], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"})
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("booster: step ")]
    assert [line.split(",")[0] for line in steps] == ["booster: step 2/4", "booster: step 4/4"], proc.stderr
    assert all(" loss " in line and " harmful " in line for line in steps), steps
    # the rate of each interval, and before the last step the time left at that rate
    assert re.search(r", \d+\.\d\d steps/s, 0:00:\d\d left$", steps[0]) and steps[1].endswith(" steps/s"), steps

    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            pass

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress.shown() and not progress.progress_bar(4, "x").disable
    assert progress.progress_bar(4, "x", enabled=False).disable  # a rank other than 0
    bar = progress.progress_bar(5, "x", initial=2, leave=False)  # a resumed run's bar; eval's go when done
    assert bar.n == 2 and bar.leave is False
    monkeypatch.setenv("TQDM_DISABLE", "")  # empty counts as unset
    assert progress.shown()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not progress.shown() and progress.progress_bar(4, "x").disable


# ------------------------------------------------------------------------------------- once-found defects
def test_run_dir_permissions_follow_umask(run_dir):
    """The run directory and every file in it (the adapter too: safetensors creates its files 0600), as mkdir and
    open() would make them."""
    umask = os.umask(0)
    os.umask(umask)
    assert run_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert any(f.name == "adapter_model.safetensors" for f in files)
    assert {f.relative_to(run_dir).as_posix(): oct(f.stat().st_mode & 0o777) for f in files} == \
        {f.relative_to(run_dir).as_posix(): oct(0o666 & ~umask) for f in files}


def test_non_positive_epochs_is_a_usage_error(tmp_path, capsys):
    code = main(["align", "--output", str(tmp_path / "run"), "--epochs", "-1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().startswith("booster-fast: error:")


@pytest.mark.parametrize("command", ["align", "bench"])
def test_fused_ops_on_without_a_device_for_them(command, monkeypatch, tmp_path, capsys):
    """--fused-ops on where the Triton kernels cannot run (here: the interpreter taken away) is refused up front."""
    from booster_fast.kernels import model_kernels

    monkeypatch.setattr(model_kernels, "available", lambda device: False)
    extra = ["--output", str(tmp_path / "run"), "--steps", "1", *FAST] if command == "align" else ["--steps", "1"]
    code = main([command, "--device", "cpu", "--fused-ops", "on", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--fused-ops on needs a CUDA device" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_no_new_parent_dirs(tmp_path, capsys):
    code = main(["align", "--output", str(tmp_path / "new" / "deeper" / "run"), "--model", "no/such-model-xyz"])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_a_directory_that_holds_no_run(tmp_path, capsys):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code = main(["align", "--output", str(precious), "--overwrite", *FAST])
    assert code == 2 and "holds no run" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_torchrun_two_ranks_on_gloo(tmp_path):
    """`torchrun --nproc_per_node 2 -m booster_fast align` trains on the CPU with gloo, each rank packing its own
    rows; rank 0 alone writes, and the losses are those of one process on the union batch, padded."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shape = ["--max-length", "160"]  # the built-in rows fill ~60% of it: packing shrinks them
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "booster_fast", "align", "--output", str(out),
                           "--steps", "2", "--log-every", "1", "--batch-size", "2", *shape],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batches packed without their pads" in proc.stderr
    assert "of 2+2 rows per process (4+4 per update) x 160 tokens" in proc.stderr  # the start line
    steps = [line.split(",")[0] for line in proc.stderr.splitlines() if line.startswith("booster: step ")]
    assert steps == ["booster: step 1/2", "booster: step 2/2"], proc.stderr[-2000:]  # rank 0's lines alone
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # losses are summed over ranks (each holds its share of the global token mean): one process's on the union
    union = tmp_path / "union"
    assert align(union, "--packing", "off", steps=2, shape=[*shape, "--batch-size", "4"]) == 0
    for key in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in read_metrics(union)], rel=1e-5), key
    shutil.rmtree(union)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fused_ops_flag_reaches_the_config():
    from booster_fast.run_args import config_from_args
    from booster_fast.cli import build_parser

    for flag, want in (("auto", None), ("on", True), ("off", False)):
        args = build_parser().parse_args(["align", "--output", "x", "--fused-ops", flag])
        assert config_from_args(args, "fast").fused_ops is want


@pytest.mark.parametrize("device, cuda, on_cpu", [("cpu", True, True), ("cpu:0", True, True),
                                                    ("cuda:0", True, False), (None, False, True), (None, True, False)])
def test_denormals_are_flushed_for_every_cpu_device_name(device, cuda, on_cpu, monkeypatch):
    """align and bench flush denormals on the CPU (6-10x slower steps otherwise): `cpu:0` is the CPU too."""
    from booster_fast.cli import _on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert _on_cpu(argparse.Namespace(device=device)) is on_cpu


@pytest.mark.parametrize("command", ["align", "bench"])
def test_align_and_bench_run_with_denormals_flushed_on_the_cpu_only(command, monkeypatch, tmp_path):
    """The flush is on for the whole run on the CPU and off again after it; on CUDA it is never touched."""
    import booster_fast.align
    import booster_fast.bench

    calls, seen = [], []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: calls.append(on) or True)
    runner = {"align": (booster_fast.align, "run_align"), "bench": (booster_fast.bench, "run_bench")}[command]
    monkeypatch.setattr(*runner, lambda args: seen.append(list(calls)) or 0)
    for device, during, after in (("cpu", [True], [True, False]), ("cuda", [], [])):
        calls.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
        assert main([command, "--device", device, "--output", str(tmp_path / "out")]) == 0
        assert seen[-1] == during and calls == after, (device, seen[-1], calls)


def test_the_original_codes_flag_names_get_a_hint(capsys):
    """A swap-in user's first command uses the original train.py's names: the error names ours."""
    with pytest.raises(SystemExit) as e:
        main(["align", "--learning_rate", "1e-4", "--num_train_epochs=3", "--sample_num", "500", "--tf32", "True"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("booster-fast align: error: unrecognized arguments: --learning_rate 1e-4")
    assert err.endswith("(see booster-fast align --help)"), err  # the subcommand's help, where its flags are
    for hint in ("--learning_rate -> --lr", "--num_train_epochs -> --epochs", "--sample_num -> --align-samples",
                 "--tf32 -> nothing"):
        assert hint in err, err
    with pytest.raises(SystemExit):
        main(["align", "--no-such-flag"])
    assert "original" not in capsys.readouterr().err


def test_help_gives_each_flags_default(capsys):
    """--help names a flag's default where its text does not already; "(paper: X)" becomes "(default: X, the
    paper's)", or names both where they differ."""
    with pytest.raises(SystemExit):
        main(["align", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--log-every N read metrics from the device every N steps (default: 10)",
                 "--output DIR run directory (adapter, metrics.jsonl) (default: runs/demo)",
                 "--keep-checkpoints K keep the newest K checkpoints (default: 2)",
                 "the original trainer's, op for op (default: fast)",
                 "k micro-batches of b equal one batch of k·b (default: 1)."):
        assert flag in text, flag
    assert "(paper: 5e-4) (default" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert "--lr LR AdamW learning rate, constant (default: 0.0005, the paper's)" in text
    assert "--lora-r LORA_R LoRA rank (default: 32, the paper's)" in text and "(paper:" not in text
    from booster_fast.cli import Parser

    p = Parser(prog="x")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (paper: 5e-4)")
    p.add_argument("--targets", default="q,v", help="modules (paper: q,k,v)")  # not a number: not the paper's
    p.add_argument("--probes", type=int, default=0, help="probes; 0: off")  # 0 is a default, though 0 == False
    p.add_argument("--quiet", action="store_true", help="say less")
    text = " ".join(p.format_help().split())
    assert "learning rate (default: 0.001; paper: 5e-4)" in text and "modules (default: q,v; paper: q,k,v)" in text
    assert "probes; 0: off (default: 0)" in text and "say less" in text and "(default: False)" not in text
    with pytest.raises(SystemExit):  # a text that names its default keeps it, once
        main(["experiment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default tiny)" in text and "(default: tiny)" not in text


def test_memory_help_hides_the_flags_for_the_run_alone_and_accepts_them(capsys):
    """memory takes align's command line as it is; the flags that change the run but not its step are accepted
    without a word and left out of its --help (align's shows them)."""
    run_only = ("--output", "--overwrite", "--save-every", "--keep-checkpoints", "--log-every", "--max-skipped")
    for command in ("align", "memory"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        usage = capsys.readouterr().out.split("options:")[0]
        assert all((f"[{flag}" in usage) == (command == "align") for flag in run_only), (command, usage)
    assert main(["memory", "--model", "tiny", "--output", "x", "--overwrite", "--save-every", "3",
                 "--keep-checkpoints", "1", "--log-every", "2", "--max-skipped", "4", "--steps", "5"]) == 0
    assert "LoRA" in capsys.readouterr().out


def test_sample_counts_take_the_first_rows_and_the_default_length_is_saved(tmp_path):
    """--align-samples / --harmful-samples (the original's sample_num / bad_sample_num) keep the first N rows of
    each set; with neither --steps nor --epochs a built-in model runs 20 steps and a real model the paper's 20
    epochs, and the resolved value is what run_config.json keeps (so that --resume runs the same length)."""
    from types import SimpleNamespace

    from booster_fast import align as al
    from booster_fast.data import load_safety_data

    args = SimpleNamespace(data="builtin", harmful_data=None, align_samples=7, harmful_samples=5)
    a, h = al.load_data(args)
    full_a, full_h = load_safety_data("builtin", "train")
    assert a == full_a[:7] and h == full_h[:5]
    out = tmp_path / "default"
    assert main(["align", "--output", str(out), "--max-length", "64", "--batch-size", "1", "--align-samples", "6",
                 "--harmful-samples", "4", "--save-every", "0"]) == 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["align_samples"] == 6 and cfg["harmful_samples"] == 4
    assert (cfg["steps"], cfg["epochs"]) == (20, None)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 20
    model, tok = load_model("tiny", device="cpu")  # a "real" model: a local directory
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "real"
    # fp32: a pretrained model loads in bf16, many times slower on a CPU without bf16 instructions; same length
    assert main(["align", "--model", str(tmp_path / "model"), "--dtype", "fp32", "--output", str(out),
                 "--max-length", "64", "--batch-size", "1", "--align-samples", "2", "--save-every", "0",
                 "--log-every", "20"]) == 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert (cfg["steps"], cfg["epochs"]) == (None, 20.0)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 40


def test_step_time_is_the_intervals_time_per_step(tmp_path, monkeypatch):
    """Metrics reach the host once per --log-every steps: each row's step_time_s is that interval's time divided
    by its steps (a clock that moves 1 s per reading: 1/3 s per step at --log-every 3)."""
    from types import SimpleNamespace

    from booster_fast import align as al

    ticks = iter(range(1, 1000))
    monkeypatch.setattr(al, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    out = tmp_path / "run"
    assert main(["align", "--output", str(out), "--steps", "6", "--max-length", "64", "--batch-size", "2",
                 "--log-every", "3", "--save-every", "0"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["step_time_s"] == pytest.approx(1 / 3) for r in rows), [r["step_time_s"] for r in rows]


@pytest.mark.parametrize("epochs, steps", [(1.25, 3), (0.01, 1)])
def test_a_fraction_of_an_epoch_rounds_up_to_whole_steps(tmp_path, epochs, steps):
    """4 rows in batches of 2 are 2 steps per epoch: 1.25 epochs are 3 steps (a part step counts), and any
    positive --epochs at least one."""
    out = tmp_path / "run"
    assert main(["align", "--output", str(out), "--max-length", "64", "--batch-size", "2", "--align-samples", "4",
                 "--epochs", str(epochs), "--save-every", "0", "--log-every", "1"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, steps + 1))


def test_rows_with_an_empty_answer_are_counted_in_one_warning(tmp_path, caplog):
    """A data file whose answers are empty trains as the original would (EOS is the only target), said once."""
    from types import SimpleNamespace

    from booster_fast import align as al

    rows = [{"prompt": f"question {i}?", "refusal": " " if i % 3 == 0 else "No.", "response": "Sure."}
            for i in range(9)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    args = SimpleNamespace(data=str(tmp_path / "rows.json"), harmful_data=None, align_samples=None,
                           harmful_samples=None)
    with caplog.at_level(logging.WARNING, logger="booster_fast"):
        al.load_data(args)
    warned = [r.getMessage() for r in caplog.records if "empty answer" in r.getMessage()]
    assert warned == ["3 of the 9 alignment rows have an empty answer: their only target is the end-of-sequence "
                      "token"]


def test_a_cuda_device_becomes_the_current_one(monkeypatch):
    """--device cuda:N is made the current CUDA device (Triton launches its kernels on the current one), and an
    index beyond the machine's devices is one usage error (the CUDA calls faked: this machine has none)."""
    from booster_fast.cli import UsageError
    from booster_fast.run_args import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert resolve_device("cuda", rank_local=1) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu") and len(current) == 2
    with pytest.raises(UsageError, match="--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("extra", [["--keep-checkpoints", "0"], ["--log-every", "0"], ["--save-every", "-1"]])
def test_bad_run_loop_flags_exit_2_with_one_line(extra, tmp_path, capsys):
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(["align", "--output", str(tmp_path / "run"), "--steps", "1", *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"booster-fast: error: {extra[0]} must be >= {int(extra[1]) + 1}, got {extra[1]}"
    assert _snapshot(tmp_path) == before


def test_the_seed_range_ends_at_2_to_the_63_minus_1():
    """--seed takes 0 .. 2**63 - 1, the bounds its error names; 2**63 is one past."""
    from booster_fast.cli import seed_value

    assert seed_value("0") == 0 and seed_value(str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 2\\*\\*63 - 1"):
        seed_value(str(2**63))


def test_every_original_flag_name_gets_its_hint(capsys):
    """Each of the original trainer's names in ORIGINAL_FLAGS is answered with its hint, and every hint that names
    one of our flags names one that align has."""
    from booster_fast.cli import ORIGINAL_FLAGS, build_parser

    # the original train.py's / scripts' names a swap-in command line uses (the HF TrainingArguments and its own)
    assert set(ORIGINAL_FLAGS) == {
        "--model_name_or_path", "--output_dir", "--learning_rate", "--num_train_epochs", "--max_steps",
        "--per_device_train_batch_size", "--gradient_accumulation_steps", "--model_max_length", "--weight_decay",
        "--max_grad_norm", "--perturb_aware", "--sample_num", "--bad_sample_num", "--data_path", "--optimizer",
        "--lora_r", "--lora_alpha", "--bf16", "--tf32", "--lr_scheduler_type", "--save_steps", "--save_total_limit",
        "--logging_steps"}
    align_flags = {s for a in build_parser()._subparsers._group_actions[0].choices["align"]._actions
                   for s in a.option_strings}
    for flag, hint in ORIGINAL_FLAGS.items():
        ours = hint.split()[0]
        assert ours == "nothing" or ours in align_flags, (flag, hint)
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["align", flag, "1"])
        assert f"{flag} -> {hint}" in capsys.readouterr().err, flag


def test_ctrl_c_in_a_command_is_exit_130_with_one_line(capsys):
    """Ctrl-C in a command without a handler of its own (attack, eval, bench): exit code 130, one line."""
    from booster_fast.cli import run_reporting

    def interrupted():
        raise KeyboardInterrupt

    capsys.readouterr()
    assert run_reporting(interrupted) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["booster-fast: interrupted"]


def test_a_callers_own_sigterm_handler_is_put_back():
    """A process that embeds the CLI with a SIGTERM handler of its own gets that handler back (not the default)."""
    from booster_fast.cli import run_reporting

    def own(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, own)
    try:
        assert run_reporting(lambda: 0) == 0
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_command_run_outside_the_main_thread_installs_no_handler():
    """run_reporting in another thread (where signal.signal raises ValueError) runs the command as it is."""
    from booster_fast.cli import run_reporting

    got = []
    t = threading.Thread(target=lambda: got.append(run_reporting(lambda: 7)))
    t.start()
    t.join(60)
    assert got == [7]


@pytest.mark.parametrize("argv, want", [
    (["align"], (8, 128)), (["align", "--model", "llama-7b-shape"], (10, 256)),
    (["bench"], (8, 64)), (["bench", "--model", "llama-7b-shape"], (10, 256)),
    (["align", "--batch-size", "3", "--max-length", "40"], (3, 40)),
])
def test_the_batch_size_and_length_defaults_follow_the_model_and_command(argv, want, monkeypatch):
    """tiny: 8 rows of 128 tokens (the bench's quick 64); any other model the paper's 10 x 256; given values kept."""
    from booster_fast import cli

    seen = []
    monkeypatch.setattr(cli, "_align", lambda args: seen.append(args) or 0)
    monkeypatch.setattr(cli, "_bench", lambda args: seen.append(args) or 0)
    assert main(argv) == 0
    assert (seen[0].batch_size, seen[0].max_length) == want


def test_relative_local_files_of_eval_are_made_absolute(tmp_path, monkeypatch):
    """eval's --prompts (and the other data flags) naming a local file are recorded absolute, as align's --data."""
    from booster_fast import evaluate

    (tmp_path / "prompts.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(evaluate, "main", lambda args: seen.append(args) or 0)
    assert main(["eval", "--adapter", "x", "--output", "y.json", "--prompts", "prompts.json"]) == 0
    assert seen[0].prompts == str(tmp_path / "prompts.json")


@pytest.mark.parametrize("command, flag, name", [
    ("attack", "--benign", "sst2"), ("attack", "--benign", "agnews"), ("attack", "--benign", "gsm8k"),
    ("attack", "--harmful", "beavertails"), ("eval", "--prompts", "builtin"),
    ("align", "--data", "beavertails"), ("memory", "--data", "builtin")])
def test_a_data_set_name_stays_a_name_beside_a_folder_of_that_name(tmp_path, monkeypatch, command, flag, name):
    """A folder named after a data set (`hf download stanfordnlp/sst2 --local-dir sst2`) in the working directory
    must not turn the name into its path: an experiment's attack stage failed on it, after its alignment."""
    from booster_fast.cli import parse

    (tmp_path / name).mkdir()
    (tmp_path / "rows.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    adapter = ["--adapter", "x", "--output", "y.json"] if command in ("attack", "eval") else []
    args = parse([command, *adapter, flag, name])
    assert getattr(args, flag[2:]) == name
    assert getattr(parse([command, *adapter, flag, "rows.jsonl"]), flag[2:]) == str(tmp_path / "rows.jsonl")


def test_max_length_beyond_a_rescaling_ropes_length_is_refused_by_the_fast_engine(tmp_path, capsys):
    """A local model whose dynamic RoPE rescales past 32 positions: --max-length 64 ends in one line and exit 2 with
    nothing written under the fast engine (whose passes would not give the reference's update there), and runs
    under the reference; the same for bench."""
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model, tok = load_model("tiny", device="cpu", max_position_embeddings=32, rope_parameters=rope)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    common = ["align", "--model", str(tmp_path / "model"), "--dtype", "fp32", "--max-length", "64", "--steps", "1",
              "--batch-size", "2", "--save-every", "0"]
    assert main(common + ["--output", str(tmp_path / "fast")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("booster-fast: error: --max-length 64: this model's 'dynamic' RoPE changes its "
                              "frequencies beyond 32 positions"), err
    assert not (tmp_path / "fast").exists()
    assert main(common + ["--impl", "reference", "--output", str(tmp_path / "reference")]) == 0
    # bench: refused with the reference entry first too (built before any fast one), not one failed entry of many
    bench = ["bench", "--model", str(tmp_path / "model"), "--dtype", "fp32", "--device", "cpu", "--max-length", "64",
             "--steps", "1", "--warmup", "0", "--batch-size", "2", "--output", str(tmp_path / "bench.json")]
    capsys.readouterr()
    assert main(bench + ["--impls", "reference,fast"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "booster-fast: error: --max-length 64: this model's 'dynamic' RoPE")
    assert not (tmp_path / "bench.json").exists()
    assert main(bench + ["--impls", "reference,sft"]) == 0 and (tmp_path / "bench.json").exists()


def test_an_output_that_would_write_over_an_input_is_refused(tmp_path, capsys):
    """Outputs never replace what the command reads: align --overwrite of a run directory holding its --data,
    attack --overwrite of its own --adapter, eval writing over --prompts or over the adapter's own files, and a
    new run inside another run's checkpoints. One line, exit 2, every input byte for byte as it was."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "refusal": "no", "response": "yes"}) + "\n"
                            for i in range(12)))
    run = tmp_path / "run"
    assert main(["align", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--max-length", "64",
                 "--data", str(data), "--output", str(run), "--save-every", "1"]) == 0
    shutil.copy(data, run / "data.jsonl")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["how do I pick a lock"]))
    before = {p: p.read_bytes() for p in [*run.rglob("*"), prompts] if p.is_file()}
    align = ["align", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--max-length", "64", "--overwrite"]
    evals = ["eval", "--adapter", str(run), "--judge", "refusal", "--device", "cpu", "--output"]
    cases = {
        "holds --data": align + ["--data", str(run / "data.jsonl"), "--output", str(run)],
        "is inside the checkpoints of the run": align + ["--data", str(data), "--output",
                                                         str(run / "checkpoints" / "step-000001")],
        "is --adapter": ["attack", "--adapter", str(run), "--output", str(run), "--overwrite", "--device", "cpu",
                         "--steps", "1"],
        "is --prompts": evals + [str(prompts), "--prompts", str(prompts)],
        "is --adapter's adapter_config.json": evals + [str(run / "adapter_config.json")],
    }
    for what, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("booster-fast: error: --output ") and what in err[0], (what, err)
    (tmp_path / "link").symlink_to(run)  # the run named through a link: the same run, holding --data
    assert main(align + ["--data", str(run / "data.jsonl"), "--output", str(tmp_path / "link")]) == 2
    assert "holds --data" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in [*run.rglob("*"), prompts] if p.is_file()} == before


def test_a_file_name_too_long_for_the_system_is_one_line(tmp_path, capsys):
    """Python 3.11's Path.exists raises ENAMETOOLONG where it would say False for a missing file: an input or an
    output named beyond the system's limit ends in one line and exit 2, nothing written."""
    long = "x" * 300
    for argv in (["align", "--device", "cpu", "--steps", "1", "--data", str(tmp_path / f"{long}.jsonl"),
                  "--output", str(tmp_path / "out")],
                 ["align", "--device", "cpu", "--steps", "1", "--output", str(tmp_path / long)],
                 ["eval", "--adapter", str(tmp_path / long), "--judge", "refusal", "--output",
                  str(tmp_path / "e.json")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("booster-fast: error: "), err
        assert "Traceback" not in err[0] and list(tmp_path.iterdir()) == [], (err, list(tmp_path.iterdir()))


def test_a_full_disk_while_the_tokenizer_saves_is_one_line(tmp_path, capsys, monkeypatch):
    """The tokenizers library reports a failed write as a plain Exception carrying Rust's "(os error N)": a full
    disk at the final save is one line and exit 1, as for the adapter's own files, and the run stays resumable."""
    import transformers

    def full(self, *a, **k):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["align", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--max-length", "64",
                 "--save-every", "1", "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar's lines)
    assert err.startswith(f"booster-fast: error: cannot write the adapter in {out}: No space left on device"), err
    assert (out / ".incomplete").exists() and (out / "checkpoints" / "step-000001").is_dir()
    assert not list(out.glob(".final-tmp-*")), list(out.iterdir())  # no half-saved adapter left behind


def test_an_exception_in_one_line():
    """errors.reason keeps a message's first line, joined by the next where the first is a header ending in a
    colon (what is wrong is on the line after it), and cuts at the limit; described adds the type's name."""
    from booster_fast.errors import described, reason

    header = RuntimeError("Error(s) in loading state_dict for Linear:\n\tsize mismatch for weight: [4, 3] vs [4, 5]"
                          "\n\tsize mismatch for bias")
    assert reason(header) == ("Error(s) in loading state_dict for Linear: size mismatch for weight: [4, 3] vs "
                              "[4, 5]")
    assert reason(ValueError("\n  first line  \nsecond line")) == "first line"
    assert reason(OSError()) == "OSError" and described(OSError()) == "OSError"
    assert reason(KeyError("x" * 50), limit=10) == "'" + "x" * 9
    assert described(TypeError("bad: \n\n  why")) == "TypeError: bad: why"


def test_an_empty_output_is_named_as_such(tmp_path, monkeypatch, capsys):
    """--output '' (a variable left unset in a script) is told as empty, not as the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep")
    assert main(["align", "--steps", "1", "--output", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["booster-fast: error: --output '' is empty: name the run's directory"], err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


MEMORY_7B = [sys.executable, "-m", "booster_fast", "memory", "--model", "llama-7b-shape"]


def stdout_env(buffered: bool) -> dict:
    """The environment with stdout buffered, as a user's `> file` or pipe has it, or unbuffered (PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return env if buffered else {**env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def memory_runs(tmp_path_factory):
    """MEMORY_7B with stdout buffered and unbuffered, each to a pipe whose reader has gone before the command
    writes a byte, started closed (`>&-`) and to /dev/full (where there is one): the six processes are started
    together and waited for, and each one's (exit code, stderr) is returned by (case, buffered)."""
    logs = tmp_path_factory.mktemp("memory")
    procs, opened = {}, []
    try:
        try:
            for buffered in (True, False):
                read, write = os.pipe()
                os.close(read)  # the reader is gone before the command writes a byte
                opened.append(write)
                outs = {"reader-gone": (write, None), "closed": (None, lambda: os.close(1))}
                if os.path.exists("/dev/full"):
                    opened.append(os.open("/dev/full", os.O_WRONLY))
                    outs["full"] = (opened[-1], None)
                for case, (stdout, preexec) in outs.items():
                    with open(logs / f"{case}-{buffered}.err", "w") as err:
                        procs[case, buffered] = subprocess.Popen(MEMORY_7B, stdout=stdout, stderr=err,
                                                                 preexec_fn=preexec, env=stdout_env(buffered))
        finally:
            for fd in opened:
                os.close(fd)
        codes = {key: proc.wait(timeout=120) for key, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {key: (code, (logs / f"{key[0]}-{key[1]}.err").read_text()) for key, code in codes.items()}


@pytest.mark.parametrize("buffered", [True, False])
def test_a_reader_that_stops_reading_is_no_traceback(memory_runs, buffered):
    """`booster-fast memory ... | head` where the reader has gone before the output: nothing on stderr, the
    shell's exit code of a process stopped by SIGPIPE (128 + 13), with stdout buffered or not (buffered, the
    interpreter's own flush at exit would hit the pipe again)."""
    returncode, stderr = memory_runs["reader-gone", buffered]
    assert returncode == 128 + signal.SIGPIPE and stderr == "", (returncode, stderr)


@pytest.mark.parametrize("buffered", [True, False])
def test_a_closed_stdout_or_a_full_one_is_no_traceback(memory_runs, buffered):
    """Started with stdout closed (`>&-`: sys.stdout is None), a command runs as before; a stdout that cannot be
    written (a full disk under `> file`; here /dev/full) is exactly one line and exit 1, with stdout buffered or
    not (buffered, the interpreter's flush at exit failed once more: "Exception ignored", exit 120)."""
    returncode, stderr = memory_runs["closed", buffered]
    assert returncode == 0 and "Traceback" not in stderr, stderr
    if os.path.exists("/dev/full"):
        returncode, stderr = memory_runs["full", buffered]
        assert returncode == 1, (returncode, stderr)
        assert stderr.strip().splitlines() == ["booster-fast: error: cannot write to standard output: No "
                                               "space left on device"], stderr


BROKEN_PIPE_CHILD = """
import fcntl, os, sys
from booster_fast.cli import run_reporting
if sys.argv[1] == "full":  # fill stdout's pipe (nobody reads it yet): poll reports no event on it
    fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        while True:
            os.write(1, b"x" * 4096)
    except BlockingIOError:
        pass
def fn():
    raise BrokenPipeError(32, "Broken pipe")  # a pipe or socket of the command's own, not stdout
sys.exit(run_reporting(fn))
"""


@pytest.mark.parametrize("stdout", ["healthy", "full"])
def test_a_broken_pipe_other_than_stdout_is_raised(stdout):
    """Only a stdout whose reader has gone is exit 141 without a word: a BrokenPipeError of another stream is the
    command's failure, raised, with stdout a live pipe (read later, or full and unread) or, in process, captured
    (no file descriptor to poll). run_reporting puts sys.stdout back."""
    proc = subprocess.Popen([sys.executable, "-c", BROKEN_PIPE_CHILD, stdout], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    proc.stdout.close(), proc.stderr.close()
    assert rc == 1 and "BrokenPipeError" in err, (rc, err)
    from booster_fast.cli import run_reporting

    def fn():
        raise BrokenPipeError(32, "Broken pipe")
    before = sys.stdout
    with pytest.raises(BrokenPipeError):
        run_reporting(fn)
    assert run_reporting(lambda: 0) == 0 and sys.stdout is before
