"""`booster-fast bench`: the JSON document's shape, one-line usage errors, and the README table builder."""
import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from booster_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent
RESULT_KEYS = {"step_ms", "step_ms_p20", "step_ms_p80", "tokens_per_s", "peak_mem_mb", "ops_per_step",
               "bookkeeping_ops", "host_syncs_per_step", "ratio_to_sft", "sft_baseline", "cuda_graphs", "mfu",
               "hfu", "packed_share", "positions_per_step", "launches_per_step", "graphs_fallback", "est_peak_mb",
               "first_step", "first_step_rel_diff", "first_step_agrees", "timed_steps"}
BASELINES = ("reference", "sft")  # the entries others' first steps are compared with
SFT = ("sft", "fast-sft")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_bench_json_smoke(capsys, tmp_path, monkeypatch):
    from booster_fast import bench

    timed, real = {}, bench.time_interleaved

    def counting(*a, **k):  # how many steps each entry had timed: --steps, after --warmup untimed ones
        out = real(*a, **k)
        timed.update({n: len(t) for n, t in out[0].items()})
        return out

    monkeypatch.setattr(bench, "time_interleaved", counting)
    out_file = tmp_path / "res" / "cpu.json"
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2",
               "--max-length", "160", "--lora-r", "4",
               "--impls", "reference,fast,sft,fast-graphs,fast-padded,fast-sft", "--json", "--output", str(out_file)])
    assert rc == 0
    assert timed == {n: 2 for n in ("reference", "fast", "sft", "fast-padded", "fast-sft")}  # fast-graphs: skipped
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # --json: stdout is the document alone
    table = captured.err.splitlines()
    assert "peak MiB  est. MiB" in next(line for line in table if line.startswith("impl"))  # the console table
    assert set(doc) == {"machine", "config", "results", "speedup", "complete"} and doc["complete"] is True
    assert doc == json.loads(out_file.read_text())  # --output holds the same document
    assert doc["machine"]["gpu"] is None and doc["machine"]["torch"] == torch.__version__
    assert "triton_unusable" in doc["machine"] and doc["machine"]["triton_unusable"] is None  # the CPU: no check
    assert doc["config"]["steps"] == 2 and doc["config"]["impls"] == ["reference", "fast", "sft", "fast-graphs",
                                                                      "fast-padded", "fast-sft"]
    assert "tokens_per_s_counts" in doc["config"]
    # fast and fast-padded's batches pack where that shrinks them: on the CPU the segment grid runs them
    assert doc["config"]["packed_attention"] == ["segment grid (not a CUDA tensor)"], doc["config"]

    res = doc["results"]
    assert set(res) == {"reference", "fast", "sft", "fast-graphs", "fast-padded", "fast-sft"}
    assert set(res["fast-graphs"]) == {"skipped"} and "CUDA" in res["fast-graphs"]["skipped"]
    for name in ("reference", "fast", "sft", "fast-padded", "fast-sft"):
        r = res[name]
        assert set(r) == RESULT_KEYS - ({"ratio_to_sft", "sft_baseline"} if name in SFT else set()) \
            - ({"first_step_rel_diff", "first_step_agrees"} if name in BASELINES else set()), name
        # the same first step from the same weights and rows: fp32 on the CPU agrees to rounding
        if name not in BASELINES:
            assert r["first_step_agrees"] is True and r["first_step_rel_diff"] < 1e-4, (name, r["first_step"])
        assert set(r["first_step"]) == ({"loss"} if name in SFT else
                                        {"loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"})
        for key in ("step_ms", "step_ms_p20", "step_ms_p80", "tokens_per_s", "peak_mem_mb", "ratio_to_sft"):
            assert name in SFT and key == "ratio_to_sft" or _is_number(r[key]) and r[key] > 0, (name, key, r[key])
        # memory.py's estimate beside the measured peak (the CPU gauge samples: a loose band)
        assert 0.5 < r["est_peak_mb"] / r["peak_mem_mb"] < 2, (name, r["est_peak_mb"], r["peak_mem_mb"])
        assert isinstance(r["ops_per_step"], int) and r["ops_per_step"] > 0
        # views and other metadata ops launch nothing: a model pass is about half of them
        assert 0.3 * r["ops_per_step"] < r["launches_per_step"] < 0.8 * r["ops_per_step"], name
        assert r["graphs_fallback"] is None
        assert r["step_ms_p20"] <= r["step_ms"] <= r["step_ms_p80"]
        assert r["mfu"] is None and r["hfu"] is None and r["cuda_graphs"] is False  # CPU
    assert isinstance(res["fast"]["bookkeeping_ops"], int) and res["reference"]["bookkeeping_ops"] is None
    assert doc["speedup"]["sft"] is None is doc["speedup"]["fast-sft"]  # another update: not a Booster speed-up
    # each Booster entry against the SFT step of its own engine, where it runs alike (fast-padded does not pack)
    assert res["reference"]["sft_baseline"] == res["fast-padded"]["sft_baseline"] == "sft"
    assert res["fast"]["sft_baseline"] == "fast-sft"
    assert res["fast"]["ratio_to_sft"] == round(res["fast"]["step_ms"] / res["fast-sft"]["step_ms"], 3)
    # fast packs its batches (the built-in rows fill ~60% of 160 tokens), fast-padded and the reference do not
    assert res["fast"]["packed_share"] > 0
    assert res["fast-padded"]["packed_share"] == res["reference"]["packed_share"] == 0
    # the reference's batches are padded to their longest row (as the original's collator pads them), and so are
    # the padded fast entry's without CUDA graphs; packed ones hold exactly the real tokens
    trimmed = res["reference"]["positions_per_step"]
    assert res["fast-padded"]["positions_per_step"] == trimmed < 3 * 2 * 160
    assert res["fast"]["positions_per_step"] < trimmed
    assert res["fast"]["ops_per_step"] < res["reference"]["ops_per_step"]
    # the fast entry gets unmasked batches and reads nothing back; the reference (masked, as the original) does
    assert res["fast"]["host_syncs_per_step"] == 0 and res["reference"]["host_syncs_per_step"] > 0

    sp = doc["speedup"]
    assert sp["reference"] == 1.0 and _is_number(sp["fast"]) and sp["fast-graphs"] is None
    assert sp["fast"] == pytest.approx(res["reference"]["step_ms"] / res["fast"]["step_ms"], rel=1e-2)


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--impls", "reference,bogus"], "'bogus'"),
    (["--impls", "fast,fast"], "twice"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--output", "."], "is a directory"),  # refused before the timing, not after it
    (["--output", "/proc/booster-fast-test/bench.json"], "cannot write --output"),
    (["--rho", "3"], "does nothing without --perturb-aware"),
    (["--output", "x.png", "--plot", "x.png"], "name the same file"),
    (["--model", "tiny", "--targets", "nosuch", "--steps", "1", "--warmup", "0"], "LoRA targets ['nosuch'] not found"),
    (["--model", "/nonexistent/booster-model", "--steps", "1", "--warmup", "0"], "no such directory"),
    (["--impls", "fast-graphs"], "CUDA graphs need a CUDA device; nothing would be measured"),
    (["--model", "llama-1b-shape", "--max-length", "1"], "random rows need at least 8 tokens"),  # (a traceback)
    (["--model", "llama-1b-shape", "--harmful-data", "h.jsonl"], "--harmful-data h.jsonl needs a --data set"),
    (["--data", "random", "--harmful-data", "builtin"], "--harmful-data builtin needs a --data set"),
    (["--model", "llama-7b-shape", "--data", "nosuch.jsonl"], "nosuch.jsonl: no such file"),  # before the model
    (["--impls", "reference", "--merge-passes", "on"],  # (was ignored)
     "--merge-passes on: no entry of --impls follows it (reference runs the original trainer's step)"),
    (["--impls", "fast-sft,fast-merged", "--merge-passes", "on"],
     "--merge-passes on: no entry of --impls follows it (fast-merged pins it; fast-sft runs one pass)"),
    (["--impls", "sft,fast-padded", "--packing", "off"],
     "--packing off: no entry of --impls follows it (sft runs the original trainer's step; fast-padded pins it)"),
])
def test_bad_flag_exits_2_with_one_line(capsys, flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ["--output", "bench.json"] if "--output" not in flags else []
    assert main(["bench", "--device", "cpu", *flags, *out]) == 2
    # (bitsandbytes may print its own line when it is imported)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Failed to load")]
    assert len(err) == 1 and err[0].startswith("booster-fast: error:") and message in err[0], err
    assert not list(tmp_path.iterdir()), "bad input wrote a file"


def _make_table_module():
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

def _gpu_checks_module():
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    return checks


SAMPLE = {
    "machine": {"cpu": "Test CPU", "cores": 4, "gpu": None, "date": "2026-01-01T00:00:00+00:00"},
    "config": {"model": "tiny", "quant": "none", "batch_size": 8, "harmful_batch_size": 8, "max_length": 64},
    "results": {
        "reference": {"step_ms": 150.0, "tokens_per_s": 3000.0, "peak_mem_mb": 50.0, "ops_per_step": 3858,
                      "ratio_to_sft": 3.0, "sft_baseline": "sft"},
        "fast": {"step_ms": 120.0, "tokens_per_s": 3750.0, "peak_mem_mb": 51.0, "est_peak_mb": 52.4,
                 "ops_per_step": 3201, "launches_per_step": 1650, "ratio_to_sft": 2.4, "sft_baseline": "fast-sft"},
        "sft": {"step_ms": 50.0, "tokens_per_s": 4000.0, "peak_mem_mb": 49.0, "ops_per_step": 1314},
        "fast-sft": {"step_ms": 50.0, "tokens_per_s": 4000.0, "peak_mem_mb": 49.0, "ops_per_step": 1200},
        "fast-graphs": {"skipped": "CUDA graphs need a CUDA device"},
    },
    "speedup": {"reference": 1.0, "fast": 1.25, "sft": None, "fast-sft": None, "fast-graphs": None},
}


def test_make_table_rewrites_only_the_marked_block(tmp_path, capsys):
    mt = _make_table_module()
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu_tiny.json").write_text(json.dumps(SAMPLE))
    (results / "notes.json").write_text("[1, 2]")  # not a bench document: skipped
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{mt.START}\nold table\n{mt.END}\nafter\n")

    capsys.readouterr()
    mt.make_table(results, readme)
    err = capsys.readouterr().err
    assert "left out, not `booster-fast bench` documents: notes.json" in err and "make_table: updated" in err, err
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n" + mt.START) and text.endswith(mt.END + "\nafter\n")
    stamp = readme.stat().st_mtime_ns
    mt.make_table(results, readme)  # again: the same table, the file left alone and the line says so
    assert readme.read_text() == text and readme.stat().st_mtime_ns == stamp
    assert "the table is up to date in" in capsys.readouterr().err
    assert "old table" not in text
    body = text.split(mt.START)[1].split(mt.END)[0]
    rows = [line for line in body.splitlines() if line.startswith("| Test CPU")]
    assert len(rows) == 5
    fast = next(r for r in rows if "| fast |" in r)
    assert "Test CPU (4 cores)" in fast and "| 120.0 |" in fast and "| 1.25× |" in fast and "| 1,650 |" in fast
    assert "| 51 (est. 52) |" in fast and "| 50 |" in next(r for r in rows if "| reference |" in r)  # estimate
    assert "| 2.40× |" in fast and "| 3.00× |" in next(r for r in rows if "| reference |" in r)
    # a fast entry measured against the reference engine's SFT step says so (files from before fast-sft)
    assert mt.sft_ratio("fast", {"ratio_to_sft": 2.4}) == "2.40× (vs sft)"
    assert mt.sft_ratio("fast-graphs", {"ratio_to_sft": 2.4, "sft_baseline": "fast-sft"}) == "2.40×"
    assert mt.sft_ratio("reference", {"ratio_to_sft": 3.0}) == "3.00×"
    assert any("skipped: CUDA graphs" in r for r in rows)

    # without markers: the table goes to stdout and the README stays as it was
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    capsys.readouterr()
    mt.make_table(results, plain)
    captured = capsys.readouterr()
    assert plain.read_text() == "# no markers\n"
    assert "| Test CPU (4 cores) |" in captured.out and "README untouched" in captured.err


@pytest.mark.parametrize("model, label", [
    ("Intel(R) Xeon(R) Processor", "Intel Xeon"),
    ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7763 64-Core"),
    ("Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz", "Intel Core i7-9700K CPU @ 3.60GHz"),  # (not at the end: kept)
    ("AMD EPYC", "AMD EPYC"),
    ("", "unknown CPU"),
])
def test_the_table_names_a_cpu_without_trademark_signs(model, label):
    mt = _make_table_module()
    assert mt.hardware({"cpu": model, "cores": 2, "gpu": None}) == f"{label} (2 cores)"
    assert mt.hardware({"cpu": model, "cores": 2, "gpu": "NVIDIA H200"}) == "NVIDIA H200"


def test_warm_graphs_captures_every_shape_untimed_and_reports_failures():
    from types import SimpleNamespace

    from booster_fast import bench

    def entry():
        graphs = SimpleNamespace(disabled=None, _graphs={}, replays=0)
        return SimpleNamespace(engine=SimpleNamespace(graphs=graphs)), graphs

    booster, graphs = entry()
    calls = []

    def capture_on_third(a, h):  # like StepGraphs, per shape: two eager warm-up steps, then capture + replay
        shape = a["input_ids"].shape
        calls.append(shape)
        if shape in graphs._graphs:
            graphs.replays += 1
        elif calls.count(shape) == 3:
            graphs._graphs[shape] = object()
            graphs.replays += 1

    def pair(n, cu=None):
        a = {"input_ids": torch.zeros(1, n), **({"max_seqlen": cu} if cu else {})}
        return a, {"input_ids": torch.zeros(1, 4)}

    # two packed lengths among four pairs: each shape is warmed up and captured once, before the timing
    pairs = [pair(64, 32), pair(128, 32), pair(64, 32), pair(128, 32)]
    assert bench.warm_graphs("fast-graphs", booster, capture_on_third, pairs) is None
    assert len(calls) == 6 and len(graphs._graphs) == 2 and bench.graphs_captured(booster.engine)
    assert bench.warm_graphs("fast-graphs", booster, capture_on_third, pairs) is None
    assert len(calls) == 8, "an already captured shape costs one replay, not a new warm-up"

    def failing(a, h):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    booster, _ = entry()
    assert bench.warm_graphs("fast-graphs", booster, failing, pairs) == \
        "not captured: operation not permitted when stream is capturing"
    with pytest.raises(RuntimeError):  # any other entry's failure is a bug, not a result
        bench.warm_graphs("fast", booster, failing, pairs)
    eager = SimpleNamespace(engine=SimpleNamespace(graphs=None))
    assert bench.warm_graphs("fast", eager, failing, pairs) is None
    assert bench.warm_graphs("fast-graphs", eager, failing, pairs) == bench.GRAPHS_NOT_CAPTURED


def test_entries_share_their_frozen_base_but_not_lora():
    """build_all points every entry's frozen base weights at the first entry's (one resident base), while each
    keeps its own LoRA weights; a base that differs is refused instead of silently shared."""
    from types import SimpleNamespace

    from booster_fast import bench
    from booster_fast.cli import build_parser

    args = build_parser().parse_args(["bench", "--model", "tiny", "--device", "cpu", "--lora-r", "4", "--impls", "reference",
                                      "--batch-size", "2", "--max-length", "32", "--steps", "1", "--warmup", "0"])
    names = bench.check_bench_args(args)  # fills the defaults, as run_bench does
    impls, *_ = bench.build_all(names + ["fast", "sft"], args, torch.device("cpu"), {})
    models = [b.model for b, *_ in impls.values()]
    params = [dict(m.named_parameters()) for m in models]
    frozen = [n for n, p in params[0].items() if not p.requires_grad]
    lora = [n for n, p in params[0].items() if p.requires_grad]
    assert frozen and lora
    for other in params[1:]:
        assert all(other[n].data_ptr() == params[0][n].data_ptr() for n in frozen)
        assert not any(other[n].data_ptr() == params[0][n].data_ptr() for n in lora)

    model_a, model_b = (SimpleNamespace(named_parameters=lambda p=p: iter(p.items())) for p in (
        {"w": torch.nn.Parameter(torch.ones(3), requires_grad=False)},
        {"w": torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=False)}))
    with pytest.raises(AssertionError, match="differs"):
        bench.share_frozen_weights(model_a, model_b)


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_bench_loads_the_model_with_its_trust_remote_code_flag(flag, monkeypatch):
    """--trust-remote-code reaches load_model for every entry (bench listed the flag and dropped it)."""
    import booster_fast
    from booster_fast import bench
    from booster_fast.cli import build_parser

    seen = []

    def load_model(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(booster_fast, "load_model", load_model)
    args = build_parser().parse_args(["bench", "--model", "tiny", "--device", "cpu", *flag])
    with pytest.raises(RuntimeError, match="stop here"):
        bench.build_impl("reference", args, torch.device("cpu"))
    assert seen == [bool(flag)]


def test_nf4_entries_share_their_packed_base(monkeypatch):
    """With quant="nf4" the entries share the packed 4-bit weights and their statistics too (three entries of
    a 4-bit 70B shape then fit on one GPU), each keeps its own LoRA weights, the packed weights and statistics
    it replaces are freed; packed weights that differ are refused."""
    import gc
    import weakref

    import bitsandbytes as bnb

    import booster_fast
    from booster_fast import bench
    from booster_fast.nf4 import quant_state_tensors
    from booster_fast.cli import build_parser

    small = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2)
    real_load = booster_fast.load_model
    monkeypatch.setattr(booster_fast, "load_model", lambda *a, **k: real_load(*a, **k, **small))
    args = build_parser().parse_args(["bench", "--model", "llama-1b-shape", "--quant", "nf4", "--device", "cpu",
                                      "--lora-r", "4", "--impls", "reference,fast", "--batch-size", "2",
                                      "--max-length", "32", "--steps", "1", "--warmup", "0"])
    names = bench.check_bench_args(args)
    alone, *_ = bench.build_impl("fast", args, torch.device("cpu"))
    impls, *_ = bench.build_all(names, args, torch.device("cpu"), {})
    (ref, *_), (fast, *_) = impls.values()
    packed = [[m for m in b.model.modules() if isinstance(m, bnb.nn.Linear4bit)] for b in (ref, fast)]
    assert len(packed[0]) == len(packed[1]) == 2 * 7
    for a, b in zip(*packed):
        assert a.weight.data_ptr() == b.weight.data_ptr() and a.weight.quant_state is b.weight.quant_state
    lora = [{n: p for n, p in b.model.named_parameters() if p.requires_grad} for b in (ref, fast)]
    assert not any(lora[0][n].data_ptr() == p.data_ptr() for n, p in lora[1].items())

    # sharing frees the packed weights and statistics it replaces (nothing keeps them alive) and says how much
    mine = [m for m in alone.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    expected = sum(t.untyped_storage().nbytes() for m in mine for t in (m.weight, *quant_state_tensors(m.weight)))
    gone = [weakref.ref(m.weight.quant_state) for m in mine]
    assert bench.share_frozen_weights(ref.model, alone.model) >= expected
    gc.collect()
    assert not any(r() is not None for r in gone), "an old NF4 quantisation state is still alive"

    a, b = packed[0][0], packed[1][7]  # the next layer's q_proj: same shapes, other values; refused, not shared
    with pytest.raises(AssertionError, match="differs"):
        bench.share_frozen_weights(torch.nn.ModuleDict({"x": a}), torch.nn.ModuleDict({"x": b}))


def test_make_table_renders_the_gpu_suite_checks(tmp_path, capsys):
    """The GPU suite's check files (shaped as benchmarks/gpu_checks.py writes them) get a table each; the values
    here are made up for the formatter, not results."""
    mt = _make_table_module()
    results = tmp_path / "results"
    results.mkdir()
    ops = ("copy", "sumsq", "normalize_perturb_", "restore_combine_")
    bw = {"n": 2**26, **{f"{op}_GBps": 1000.0 + i for i, op in enumerate(ops)},
          **{f"{op}_torch_GBps": 500.0 + i for i, op in enumerate(ops[1:])},
          **{f"{op}_max_rel_err": 1.5e-7 for op in ops[1:]}}
    (results / "kernel_bandwidth.json").write_text(json.dumps({
        "machine": {"gpu": "Test GPU"}, "numel": 2**26, "results": bw, "target": 0.7,
        "fraction_of_copy": {op: bw[f"{op}_GBps"] / bw["copy_GBps"] for op in ops[1:]},
        "model_kernels": {"tokens": 16384, "copy_GBps": 4000.0, **{
            f"{op}_{d}": {"ms": 0.1, "GBps": 3000.0, "eager_ms": 0.5, "speedup": 5.0, "fraction_of_copy": 0.75}
            for op in ("rms_norm", "silu_mul", "rope") for d in ("fwd", "bwd")},
            "cross_entropy_fwd": {"ms": 0.05, "GBps": 3900.0, "eager_ms": 0.6, "speedup": 12.0,
                                  "fraction_of_copy": 0.975, "max_rel_err": 3.9e-3, "rows": 2048, "vocab": 32000}}}))
    (results / "graph_equivalence.json").write_text(json.dumps({"machine": {}, "results": {
        "tiny": {"steps": 5, "worst_relative_l2": 3e-7, "loss_graph": 1.0, "loss_eager": 1.0, "captured": True,
                 "fallback": None}}}))
    (results / "profile_llama-7b-shape.json").write_text(json.dumps({
        "machine": {}, "model": "llama-7b-shape", "quant": "none", "batch": [10, 256], "results": {
            "fast+graphs": {"wall_ms_per_step": 10.0, "gpu_busy_ms_per_step": 9.0, "gpu_idle_share": 0.1,
                            "top_kernels": [{"name": "gemm_kernel", "ms_per_step": 5.0, "calls_per_step": 3}]}}}))
    (results / "cpu_tiny.json").write_text(json.dumps(SAMPLE))
    (results / "profile_broken.json").write_text(json.dumps({"machine": {}}))  # a check file without results
    table = mt.markdown_table(mt.load_results(results), mt.check_documents(results))
    assert "make_table: left out profile_broken.json: no `results` in it" in capsys.readouterr().err
    assert [name for name, _ in mt.load_results(results)] == ["cpu_tiny.json"]
    assert "| sumsq | 1,001 | 500 | 100% | 1.5e-07 |" in table and "| copy | 1,000 | — | — | — |" in table
    assert "Kernels on Test GPU, 67,108,864" in table
    assert "| rope bwd | 3,000 | 0.100 | 0.500 | 5.00× | 75% | — |" in table and "16,384 tokens" in table
    assert ("| cross_entropy + grad (2,048 × 32,000 logits) | 3,900 | 0.050 | 0.600 | 12.00× | 98% | 3.9e-03 |"
            in table)
    assert "| tiny | 5 | 3.00e-07 | — | True | — | — | — |" in table  # an older document: fewer fields
    assert "| fast+graphs | 10.0 | 9.0 | 10% | gemm_kernel 5.0 ms |" in table
    header = next(line for line in table.splitlines() if line.startswith("| machine"))
    assert header.endswith("| MFU | HFU |")


def test_documents_name_their_commit_from_git_or_from_the_environment(monkeypatch):
    """A result names the commit it ran: the checkout's HEAD, or BOOSTER_FAST_COMMIT where the tree was sent
    without its .git (the GPU machine); gpu_suite.sh passes that on and logs it."""
    import subprocess

    from booster_fast.bench_report import machine_info

    cpu = torch.device("cpu")
    monkeypatch.delenv("BOOSTER_FAST_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # (a source tree without .git names none)
        assert machine_info(cpu)["git_commit"] == head.stdout.strip()
    monkeypatch.setenv("BOOSTER_FAST_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert machine_info(cpu)["git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert "export BOOSTER_FAST_COMMIT" in (ROOT / "benchmarks" / "gpu_suite.sh").read_text()


def test_gpu_suite_parses_and_the_readme_names_its_parts():
    """The GPU suite runs only on a lent GPU machine: here, bash must at least parse it, and the part names the
    README lists (for a rerun of single parts) must be exactly the script's."""
    import re
    import subprocess

    script = ROOT / "benchmarks" / "gpu_suite.sh"
    for name in ("gpu_suite.sh", "prepare_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)
    text = script.read_text()
    parts = re.findall(r"^(?:NEED_PERCENT=\d+ )?(?:bench_)?part (\w+) \d+ ", text, flags=re.M)
    assert len(parts) == 12 and len(set(parts)) == 12, parts
    opt_in = re.search(r'^OPT_IN=" (.*) "', text, flags=re.M).group(1).split()
    assert opt_in == ["bench_70b_nf4_ckpt"]
    readme_row = next(line for line in (ROOT / "README.md").read_text().splitlines() if "gpu_suite.sh [PART" in line)
    named, readme_opt_in = readme_row.split("part names", 1)[1].split("opt-in parts", 1)
    assert re.findall(r"`(\w+)`", named) == parts
    assert re.findall(r"`(\w+)`", readme_opt_in) == opt_in


def test_gpu_suite_runs_every_file_with_gpu_tests():
    """A GPU-marked test in a file the suite's gpu_tests part does not name would never run anywhere."""
    import re

    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    part = re.search(r"^(?:NEED_PERCENT=\d+ )?part gpu_tests \d+ python3 -m pytest (.*?)\n(?!\s)", text,
                     flags=re.M | re.S).group(1)
    named = set(re.findall(r"tests/\w+\.py", part))
    marker = "@pytest.mark." + "gpu"  # spelled in two pieces, so that this file does not count itself
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if marker in p.read_text()}
    assert marked and named == marked, f"missing from gpu_tests: {marked - named}; not marked: {named - marked}"


def test_gpu_checks_run_on_the_cpu_as_a_smoke_test(tmp_path, capsys):
    """benchmarks/gpu_checks.py's equivalence and profile code, run on the CPU (graphs off) so that a Python
    slip surfaces here and not on the lent GPU; make_table reads what they write. The bandwidth check refuses
    the CPU with one line."""
    checks = _gpu_checks_module()
    small = ["--batch", "2", "--length", "32", "--out", str(tmp_path)]
    checks.main(["equivalence", "--device", "cpu", "--models", "tiny", "--steps", "2", *small])
    checks.main(["profile", "--device", "cpu", "--model", "tiny", "--steps", "1", *small])
    eq = json.loads((tmp_path / "graph_equivalence.json").read_text())["results"]
    from booster_fast import graphs

    assert graphs.POOL_WARMUP is False, "the equivalence check left POOL_WARMUP switched on"
    for row in eq.values():  # eager vs eager on the CPU: identical
        assert row["worst_relative_l2"] == 0.0 and row["captured"] is False, row
    prof = json.loads((tmp_path / "profile_tiny.json").read_text())["results"]
    assert set(prof) == {"reference", "fast"} and all(r["top_kernels"] for r in prof.values())
    assert (tmp_path / "profile_tiny.txt").read_text().startswith("## reference")
    mt = _make_table_module()
    table = "\n".join(mt.check_tables(mt.check_documents(tmp_path)))
    assert "| tiny | 2 | 0.00e+00 | 0.00e+00 | False | 0 | 0 | — |" in table and "| fast |" in table
    assert "| tiny packed | 10 | 0.00e+00 | 0.00e+00 | False | 0 | 0 | — |" in table
    assert "| tiny packed, warm-up in the pool | 10 | 0.00e+00 | 0.00e+00 | False | 0 | 0 | — |" in table
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            checks.main(["bandwidth", "--out", str(tmp_path)])
    # one implementation failing costs only its own row
    real_booster = checks.bf.Booster

    def broken(model, cfg):
        if cfg.impl == "fast":
            raise RuntimeError("out of memory")
        return real_booster(model, cfg)
    checks.bf.Booster = broken
    try:
        checks.main(["profile", "--device", "cpu", "--model", "tiny", "--steps", "1", *small])
    finally:
        checks.bf.Booster = real_booster
    prof = json.loads((tmp_path / "profile_tiny.json").read_text())["results"]
    assert prof["fast"] == {"error": "RuntimeError: out of memory"} and prof["reference"]["top_kernels"]
    assert "failed: RuntimeError: out of memory" in "\n".join(mt.check_tables(mt.check_documents(tmp_path)))


def test_random_batches_vary_rows_but_not_the_total():
    """The shape presets' random batches: rows 60-100% real, exactly 80% in total (one packed length per run)."""
    from booster_fast.bench_data import random_batch
    from booster_fast.packing import pack

    g = torch.Generator().manual_seed(0)
    batches = [random_batch(10, 256, 32000, 0, g) for _ in range(6)]
    lengths = torch.stack([b["attention_mask"].sum(1) for b in batches])
    assert (lengths.sum(1) == 2048).all() and lengths.min() >= 153 and lengths.max() <= 256
    assert len({tuple(r.tolist()) for r in lengths}) == 6, "the rows do not vary from batch to batch"
    assert len({pack(b)["input_ids"].shape for b in batches}) == 1
    assert all(((b["labels"] != -100) <= b["attention_mask"].bool()).all() for b in batches)


def test_a_failing_entry_is_reported_and_the_others_still_run(monkeypatch, capsys, tmp_path):
    """One entry that cannot be built and one whose step breaks mid-run: both recorded as failed with the reason,
    the other entries measured, the document written, exit code 1."""
    import booster_fast.bench as bench

    build, step = bench.build_impl, bench.step_fn

    def broken_build(name, *args):
        if name == "fast-unfused":
            raise RuntimeError("no kernel for you\nsecond line")
        return build(name, *args)

    def broken_step(name, booster):
        fn, calls = step(name, booster), []

        def run(*batches):
            calls.append(1)
            if name == "fast-padded" and len(calls) == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return fn(*batches)
        return run

    monkeypatch.setattr(bench, "build_impl", broken_build)
    monkeypatch.setattr(bench, "step_fn", broken_step)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2",
               "--lora-r", "4", "--impls", "reference,fast,fast-padded,fast-unfused", "--json", "--output", str(out)])
    assert rc == 1
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = doc["results"]
    assert res["fast-unfused"] == {"failed": "building it: RuntimeError: no kernel for you"}
    assert res["fast-padded"]["failed"].startswith("step 1: RuntimeError: CUDA error")
    assert _is_number(res["reference"]["step_ms"]) and _is_number(res["fast"]["step_ms"])
    assert doc["speedup"]["fast-padded"] is None and json.loads(out.read_text()) == doc
    table = _make_table_module().markdown_table([("bench.json", doc)], {})
    assert "failed: building it: RuntimeError: no kernel for you" in table


def test_an_entry_failing_after_its_timing_keeps_its_times(monkeypatch, capsys, tmp_path):
    """The reference's memory pass fails (an out-of-memory in its extra step, say): its step times and every
    speed-up stay, the failure is named beside them, the exit code is 1, and the table shows both."""
    import booster_fast.bench as bench

    transient, calls = bench.transient_bytes, []

    def measure(fn, device):
        calls.append(1)
        if len(calls) == 1:  # the reference's
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return transient(fn, device)

    monkeypatch.setattr(bench, "transient_bytes", measure)
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2",
               "--lora-r", "4", "--impls", "reference,fast", "--json"])
    assert rc == 1
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = doc["results"]["reference"]
    assert ref["failed"].startswith("measuring memory and ops: RuntimeError: CUDA out of memory")
    assert _is_number(ref["step_ms"]) and "peak_mem_mb" not in ref and doc["complete"] is True
    assert _is_number(doc["speedup"]["fast"]) and _is_number(doc["results"]["fast"]["peak_mem_mb"])
    table = _make_table_module().markdown_table([("bench.json", doc)], {})
    row = next(line for line in table.splitlines() if "| reference" in line)
    assert "failed after the timing" in row and f"{ref['step_ms']:.1f}" in row


def test_an_entry_computing_something_else_is_flagged(monkeypatch, capsys):
    """fast-padded built with another perturbation radius α: its first step's perturbed harmful loss leaves the
    reference's, so the entry is flagged in the document and both tables, and the bench exits 1; fast agrees."""
    import dataclasses

    import booster_fast.bench as bench

    config = bench.impl_config
    monkeypatch.setattr(bench, "impl_config", lambda name, args: dataclasses.replace(config(name, args), alpha=10.0)
                        if name == "fast-padded" else config(name, args))
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-size", "2",
               "--lora-r", "4", "--impls", "reference,fast,fast-padded", "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    doc = json.loads(captured.out.strip().splitlines()[-1])
    bad, good = doc["results"]["fast-padded"], doc["results"]["fast"]
    assert bad["first_step_agrees"] is False and bad["first_step_rel_diff"] > bench.FIRST_STEP_RTOL
    assert bad["first_step"]["loss"] == pytest.approx(doc["results"]["reference"]["first_step"]["loss"], rel=1e-5)
    assert good["first_step_agrees"] is True
    assert f"FIRST STEP OFF BY {bad['first_step_rel_diff']:.1%}" in next(
        line for line in captured.err.splitlines() if line.startswith("fast-padded"))
    assert captured.err.strip().splitlines()[-1].startswith("booster-fast: error: the first step of fast-padded ")
    table = _make_table_module().markdown_table([("bench.json", doc)], {})
    assert f"first step off its baseline's by {bad['first_step_rel_diff']:.1%}" in next(
        line for line in table.splitlines() if "| fast-padded" in line)


def test_first_step_agreement_with_undefined_outputs():
    """Without the meta term both engines leave harmful_loss_perturbed NaN: that agrees. A NaN on one side only
    does not, and the report stays strict JSON (no NaN or Infinity in it)."""
    from booster_fast.bench_measure import first_step_agreement

    nan = torch.tensor(float("nan"))
    ref = {"loss": torch.tensor(2.0), "harmful_loss_perturbed": nan}
    report = first_step_agreement({"reference": ref, "fast": {"loss": torch.tensor(2.0 + 1e-7),
                                                              "harmful_loss_perturbed": nan.clone()},
                                   "fast-padded": {"loss": nan.clone(), "harmful_loss_perturbed": nan.clone()}})
    assert report["fast"]["first_step_agrees"] is True and report["fast"]["first_step_rel_diff"] < 1e-6
    assert report["fast-padded"]["first_step_agrees"] is False and report["fast-padded"]["first_step_rel_diff"] is None
    assert report["reference"] == {"first_step": {"loss": 2.0, "harmful_loss_perturbed": "nan"}}
    json.dumps(report, allow_nan=False)
    # the SFT entries are held to the SFT baseline, the Booster entries to the reference
    report = first_step_agreement({"reference": {"loss": torch.tensor(3.0)}, "sft": {"loss": torch.tensor(2.0)},
                                   "fast-sft": {"loss": torch.tensor(2.0)}, "fast": {"loss": torch.tensor(3.0)}})
    assert report["fast-sft"]["first_step_rel_diff"] == 0 and report["fast-sft"]["first_step_agrees"] is True
    assert report["fast"]["first_step_rel_diff"] == 0 and "first_step_agrees" not in report["sft"]


def test_the_table_puts_each_figure_under_its_column():
    """A GPU row's MFU and HFU (None on the CPU, so the CPU runs never show them) under their own headings."""
    from booster_fast.bench_report import format_table

    doc = {"machine": {"gpu": "NVIDIA H200", "cpu": "x"},
           "config": {"model": "llama-7b-shape", "quant": "none", "device": "cuda", "batch_size": 10,
                      "harmful_batch_size": 10, "max_length": 256, "steps": 10, "warmup": 2},
           "speedup": {"fast": 1.25},
           "results": {"fast": {"step_ms": 100.0, "step_ms_p20": 99.0, "step_ms_p80": 101.0, "tokens_per_s": 5000,
                                "peak_mem_mb": 1234.5, "est_peak_mb": 1300.0, "launches_per_step": 42,
                                "host_syncs_per_step": 3, "ratio_to_sft": 2.5, "mfu": 0.1, "hfu": 0.2}}}
    lines = format_table(doc).splitlines()
    head, _, row = lines[1:4]
    assert "llama-7b-shape (quant none) on NVIDIA H200" in lines[0], lines[0]
    assert lines[-1].startswith("est.: memory.py's estimate; launches, syncs: per step"), lines[-1]  # the legend
    for heading, value in (("speedup", "1.25"), ("peak MiB", "1234.5"), ("est. MiB", "1300.0"), ("launches", "42"),
                           ("syncs", "3"), ("xSFT", "2.50"), ("MFU", "10.0%"), ("HFU", "20.0%")):
        end = head.index(heading) + len(heading)  # right-aligned: the value ends where its heading does
        assert row[:end].endswith(value), (heading, row)


def test_bench_runs_packed_micro_batches(capsys):
    """--grad-accum with packing hands the fast step lists of packed micro-batches: measured like any other
    (positions, packed share), not a crash in the FLOP count."""
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "4",
               "--grad-accum", "2", "--max-length", "256", "--lora-r", "4", "--impls", "reference,fast", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert res["fast"]["packed_share"] == 1.0 and res["reference"]["packed_share"] == 0
    assert 0 < res["fast"]["positions_per_step"] < res["reference"]["positions_per_step"]


def test_make_table_names_settings_and_partial_runs(tmp_path):
    """Two runs that differ in a setting get different labels; a run stopped before its last measurement is
    marked partial."""
    mt = _make_table_module()
    base = {"machine": {"cpu": "X", "cores": 2}, "speedup": {"reference": 1.0}, "complete": True,
            "config": {"model": "tiny", "batch_size": 8, "harmful_batch_size": 8, "max_length": 64, "quant": "none",
                       "grad_accum": 1, "meta_term": True, "lamb": 5.0, "merge_passes": "auto"},
            "results": {"reference": {"step_ms": 10.0}}}
    other = json.loads(json.dumps(base))
    other["config"].update(grad_accum=4, meta_term=False, merge_passes="on")
    other["complete"] = False
    labels = [line.split(" | ")[1] for line in mt.markdown_table([("a.json", base), ("b.json", other)], {})
              .splitlines() if "| reference" in line]
    assert labels[0] == "tiny (8+8 × 64)", labels
    assert labels[1] == "tiny (8+8 × 64, grad accum 4, merge passes on, no meta term, partial run)", labels
    other["machine"]["triton_unusable"] = "RuntimeError: Failed to compile the launcher"
    label = next(line.split(" | ")[1] for line in mt.markdown_table([("b.json", other)], {}).splitlines()
                 if "| reference" in line)
    assert label.endswith("partial run, Triton kernels off: RuntimeError: Failed to compile the launcher)"), label
    # a GPU run whose packed batches did not all run flash's kernel says so; flash alone, or the CPU, does not
    for gpu, kernels, noted in ((None, ["segment grid (not a CUDA tensor)"], False), ("H200", ["flash varlen"], False),
                                ("H200", None, False), ("H200", ["flash varlen", "segment grid (flash varlen failed: "
                                                                 "RuntimeError: no kernel image)"], True)):
        doc = json.loads(json.dumps(base))
        doc["machine"]["gpu"], doc["config"]["packed_attention"] = gpu, kernels
        label = next(line.split(" | ")[1] for line in mt.markdown_table([("d.json", doc)], {}).splitlines()
                     if "| reference" in line)
        assert ("packed attention: flash varlen; segment grid (flash varlen failed" in label) == noted, label
    # the rows are named where they are not the model's default (tiny: builtin; any other model: random rows)
    from booster_fast.bench_data import RANDOM_ROWS

    for model, data, named in (("tiny", "builtin", None), ("tiny", RANDOM_ROWS, "random rows"),
                               ("llama-7b-shape", RANDOM_ROWS, None), ("llama-7b-shape", "builtin", "data builtin"),
                               ("llama-7b-shape", "/data/my pairs.jsonl (harmful: /data/h.jsonl)",
                                "data my pairs.jsonl, harmful h.jsonl")):
        doc = json.loads(json.dumps(base))
        doc["config"].update(model=model, data=data)
        label = next(line.split(" | ")[1] for line in mt.markdown_table([("c.json", doc)], {}).splitlines()
                     if "| reference" in line)
        assert label == f"{model} (8+8 × 64{', ' + named if named else ''})", label


def _suite_shim(tmp_path, bench_body: str, other_body: str = "", **env):
    """A python3 stand-in on PATH for gpu_suite.sh: it records its calls and runs `bench_body` (bash, with $out
    the --output path) for a bench, `other_body` (bash) for anything else. Returns (the suite's environment, with
    `env` added; the calls file; $OUT). The suite's own temporary folder goes under tmp_path."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text("""#!/usr/bin/env bash
echo "$*" >> "$SHIM_LOG"
""" + other_body + """
[[ "$1 $2 $3" == "-m booster_fast bench" ]] || exit 0
prev=""; for a in "$@"; do [[ $prev == --output ]] && out=$a; prev=$a; done
""" + bench_body)
    (shim / "python3").chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    return ({**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SHIM_LOG": str(calls), "OUT": str(out),
             "TMPDIR": str(tmp_path), **env}, calls, out)


def test_gpu_suite_reruns_a_bench_part_without_graphs_after_an_invalidated_capture(tmp_path):
    """Exit code 3 from the bench (a capture CUDA invalidated) makes the suite run that part once more in a new
    process without fast-graphs, keeping the first document beside. python3 is a stand-in here that records
    its calls; the bench stand-in fails with 3 whenever fast-graphs is among its entries."""
    import subprocess
    import tarfile

    env, calls, out = _suite_shim(tmp_path, """
if [[ "$*" == *fast-graphs* ]]; then echo '{"run": 1}' > "$out"; exit 3; fi
echo '{"run": 2}' > "$out"
""")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_1b_bf16"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    benches = [c.split() for c in calls.read_text().splitlines() if c.startswith("-m booster_fast bench")]
    assert len(benches) == 2
    impls = [b[b.index("--impls") + 1] for b in benches]
    assert impls == ["reference,fast,fast-graphs,fast-padded,fast-unfused,fast-unmerged,sft,fast-sft",
                     "reference,fast,fast-padded,fast-unfused,fast-unmerged,sft,fast-sft"]
    assert benches[0][:benches[0].index("--impls")] == benches[1][:benches[1].index("--impls")]
    with tarfile.open(out / "gpu_suite.tgz") as tar:
        docs = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if ".json" in m.name}
    # the first document beside, out of make_table's *.json (its rows would double the model's)
    assert docs == {"gpu_llama-1b-shape_bf16.json": b'{"run": 2}\n',
                    "gpu_llama-1b-shape_bf16.json.invalidated": b'{"run": 1}\n'}
    log = (out / "gpu_suite.log").read_text()
    assert "== bench_1b_bf16: rc=3" in log and "== bench_1b_bf16_eager: rc=0" in log


def test_after_an_invalidated_capture_the_later_parts_of_that_quant_leave_graphs_out(tmp_path):
    """A capture invalidated in one NF4 part: that part reruns without fast-graphs, the next NF4 part leaves
    fast-graphs out from the start (one run, not two), a bf16 part keeps it; the log's last lines name the part
    that exited non-zero."""
    import subprocess

    env, calls, out = _suite_shim(tmp_path, """
if [[ "$*" == *fast-graphs* && "$*" == *nf4* ]]; then echo '{}' > "$out"; exit 3; fi
echo '{}' > "$out"
""", SUITE_DEADLINE="100000")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_7b_nf4_ckpt", "bench_7b_nf4",
                          "bench_1b_nf4", "bench_1b_bf16"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    benches = [c.split() for c in calls.read_text().splitlines() if c.startswith("-m booster_fast bench")]
    graphs = [(b[b.index("--output") + 1].rsplit("/", 1)[1], "fast-graphs" in b[b.index("--impls") + 1])
              for b in benches]
    assert graphs == [("gpu_llama-7b-shape_nf4_ckpt.json", True), ("gpu_llama-7b-shape_nf4_ckpt.json", False),
                      ("gpu_llama-1b-shape_bf16.json", True), ("gpu_llama-7b-shape_nf4.json", False),
                      ("gpu_llama-1b-shape_nf4.json", False)]  # (the suite's order, whatever the names' order)
    log = (out / "gpu_suite.log").read_text()
    assert "== bench_7b_nf4: without fast-graphs (a capture was invalidated in an earlier nf4 part)" in log
    assert log.splitlines()[-1] == ("exited non-zero: bench_7b_nf4_ckpt(rc=3) (each part's output: "
                                    "gpu_logs/NAME.out)"), log


def test_a_stack_that_fails_with_the_carried_peft_is_tried_with_the_machines_own(tmp_path):
    """The carried peft (a wheel in .whl/) may not import beside the machine's transformers: the stack check runs
    once more with the carried peft and accelerate removed, and the suite goes on when that imports."""
    import subprocess

    site = tmp_path / "site"
    for name in ("peft", "peft-0.21.2.dist-info", "accelerate", "accelerate-1.15.0.dist-info", "bitsandbytes"):
        (site / name).mkdir(parents=True)
    env, calls, out = _suite_shim(tmp_path, 'echo "{}" > "$out"\n', other_body="""
if [[ "$1" == - ]] && grep -q "import torch, triton" && [[ -d "$SUITE_SITE/peft" ]]; then
  echo "ImportError: cannot import name 'X' from 'transformers'"; exit 1
fi
""", SUITE_SITE=str(site), SUITE_DEADLINE="100000")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_1b_bf16"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    log = (out / "gpu_suite.log").read_text()
    assert "ImportError: cannot import name 'X'" in log
    assert "the stack does not import with the carried peft and accelerate: once more with the machine's own" in log
    assert "stopping" not in log and "== bench_1b_bf16: rc=0" in log, log
    assert sorted(p.name for p in site.iterdir()) == ["bitsandbytes"]


def test_every_command_of_the_gpu_suite_parses(tmp_path, monkeypatch):
    """Each command the suite would run on the GPU (every part, the opt-in one too), recorded by a python3
    stand-in, is parsed here as the real programs parse it: the bench's flags through the CLI parser and
    check_bench_args, gpu_checks' through its own main (its work stubbed), the test files named must exist. A
    flag renamed since the suite was written would otherwise cost a lent machine's run."""
    import shlex
    import subprocess

    from booster_fast.bench import check_bench_args
    from booster_fast.cli import build_parser

    env, calls, out = _suite_shim(tmp_path, "exit 0\n", SUITE_DEADLINE="100000")
    for named in ([], ["bench_70b_nf4_ckpt"]):
        run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), *named], env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    checks = _gpu_checks_module()
    seen = []
    for cmd in ("cmd_bandwidth", "cmd_equivalence", "cmd_profile", "cmd_sweep"):
        monkeypatch.setattr(checks, cmd, lambda args, cmd=cmd: seen.append((cmd, args)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kinds = []
    for line in calls.read_text().splitlines():
        argv = shlex.split(line)
        if argv[:3] == ["-m", "booster_fast", "bench"]:
            kinds.append("bench")
            args = build_parser().parse_args(argv[2:])
            check_bench_args(args)
            assert args.device == "cuda" and args.graphs == "off", line  # fast-graphs is its own entry
        elif argv[0] == "benchmarks/gpu_checks.py":
            kinds.append("checks")
            checks.main(argv[1:])
        elif argv[:2] == ["-m", "pytest"]:
            kinds.append("pytest")
            files = [a for a in argv if a.startswith("tests/")]
            assert files and all((ROOT / f).is_file() for f in files), line
    assert kinds.count("bench") == 7 and kinds.count("checks") == 4 and kinds.count("pytest") == 1, kinds
    assert [cmd for cmd, _ in seen] == ["cmd_bandwidth", "cmd_equivalence", "cmd_profile", "cmd_sweep"]


def test_gpu_suite_keeps_its_deadline_for_named_parts(tmp_path):
    """Named parts answer to the deadline too, and a bench part needs 80 % of its limit to start (stopped during
    its timing, it writes only the steps it had timed): with 40 s left, the 60 s part is skipped (half its limit
    would have let it start), not started and cut off."""
    import subprocess

    env, calls, out = _suite_shim(tmp_path, 'echo "{}" > "$out"\n', SUITE_DEADLINE="40")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_1b_bf16"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    log = (out / "gpu_suite.log").read_text()
    assert "== bench_1b_bf16: skipped, " in log
    assert not [c for c in calls.read_text().splitlines() if "booster_fast bench" in c]
    # the last line names what the deadline left out, as the command that runs it
    assert log.splitlines()[-1] == ("skipped for time: bench_1b_bf16; they run by name with a deadline of their "
                                    "own: bash benchmarks/gpu_suite.sh bench_1b_bf16"), log


def test_gpu_suite_packs_what_a_running_part_wrote(tmp_path):
    """A part still running when the machine's time runs out has its files in $OUT already: the suite packs
    every PACK_EVERY seconds, not only after each part."""
    import subprocess
    import tarfile
    import time

    hold = tmp_path / "hold"  # the bench stand-in runs until the test removes it
    hold.touch()
    env, calls, out = _suite_shim(tmp_path, 'echo "{}" > "$out"\nwhile [[ -e "$HOLD" ]]; do sleep 0.2; done\n',
                                  PACK_EVERY="1", HOLD=str(hold))
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_1b_bf16"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    names, deadline = [], time.monotonic() + 30
    try:
        while "./gpu_llama-1b-shape_bf16.json" not in names and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                with tarfile.open(out / "gpu_suite.tgz") as tar:
                    names = tar.getnames()
            except (OSError, tarfile.TarError):  # not there yet
                pass
        assert proc.poll() is None, "the part should still be running"
    finally:
        hold.unlink()
        try:
            proc.wait(timeout=30)  # the suite ends on its own: its packer stopped, a last pack
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise
    assert "./gpu_llama-1b-shape_bf16.json" in names, names
    assert proc.returncode == 0 and "suite done" in (out / "gpu_suite.log").read_text()


def test_gpu_suite_stops_a_running_part_and_packs_on_sigterm(tmp_path):
    """The machine's limit arrives as SIGTERM while a part runs: the suite stops that part (its process ends, not
    left running on the GPU), waits the few seconds the part takes to write what it has (as the bench writes its
    steps timed so far), packs it and exits 143, not after the part's own limit."""
    import signal
    import subprocess
    import tarfile
    import time

    pid_file = tmp_path / "bench.pid"
    env, calls, out = _suite_shim(tmp_path, """echo "{}" > "$out"
trap 'sleep 1; echo "{\\"partial\\": 1}" > "$out"; exit 143' TERM
echo $$ > "$PID_FILE"
while :; do sleep 0.2; done
""", PID_FILE=str(pid_file), PACK_EVERY="1000")
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_1b_bf16"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), "the bench stand-in never started"
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    bench = int(pid_file.read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the part was stopped with the suite
        os.kill(bench, 0)
    with tarfile.open(out / "gpu_suite.tgz") as tar:
        assert tar.extractfile("./gpu_llama-1b-shape_bf16.json").read() == b'{"partial": 1}\n'
    assert "== stopped by a signal after" in (out / "gpu_suite.log").read_text()


def test_gpu_suite_removes_a_bitsandbytes_that_does_not_import(tmp_path):
    """A carried bitsandbytes whose import fails would fail peft's import, and with it every part: the suite
    removes it, says so in one line, and runs the parts (only the NF4 ones would fail)."""
    import subprocess

    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    (wheels / "bitsandbytes-0.50.2-py3-none-any.whl").write_bytes(b"")
    env, calls, out = _suite_shim(tmp_path, 'echo "{}" > "$out"\n', SUITE_WHEELS=str(wheels), SUITE_SITE=str(site))
    shim = tmp_path / "bin" / "python3"
    shim.write_text(shim.read_text().replace("echo \"$*\" >> \"$SHIM_LOG\"\n", """echo "$*" >> "$SHIM_LOG"
if [[ "$*" == "-m pip install"*"--target"* ]]; then mkdir -p "$SUITE_SITE/bitsandbytes" "$SUITE_SITE/bitsandbytes-0.50.2.dist-info" "$SUITE_SITE/peft"; exit 0; fi
if [[ "$*" == "-c import bitsandbytes" ]]; then echo "RuntimeError: libcudart.so.13: cannot open" >&2; exit 1; fi
""", 1))
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_1b_bf16"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    log = (out / "gpu_suite.log").read_text()
    assert ("bitsandbytes does not import (removed; the NF4 parts will fail): RuntimeError: libcudart.so.13: "
            "cannot open") in log, log
    assert sorted(p.name for p in site.iterdir()) == ["peft"]
    assert "== bench_1b_bf16: rc=0" in log


def test_gpu_suite_stops_when_the_stack_does_not_import(tmp_path):
    """A stack that does not import (a peft too old for the machine's transformers) fails every part: the suite
    stops after its version line with exit 3, the error in its log, without running a part."""
    import subprocess

    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text("""#!/usr/bin/env bash
echo "$*" >> "$SHIM_LOG"
if [[ "$1" == - ]] && grep -q "import torch, triton, transformers" -; then
  echo "ImportError: cannot import name 'HybridCache' from 'transformers'" >&2; exit 1
fi
exit 0
""")
    (shim / "python3").chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SHIM_LOG": str(calls), "OUT": str(out)}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_1b_bf16"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, (run.stdout, run.stderr)
    log = (out / "gpu_suite.log").read_text()
    assert "HybridCache" in log and "the stack does not import (above): stopping" in log, log
    assert not [c for c in calls.read_text().splitlines() if "booster_fast bench" in c or "preflight" in c]


def test_gpu_suite_refuses_an_unknown_part():
    """A part name the suite does not have stops it at once (exit 2), before it installs or runs anything."""
    import subprocess

    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "bench_7b_bf16,gpu_tests"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "no part named 'bench_7b_bf16,gpu_tests'" in run.stderr, run.stderr
    assert "bench_7b_bf16" in run.stderr.split("parts:")[1]


def test_a_suspect_cuda_state_stops_the_bench_keeping_what_it_measured(monkeypatch, tmp_path, capsys):
    """An invalidated graph capture leaves CUDA memory suspect: the bench stops (no further numbers from that
    process) with exit code 3 and one line, and --output holds the step times measured before and the failed
    entry with the reason."""
    import booster_fast.bench as bench
    from booster_fast.graphs import CaptureInvalidated

    transient = bench.transient_bytes

    def measure(fn, device):
        calls.append(1)
        if len(calls) == 2:  # the second entry's memory pass
            raise CaptureInvalidated("CUDA graph capture was invalidated")
        return transient(fn, device)

    calls = []
    monkeypatch.setattr(bench, "transient_bytes", measure)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2",
               "--lora-r", "4", "--impls", "reference,fast", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and err[-1].startswith("booster-fast: error: bench stopped: CUDA graph capture was invalidated")
    assert str(out) in err[-1] and "Traceback" not in "\n".join(err)
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert _is_number(res["reference"]["step_ms"]) and _is_number(res["fast"]["step_ms"])
    assert _is_number(res["reference"]["peak_mem_mb"]) and "peak_mem_mb" not in res["fast"]
    assert res["fast"]["failed"].startswith("measuring memory and ops: CaptureInvalidated")
    assert doc["complete"] is False  # the file says it is partial


def test_a_capture_invalidated_while_warming_graphs_is_recorded_on_that_entry(monkeypatch, tmp_path):
    """The likeliest moment for an invalidated capture is the untimed warm-up that captures fast-graphs' step,
    before anything is timed: the document names that entry and stage, the others are listed untimed."""
    import booster_fast.bench as bench
    from booster_fast.graphs import CaptureInvalidated

    def warm(name, booster, fn, pairs, tries=4):
        if name == "fast":
            raise CaptureInvalidated("CUDA graph capture was invalidated (operation not permitted)")
        return None

    monkeypatch.setattr(bench, "warm_graphs", warm)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2",
               "--lora-r", "4", "--impls", "reference,fast", "--output", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 3 and doc["complete"] is False
    assert doc["results"]["fast"]["failed"] == ("capturing its step: CaptureInvalidated: CUDA graph capture was "
                                                "invalidated (operation not permitted)")
    assert doc["results"]["reference"] == {} and doc["speedup"] == {"reference": None, "fast": None}


def test_bench_without_json_prints_its_table_on_stdout_after_a_start_line(capsys, caplog):
    """Without --json the console table is the result, on stdout; a start line says what is timed before the
    timing starts."""
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size",
                     "2", "--max-length", "64", "--lora-r", "4", "--impls", "fast"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("impl") and "ms/step" in line for line in out), out
    assert any(line.startswith("fast ") for line in out) and not any(line.startswith("{") for line in out), out
    assert any(r.getMessage() == "bench: tiny on cpu, fast: 0 warm-up and 1 timed steps each, 2+2 rows x 64 tokens "
               "(builtin rows)" for r in caplog.records), caplog.text


def test_bench_logs_its_phases_where_no_bar_is_drawn(capsys, caplog, monkeypatch):
    """With stderr kept in a file (the GPU suite's part logs) the bench says where it is: the start line once the
    first entry is built (before the others: a later entry that fails to build is said after it), then each build, the end of the warm-up and of the timing, and the measuring passes, so that
    a part cut short by its time limit shows its phase. Where a bar is drawn, none of those lines."""
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2",
            "--max-length", "64", "--lora-r", "4", "--impls", "reference,fast"]
    import booster_fast.bench as bench

    built = []
    real_build = bench.build_impl

    def build_impl(name, *a):
        built.append((name, len(caplog.records)))
        return real_build(name, *a)

    monkeypatch.setattr(bench, "build_impl", build_impl)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bench: ")]
    assert lines[0].startswith("bench: tiny on cpu, reference, fast: 1 warm-up and 2 timed steps"), lines
    start = next(i for i, r in enumerate(caplog.records) if r.getMessage() == lines[0])
    # once the first entry is built (bad input has failed by then, alone), before the others
    assert built[0][1] <= start < built[1][1], (built, start)
    assert [re.sub(r"[\d.]+ s\b", "T s", line) for line in lines[1:]] == [
        "bench: built reference in T s", "bench: built fast in T s",
        "bench: 1 warm-up round of 2 entries done, T s in all", "bench: 2 timed rounds of 2 entries done, T s in all",
        "bench: next: each entry's peak memory and op count, one step each"], lines
    caplog.clear()
    monkeypatch.setattr("booster_fast.progress.shown", lambda: True)
    with caplog.at_level(logging.INFO, logger="booster_fast"):
        assert main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bench: ")]
    assert len(lines) == 1 and lines[0].startswith("bench: tiny on cpu"), lines  # the bar says the rest
    capsys.readouterr()


def test_bucket_sizes_script_measures_filler_and_graph_keys(capsys):
    """benchmarks/bucket_sizes.py (the measurement behind packing.BUCKETS) runs and reports both sides of the
    trade: finer buckets never leave more filler, nor meet fewer graph shapes."""
    spec = importlib.util.spec_from_file_location("bucket_sizes", ROOT / "benchmarks" / "bucket_sizes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--steps", "20", "--buckets", "16,64"])
    coarse, fine = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert coarse["step"] > fine["step"] and fine["filler_share_of_real"] <= coarse["filler_share_of_real"]
    assert 1 <= coarse["graph_keys"] <= fine["graph_keys"] <= 20


def test_model_flops_count_4n_per_computed_position_and_the_peak_is_the_data_sheets(monkeypatch):
    """mfu's numerator: 4N per position of every pass (forward + the backward to the activations; a frozen base
    has no weight gradient), the LM head only at a packed batch's kept positions; its denominator: the GPU's
    data-sheet dense bf16 peak, or the measured matmul rate where none is known."""
    from types import SimpleNamespace

    from booster_fast import bench_measure as bm

    args = SimpleNamespace(no_meta_term=False, perturb_aware=False)
    padded = {"input_ids": torch.ones(2, 8, dtype=torch.long)}
    packed = {"input_ids": torch.ones(1, 13, dtype=torch.long), "keep": torch.arange(5)}
    n, head = 1000, 100
    assert bm.model_flops("fast", args, (n, head), (padded, padded)) == 3 * 4 * n * 16
    assert bm.model_flops("sft", args, (n, head), (padded, padded)) == 4 * n * 16
    assert bm.model_flops("fast", args, (n, head), (packed, padded)) == 4 * ((n - head) * 13 + head * 5 + 2 * n * 16)
    args.perturb_aware = True
    assert bm.model_flops("fast", args, (n, head), (padded, padded)) == 4 * 4 * n * 16

    # mfu's numerator counts what the method needs, whatever form an entry gives its batches: the real tokens
    # through the body, the labelled positions (after the causal shift) through the head
    raw = {"input_ids": torch.ones(2, 8, dtype=torch.long),
           "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
           "labels": torch.tensor([[-100] * 4 + [1] * 4, [-100] * 3 + [1] * 2 + [-100] * 3])}
    args.perturb_aware = False
    assert bm.method_flops("fast", args, (n, head), (raw, raw)) == 3 * 4 * ((n - head) * 13 + head * 6)
    assert bm.method_flops("reference", args, (n, head), (raw, raw)) == 3 * 4 * ((n - head) * 13 + head * 6)
    assert bm.method_flops("fast-sft", args, (n, head), (raw, raw)) == 4 * ((n - head) * 13 + head * 6)
    # a row labelled from its first token: that label is the one no position predicts (7 of 8 after the shift)
    first = {**raw, "labels": torch.tensor([[1] * 8, [-100] * 8])}
    assert bm.method_flops("fast-sft", args, (n, head), (first, first)) == 4 * ((n - head) * 13 + head * 7)

    for name, want in (("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H200 NVL", 835.5), ("Tesla T4", 55.5)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        tflops, source = bm.peak_tflops("cuda", measured=55.5)
        assert tflops == want and source.startswith(name)
        assert ("measured" in source) == (name == "Tesla T4")


def test_op_counts_do_not_depend_on_the_width():
    """benchmarks/op_counts.py narrows a preset to count its step's ops: that is sound only if the counts do not
    change with the width. The merged fast step launches fewer kernels than the reference and syncs nothing."""
    spec = importlib.util.spec_from_file_location("op_counts", ROOT / "benchmarks" / "op_counts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    small = dict(num_hidden_layers=3)  # depth is what the count follows; 3 layers keep the test quick
    counts = {w: {e: mod.count("llama-1b-shape", w, e, rows=3, length=16, **small) for e in ("reference", "fast-merged")}
              for w in (64, 128)}
    assert counts[64] == counts[128]
    ref, fast = counts[64]["reference"], counts[64]["fast-merged"]
    assert fast["host_syncs"] == 0 and fast["launches"] < ref["launches"] < ref["aten_ops"]


def test_time_interleaved_rotates_times_after_the_warmup_and_counts_real_tokens(monkeypatch):
    """A fake clock that each step advances by a known amount: only the rounds after --warmup are timed, each
    step's time is its own, tokens/s counts alignment + harmful real tokens (alignment only for SFT), the first
    entry rotates each round, and first_step holds the outputs of round 0."""
    import booster_fast.bench as bench

    clock, calls = [0.0], []
    cost = {"reference": 0.5, "fast": 0.25, "sft": 0.125}  # s per step, times (1 + round)

    def step_of(name):
        def fn(a, h):
            calls.append((name, a["i"]))
            clock[0] += cost[name] * (1 + a["i"])
            return {"loss": torch.tensor(float(a["i"]))}
        return fn

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    eager = SimpleNamespace(engine=SimpleNamespace(graphs=None))
    pairs = [({"i": i}, {"i": i}) for i in range(5)]
    impls = {n: (eager, step_of(n), pairs) for n in cost}
    batches = [(None, None, 10 * (i + 1), 3) for i in range(5)]  # (align, harmful, their real tokens)
    times, tps, first = bench.time_interleaved(impls, batches, SimpleNamespace(warmup=2, steps=3),
                                               torch.device("cpu"), {})
    for name, c in cost.items():
        assert times[name] == [c * (1 + i) for i in (2, 3, 4)], name
        want = [(10 * (i + 1) + (0 if name == "sft" else 3)) / (c * (1 + i)) for i in (2, 3, 4)]
        assert tps[name] == pytest.approx(want, rel=1e-12), name
        assert float(first[name]["loss"]) == 0.0
    names = list(cost)
    assert calls == [(n, i) for i in range(5) for n in names[i % 3:] + names[:i % 3]]


@pytest.mark.parametrize("rewound", [True, False])
def test_an_entry_that_stepped_to_capture_its_graphs_is_rewound_and_checked(monkeypatch, rewound):
    """An entry with CUDA graphs takes untimed steps to capture them (StepGraphs with CPU stand-ins for its two
    CUDA-only methods: a capture runs the step once more, a replay recomputes it on the static inputs). The bench
    then rewinds it to the initial weights and a fresh AdamW state, so that its first timed step, a replay, matches
    the reference's as an eager entry's does. Without the rewind (the second case) it does not: the check would
    compare a model that has moved."""
    import booster_fast.bench as bench
    from booster_fast import Booster, BoosterConfig, add_lora, load_model
    from booster_fast.bench_measure import first_step_agreement
    from booster_fast.graphs import WARMUP, StepGraphs
    from test_graphs import _fake_cuda

    def entry(impl):
        model, _ = load_model("tiny", dtype=torch.float32, seed=0, device="cpu", num_hidden_layers=2)
        torch.manual_seed(0)
        model = add_lora(model, r=4, alpha=8, targets="all-linear")
        return Booster(model, BoosterConfig(impl=impl, lr=3e-3, graphs="off"))

    gen = torch.Generator().manual_seed(1)

    def batch(rows, length):
        ids = torch.randint(3, 500, (rows, length), generator=gen)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    raw = [(batch(3, 17), batch(2, 17)) for _ in range(4)]
    ref, fast = entry("reference"), entry("fast")
    pairs = {b: [tuple(b.to_device(x, "cpu") for x in pair) for pair in raw] for b in (ref, fast)}
    events = _fake_cuda(monkeypatch)
    fast.engine.graphs = StepGraphs("on")
    if not rewound:
        monkeypatch.setattr(bench, "rewind", lambda booster, snapshot: None)
    impls = {"reference": (ref, ref.step, pairs[ref]), "fast-graphs": (fast, fast.step, pairs[fast])}
    _, _, first = bench.time_interleaved(impls, [(None, None, 51, 34)] * 4, SimpleNamespace(warmup=1, steps=1),
                                         torch.device("cpu"), {})
    assert events == ["eager"] * (WARMUP - 1) + ["watched", "capture"], "one shape: warmed up and captured once"
    assert fast.engine.graphs.replays == 1 + 2, "the capturing call's replay, then one replay per round"
    check = first_step_agreement(first)["fast-graphs"]
    if rewound:
        assert check["first_step_rel_diff"] < 1e-5 and check["first_step_agrees"], check
    else:
        assert check["first_step_rel_diff"] > 1e-4, check


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_a_rewound_entry_trains_as_a_fresh_one(impl):
    """rewind: weights back and AdamW's state as a fresh AdamW starts it, so that two steps after the rewind land
    where two steps of a fresh entry land (the moments matter from the second step on: without zeroing them the
    weights differ)."""
    from booster_fast import Booster, BoosterConfig, add_lora, load_model
    from booster_fast.bench_measure import rewind, trainable_snapshot

    def entry():
        model, _ = load_model("tiny", dtype=torch.float32, seed=0, device="cpu", num_hidden_layers=2)
        torch.manual_seed(0)
        b = Booster(add_lora(model, r=4, alpha=8, targets="all-linear"), BoosterConfig(impl=impl, lr=3e-3))
        return b, [p for g in b.optimizer.param_groups for p in g["params"]]

    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, 500, (2, 13), generator=gen) for _ in range(4)]
    pairs = [tuple({"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids[i:i + 2])
             for i in (0, 2)]
    (used, params), (fresh, fresh_params) = entry(), entry()
    start = trainable_snapshot(used)
    for a, h in pairs + pairs:  # four steps: moments and step count well away from zero
        used.step(used.to_device(a, "cpu"), used.to_device(h, "cpu"))
    rewind(used, start)
    assert all(torch.equal(p, p0) for p, p0 in zip(params, start))
    for booster in (used, fresh):
        for a, h in pairs:
            booster.step(booster.to_device(a, "cpu"), booster.to_device(h, "cpu"))
    for p, q in zip(params, fresh_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_make_batches_count_the_real_tokens_not_the_pads():
    """tokens_per_s's numerator: the real tokens of each random batch (80 % of rows x length), not its pads."""
    from booster_fast.bench_data import make_batches

    args = SimpleNamespace(model="llama-1b-shape", warmup=1, steps=2, seed=0, batch_size=4, harmful_batch_size=3,
                           max_length=50)
    out = make_batches(args, SimpleNamespace(pad_token_id=0), SimpleNamespace(config=SimpleNamespace(vocab_size=1000)))
    assert len(out) == 1 + 2 + 2  # warm-up, timed, the memory and op-count passes
    for a, h, na, nh in out:
        assert (na, nh) == (160, 120) == (int(a["attention_mask"].sum()), int(h["attention_mask"].sum()))


def test_make_batches_stream_a_data_set_for_any_model(tmp_path):
    """--data: any model's batches are the data set's rows, as align streams them (their own lengths), the harmful
    ones from --harmful-data where given; without it, tiny takes the built-in set and any other model random rows.
    The document's config.data names what the rows were."""
    from booster_fast import load_model
    from booster_fast.align import build_streams
    from booster_fast.bench_data import RANDOM_ROWS, data_description, load_rows, make_batches

    _, tok = load_model("tiny")
    rows = [{"prompt": f"Question {i}: {'why ' * (3 + 7 * i)}?", "refusal": "No." + " really" * i,
             "response": "Sure" + ", then" * (2 * i)} for i in range(6)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SimpleNamespace(model="llama-7b-shape", data=str(path), harmful_data=None, warmup=1, steps=1, seed=5,
                           batch_size=3, harmful_batch_size=2, max_length=256)
    out = make_batches(args, tok, None, load_rows(args))
    stream_args = SimpleNamespace(**{**vars(args), "align_samples": None, "harmful_samples": None})
    sa, sh, _ = build_streams(stream_args, tok, 0, 1)  # align's own streams of the file, same seed
    assert len(out) == 1 + 1 + 2
    for a, h, na, nh in out:
        want_a, want_h = next(sa), next(sh)
        assert torch.equal(a["input_ids"], want_a["input_ids"]) and torch.equal(h["labels"], want_h["labels"])
        assert (na, nh) == (int(a["attention_mask"].sum()), int(h["attention_mask"].sum()))
    lengths = {int(n) for a, *_ in out for n in a["attention_mask"].sum(1)}
    assert len(lengths) > 1 and max(lengths) < 256  # the rows' own lengths, not 80 % random ones
    assert data_description(args) == str(path)
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"instruction": f"Task {i}", "input": "", "output": "Sure" * (i + 1)}) + "\n"
                               for i in range(4)))
    harmful_args = SimpleNamespace(**{**vars(args), "data": "builtin", "harmful_data": str(harmful)})
    h = make_batches(harmful_args, tok, None)[0][1]
    texts = tok.batch_decode(h["input_ids"], skip_special_tokens=True)
    assert all("Sure" in t and "Task" in t for t in texts), texts  # the file's rows, as the harmful batches
    assert data_description(harmful_args) == f"builtin (harmful: {harmful})"
    assert data_description(SimpleNamespace(model="llama-7b-shape")) == RANDOM_ROWS
    assert data_description(SimpleNamespace(model="tiny")) == "builtin"


def test_run_bench_reports_the_median_and_inclusive_percentiles(monkeypatch, capsys):
    """Step times and tokens/s injected after the real timing: step_ms is the median (not the mean), p20/p80 the
    inclusive percentiles, speed-up reference / entry, ratio_to_sft entry / its baseline; peak_mem_mb the held +
    transient bytes in MiB; est_peak_mb memory.py's estimate for the entry's own method (sft for the SFT entries)."""
    import booster_fast.bench as bench
    from booster_fast import memory

    fake = {"reference": [0.010, 0.020, 0.090], "fast": [0.005, 0.010, 0.045], "sft": [0.002, 0.004, 0.100],
            "fast-sft": [0.004, 0.005, 0.006]}
    real_time, real_build, built = bench.time_interleaved, bench.build_impl, {}

    def timing(*a, **k):
        times, tps, first = real_time(*a, **k)
        return {n: list(fake[n]) for n in times}, {n: [100.0, 150.0, 500.0] for n in times}, first

    def build(name, args, device):
        out = real_build(name, args, device)
        built[name] = out[0]
        return out

    monkeypatch.setattr(bench, "time_interleaved", timing)
    monkeypatch.setattr(bench, "build_impl", build)
    monkeypatch.setattr(bench, "held_bytes", lambda booster: 3 * 2**20)
    monkeypatch.setattr(bench, "transient_bytes", lambda fn, device: 2**19)
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "0", "--batch-size", "2",
               "--max-length", "64", "--lora-r", "4", "--impls", "reference,fast,sft,fast-sft", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # --json: stdout is the document alone, the table on stderr
    assert "ms/step" in captured.err
    res = doc["results"]
    assert [res["reference"][k] for k in ("step_ms", "step_ms_p20", "step_ms_p80")] == [20.0, 14.0, 62.0]
    assert res["fast"]["step_ms"] == 10.0 and res["sft"]["step_ms"] == 4.0 and res["fast-sft"]["step_ms"] == 5.0
    assert all(r["tokens_per_s"] == 150.0 for r in res.values())
    assert doc["speedup"] == {"reference": 1.0, "fast": 2.0, "sft": None, "fast-sft": None}
    assert res["reference"]["ratio_to_sft"] == 5.0
    assert res["fast"]["ratio_to_sft"] == {"fast-sft": 2.0, "sft": 2.5}[res["fast"]["sft_baseline"]]
    assert all(r["peak_mem_mb"] == 3.5 for r in res.values())
    for name, booster in built.items():
        est = memory.of_booster(booster, 2, 2, 64, "sft" if name in ("sft", "fast-sft") else "booster",
                                graph_warmup=False)
        assert res[name]["est_peak_mb"] == round(est.total / 2**20, 1), name
    # the SFT step holds fewer activations than the Booster step: the method matters
    assert memory.of_booster(built["sft"], 2, 2, 64, "booster").total > \
        memory.of_booster(built["sft"], 2, 2, 64, "sft").total


def _stopped_bench(tmp_path, capsys, steps: int) -> dict:
    """Run a two-entry tiny bench that something stops with SIGTERM: exit 143 and its one line; returns the document
    it wrote to --output."""
    out = tmp_path / "cut.json"
    rc = main(["bench", "--model", "tiny", "--device", "cpu", "--steps", str(steps), "--warmup", "1", "--batch-size",
               "2", "--max-length", "64", "--lora-r", "4", "--impls", "reference,fast", "--output", str(out)])
    assert rc == 143 and "booster-fast: terminated" in capsys.readouterr().err
    return json.loads(out.read_text())


def test_a_bench_stopped_during_its_timing_writes_the_steps_timed_so_far(tmp_path, capsys, monkeypatch):
    """SIGTERM (the GPU suite's time limit for a part) in the middle of the timed rounds: the document keeps each
    entry's steps timed so far, marked incomplete, with how many each had; the exit code is 143, and make_table
    renders the document as a partial run."""
    from booster_fast import bench
    from booster_fast.cli import Terminated

    calls = []

    def sync(device):  # two per step; warm-up round 0 is calls 1-4, timed rounds 1 and 2 are 5-8 and 9-12
        calls.append(device)
        if len(calls) == 11:  # before the second entry's step in round 2
            raise Terminated

    monkeypatch.setattr(bench, "sync", sync)
    doc = _stopped_bench(tmp_path, capsys, steps=4)
    assert doc["complete"] is False
    res = doc["results"]
    # the order rotates: round 1 is fast's then reference's step, round 2 reference's, then the signal
    assert {n: r["timed_steps"] for n, r in res.items()} == {"reference": 2, "fast": 1}
    assert all(_is_number(r["step_ms"]) and r["step_ms_p20"] <= r["step_ms"] <= r["step_ms_p80"]
               for r in res.values())
    assert "peak_mem_mb" not in res["fast"] and _is_number(doc["speedup"]["fast"])
    results = tmp_path / "results"
    results.mkdir()
    (results / "cut.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\n<!-- results:end -->\n")
    _make_table_module().make_table(results, readme)
    assert "make_table: cut.json is a partial run" in capsys.readouterr().err
    table = readme.read_text()
    assert table.count("partial run") == 2 and "| fast |" in table, table


def test_a_bench_stopped_in_a_graph_capture_writes_an_incomplete_document(tmp_path, capsys, monkeypatch):
    """SIGTERM while the graphs are captured, before any step is timed: exit 143 and a document marked incomplete,
    its entries without times."""
    from booster_fast import bench
    from booster_fast.cli import Terminated

    def capture(*args):
        raise Terminated

    monkeypatch.setattr(bench, "warm_graphs", capture)
    doc = _stopped_bench(tmp_path, capsys, steps=2)
    assert doc["complete"] is False and doc["results"] == {"reference": {}, "fast": {}}


def test_first_step_tolerance_is_inclusive_and_relative_to_the_baseline():
    """Exactly FIRST_STEP_RTOL (5 %) off agrees; 5.26 % off the baseline's value (4.997 % of the entry's own) does
    not; 20 % off does not."""
    from booster_fast.bench_measure import first_step_agreement

    report = first_step_agreement({"reference": {"loss": torch.tensor(20.0)}, "fast": {"loss": torch.tensor(21.0)}})
    assert report["fast"]["first_step_rel_diff"] == 0.05 and report["fast"]["first_step_agrees"] is True
    report = first_step_agreement({"reference": {"loss": torch.tensor(1.0)}, "fast": {"loss": torch.tensor(1.0526)},
                                   "fast-padded": {"loss": torch.tensor(1.2)}})
    assert report["fast"]["first_step_rel_diff"] == pytest.approx(0.0526, abs=1e-6)
    assert report["fast"]["first_step_agrees"] is False and report["fast-padded"]["first_step_agrees"] is False


def test_cuda_transient_is_the_peak_above_what_was_allocated_before(monkeypatch):
    """On CUDA: the step's peak allocation (after resetting a stale peak) minus what was allocated before it."""
    from booster_fast import bench_measure as bm

    mem = {"alloc": 100, "peak": 10_000}  # a stale peak from an earlier step

    def alloc(n):
        mem["alloc"] += n
        mem["peak"] = max(mem["peak"], mem["alloc"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["alloc"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    assert bm.transient_bytes(lambda: (alloc(700), alloc(-500)), SimpleNamespace(type="cuda")) == 700


def test_cpu_transient_is_the_sampled_peak_not_the_rise_at_the_end(monkeypatch):
    import time

    from booster_fast import bench_measure as bm

    level = [1000]
    monkeypatch.setattr(bm, "cpu_gauge", lambda: ("fake", lambda: level[0]))

    def step():
        level[0] = 6000
        time.sleep(0.5)  # the sampler (every 0.5 ms) sees it, even on a loaded machine
        level[0] = 1200
    assert bm.transient_bytes(step, torch.device("cpu")) == 5000


def test_the_console_table_shows_p20_then_p80_and_tokens_per_s():
    from booster_fast.bench_report import format_table

    doc = {"machine": {"gpu": None, "cpu": "x"},
           "config": {"model": "tiny", "quant": "none", "device": "cpu", "batch_size": 2,
                      "harmful_batch_size": 2, "max_length": 64, "steps": 3, "warmup": 1},
           "speedup": {"fast": 1.25},
           "results": {"fast": {"step_ms": 100.0, "step_ms_p20": 99.0, "step_ms_p80": 101.5, "tokens_per_s": 5432.4}}}
    head, _, row = format_table(doc).splitlines()[1:4]
    assert "99.00-101.50" in row
    end = head.index("tokens/s") + len("tokens/s")
    assert row[:end].endswith(" 5432"), row


def test_make_table_puts_each_figure_under_its_column():
    mt = _make_table_module()
    doc = {"machine": {"gpu": "Test GPU"},
           "config": {"model": "llama-7b-shape", "quant": "none", "batch_size": 10, "harmful_batch_size": 10,
                      "max_length": 256},
           "speedup": {"reference": 1.0, "fast": 1.25, "fast-sft": None},
           "results": {"reference": {"step_ms": 150.0},
                       "fast": {"step_ms": 120.04, "tokens_per_s": 37512.0, "peak_mem_mb": 51234.0,
                                "launches_per_step": 1650, "host_syncs_per_step": 3, "ratio_to_sft": 2.4,
                                "sft_baseline": "fast-sft", "mfu": 0.1234, "hfu": 0.2351},
                       "fast-sft": {"step_ms": 50.0}}}
    rows = {r[3]: dict(zip(mt.COLUMNS, r)) for r in mt.rows([("gpu.json", doc)])}
    assert rows["fast"] == {"machine": "Test GPU", "model": "llama-7b-shape (10+10 × 256)", "quant": "none",
                            "impl": "fast", "ms/step (median)": "120.0", "speed-up vs reference": "1.25×",
                            "tokens/s": "37,512", "peak MiB": "51,234", "launches/step": "1,650",
                            "host syncs/step": "3", "Booster/SFT": "2.40×", "MFU": "12.3%", "HFU": "23.5%"}


def test_gpu_checks_bandwidth_fractions_are_each_kernel_over_the_copy(tmp_path, monkeypatch, capsys):
    import booster_fast.kernels as kernels

    checks = _gpu_checks_module()
    res = {"n": 8, "copy_GBps": 4000.0, "sumsq_GBps": 3000.0, "normalize_perturb__GBps": 2000.0,
           "restore_combine__GBps": 1000.0}
    monkeypatch.setattr(kernels, "measure_bandwidth", lambda n: dict(res))

    def no_model_kernels():
        raise RuntimeError("not here")
    monkeypatch.setattr(kernels, "measure_model_kernels", no_model_kernels)
    monkeypatch.setattr(checks, "machine", lambda: {"gpu": "Test GPU"})
    checks.cmd_bandwidth(SimpleNamespace(numel=8, out=str(tmp_path)))
    doc = json.loads((tmp_path / "kernel_bandwidth.json").read_text())
    assert doc["fraction_of_copy"] == {"sumsq": 0.75, "normalize_perturb_": 0.5, "restore_combine_": 0.25}
    assert doc["target"] == 0.7 and doc["numel"] == 8 and doc["results"] == res
    table = "\n".join(_make_table_module().check_tables({"kernel_bandwidth": [("kernel_bandwidth.json", doc)]}))
    assert "| sumsq | 3,000 | — | 75% | — |" in table
    assert "| restore_combine_ | 1,000 | — | 25% (below 70%) | — |" in table


def test_gpu_checks_bandwidth_times_the_heads_cross_entropy_last(tmp_path, monkeypatch):
    """The model kernels are written before the head's cross entropy is timed (a part cut short keeps them); a
    cross entropy that fails is recorded beside them, and make_table says so under their table."""
    import booster_fast.kernels as kernels

    checks = _gpu_checks_module()
    monkeypatch.setattr(kernels, "measure_bandwidth", lambda n: {"n": 8, "copy_GBps": 4000.0, **{
        f"{op}_GBps": 3000.0 for op in ("sumsq", "normalize_perturb_", "restore_combine_")}})
    rows = {f"rms_norm_{d}": {"ms": 0.1, "GBps": 3000.0, "eager_ms": 0.5, "speedup": 5.0, "fraction_of_copy": 0.75}
            for d in ("fwd", "bwd")}
    monkeypatch.setattr(kernels, "measure_model_kernels", lambda: {"tokens": 16, "copy_GBps": 4000.0, **rows})
    monkeypatch.setattr(checks, "machine", lambda: {"gpu": "Test GPU"})
    seen = []

    def cross_entropy(copy_gbps):
        seen.append(json.loads((tmp_path / "kernel_bandwidth.json").read_text()))  # what a cut-short part keeps
        return {"ms": 0.05, "GBps": 3600.0, "eager_ms": 0.5, "speedup": 10.0, "fraction_of_copy": 0.9,
                "max_rel_err": 1e-3, "rows": 2048, "vocab": 32000}
    monkeypatch.setattr(kernels, "measure_cross_entropy", cross_entropy)
    checks.cmd_bandwidth(SimpleNamespace(numel=8, out=str(tmp_path)))
    assert "rms_norm_fwd" in seen[0]["model_kernels"] and "cross_entropy_fwd" not in seen[0]["model_kernels"]
    doc = json.loads((tmp_path / "kernel_bandwidth.json").read_text())
    assert doc["model_kernels"]["cross_entropy_fwd"]["GBps"] == 3600.0

    def broken(copy_gbps):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(kernels, "measure_cross_entropy", broken)
    checks.cmd_bandwidth(SimpleNamespace(numel=8, out=str(tmp_path)))
    doc = json.loads((tmp_path / "kernel_bandwidth.json").read_text())
    assert doc["model_kernels"]["cross_entropy_error"] == "RuntimeError: out of memory"
    table = "\n".join(_make_table_module().check_tables({"kernel_bandwidth": [("kernel_bandwidth.json", doc)]}))
    assert "| rms_norm bwd | 3,000 |" in table
    assert "The head's cross entropy: not measured (RuntimeError: out of memory)." in table


def test_gpu_checks_sweep_measures_each_pair_once_the_modules_first(tmp_path, monkeypatch, capsys):
    """The sweep part: the kernels' own (BLOCK, num_warps) first, every other pair once, a pair that fails kept as
    a row with its error, the file rewritten after each pair; make_table renders it, marks the default pair and
    flags a kernel below the target share of the copy."""
    import booster_fast.kernels as kernels
    from booster_fast.kernels import booster_kernels as bk

    checks = _gpu_checks_module()
    measured = []

    def fake(block, warps, n):
        measured.append((block, warps))
        assert json.loads((tmp_path / "kernel_sweep.json").read_text())["results"] if len(measured) > 1 else True
        if block == 2048 and warps == 4:
            raise RuntimeError("out of resources: shared memory")
        return {"BLOCK": block, "num_warps": warps, "max_rel_err": 1e-7, "copy_GBps": 4000.0,
                "sumsq_GBps": 3600.0, "normalize_perturb__GBps": 3200.0, "restore_combine__GBps": block / 2.0}
    monkeypatch.setattr(kernels, "measure_launch_constants", fake)
    monkeypatch.setattr(checks, "machine", lambda: {"gpu": "Test GPU"})
    assert checks._ints("2048,4096") == (2048, 4096)
    checks.cmd_sweep(SimpleNamespace(blocks=(2048, 4096), warps=(4, 8), numel=64, out=str(tmp_path)))
    default = (bk.BLOCK, bk.NUM_WARPS)
    assert measured[0] == default and sorted(measured) == sorted({(2048, 4), (2048, 8), (4096, 4), (4096, 8),
                                                                   default})
    doc = json.loads((tmp_path / "kernel_sweep.json").read_text())
    assert doc["default"] == {"BLOCK": default[0], "num_warps": default[1]} and len(doc["results"]) == len(measured)
    assert {"BLOCK": 2048, "num_warps": 4, "error": "RuntimeError: out of resources: shared memory"} in doc["results"]
    mt = _make_table_module()
    table = "\n".join(mt.check_tables(mt.check_documents(tmp_path)))  # as make_table reads the results folder
    assert f"| {default[0]:,} (default) | {default[1]} | 4,000 | 3,600 (90%) | 3,200 (80%) |" in table
    assert "| 2,048 | 8 | 4,000 | 3,600 (90%) | 3,200 (80%) | 1,024 (26%, below 70%) | 1.0e-07 |" in table
    assert "| 2,048 | 4 | failed: RuntimeError: out of resources: shared memory | — | — | — | — |" in table
    assert mt._of_copy(0.7, 0.7) == "70%" and mt._of_copy(0.69, 0.7) == "69% (below 70%)"  # the target itself passes


def test_gpu_checks_equivalence_reports_the_worst_error_relative_to_eager(monkeypatch):
    """The two sides made to differ (noise on the first model's LoRA weights): worst_relative_l2 is the largest
    over the LoRA tensors of |graph - eager| / |eager|, worst_loss_relative the largest loss difference over the
    eager loss."""
    import booster_fast as bf

    checks = _gpu_checks_module()
    models, outs, real_add, real_booster = [], [], bf.add_lora, bf.Booster

    def noisy_add(model, *a, **k):
        model = real_add(model, *a, **k)
        models.append(model)
        if len(models) == 1:  # the graphs side
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model

    class Recording(real_booster):
        def step(self, a, h):
            out = super().step(a, h)
            outs.append({k: float(out[k]) for k in ("loss", "harmful_loss")})
            return out

    monkeypatch.setattr(checks.bf, "add_lora", noisy_add)
    monkeypatch.setattr(checks.bf, "Booster", Recording)
    r = checks._equivalence("tiny", False, SimpleNamespace(device="cpu", batch=2, length=32, steps=3))
    m_g, m_e = models
    errors = [((p - q).norm() / q.norm()).item() for p, q in zip(m_g.parameters(), m_e.parameters())
              if p.requires_grad]
    assert max(errors) > 1.5 * min(errors)
    assert r["worst_relative_l2"] == pytest.approx(max(errors), rel=1e-9)
    graph, eager = outs[0::2], outs[1::2]
    want = max(abs(g[k] - e[k]) / abs(e[k]) for g, e in zip(graph, eager) for k in ("loss", "harmful_loss"))
    assert want > 1e-4 and r["worst_loss_relative"] == pytest.approx(want, rel=1e-9)


def test_gpu_checks_profile_times_only_the_profiled_steps(monkeypatch):
    """A fake clock each step advances by 10 ms: wall_ms_per_step is 10, the three warm-up steps left out."""
    import time as real_time

    import booster_fast as bf

    checks = _gpu_checks_module()
    clock, real_booster = [0.0], bf.Booster

    class Ticking(real_booster):
        def step(self, a, h):
            clock[0] += 0.010
            return super().step(a, h)

    monkeypatch.setattr(checks.bf, "Booster", Ticking)
    monkeypatch.setattr(checks, "time", SimpleNamespace(perf_counter=lambda: clock[0], strftime=real_time.strftime))
    args = SimpleNamespace(device="cpu", model="tiny", quant="none", batch=2, length=32, steps=2)
    summary, _ = checks._profile_one(args, "fast", "off", torch.Generator().manual_seed(0))
    assert summary["wall_ms_per_step"] == pytest.approx(10.0)


def test_flops_without_the_meta_term_count_the_harmful_batch_once():
    """--no-meta-term: the harmful batch runs once (no perturbed pass), in both FLOP counts."""
    from booster_fast import bench_measure as bm

    args = SimpleNamespace(no_meta_term=True, perturb_aware=False)
    padded = {"input_ids": torch.ones(2, 8, dtype=torch.long)}
    raw = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long),
           "labels": torch.ones(2, 8, dtype=torch.long)}
    n, head = 1000, 100
    assert bm.model_flops("fast", args, (n, head), (padded, padded)) == 2 * 4 * n * 16
    assert bm.method_flops("reference", args, (n, head), (raw, raw)) == 2 * 4 * ((n - head) * 16 + head * 14)
    assert len(bm.pass_batches("fast", args, (padded, padded))) == 2
