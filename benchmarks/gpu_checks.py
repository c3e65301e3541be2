"""GPU checks that are not unit tests: kernel bandwidth, graph-vs-eager equivalence, a profiler table.

    python benchmarks/gpu_checks.py bandwidth   --out DIR     # each kernel's GB/s against a d2d copy
    python benchmarks/gpu_checks.py equivalence --out DIR     # graphs='on' vs eager: padded, packed (two lengths),
                                                              # packed with graphs.POOL_WARMUP
    python benchmarks/gpu_checks.py profile     --out DIR     # top kernels and GPU idle share per step
    python benchmarks/gpu_checks.py sweep       --out DIR     # the flat-buffer kernels' GB/s per BLOCK x num_warps

Each writes one JSON file into DIR (and `profile` a text table too); the last stdout line is the JSON
document. `--device cpu` runs the equivalence and profile code on the CPU (graphs off there) as a smoke test.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import torch

import booster_fast as bf
from booster_fast.batches import to_device, without_mask
from booster_fast.errors import described
from booster_fast import graphs as step_graphs
from booster_fast.graphs import CaptureInvalidated
from booster_fast.packing import pack


def machine() -> dict:
    from booster_fast.kernels import triton_unusable

    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name() if cuda else None, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
            "triton_unusable": triton_unusable("cuda") if cuda else None}


def write(out_dir: str, name: str, doc: dict):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(path + ".tmp", path)
    print(json.dumps(doc))


def random_batch(rows, length, vocab, gen):
    """Right-padded random tokens on the CPU (75-100% real), as a collator hands them to Booster.to_device."""
    ids = torch.randint(4, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 4] = -100  # prompt
    real = torch.randint(length * 3 // 4, length + 1, (rows,), generator=gen)
    pad = torch.arange(length)[None] >= real[:, None]
    ids[pad], labels[pad] = 0, -100
    return {"input_ids": ids, "labels": labels, "attention_mask": (~pad).long()}


def cmd_bandwidth(args):
    from booster_fast.kernels import measure_bandwidth

    from booster_fast.kernels import measure_cross_entropy, measure_model_kernels

    res = measure_bandwidth(n=args.numel)
    ratios = {op: res[f"{op}_GBps"] / res["copy_GBps"] for op in ("sumsq", "normalize_perturb_", "restore_combine_")}
    doc = {"machine": machine(), "numel": args.numel, "results": res, "fraction_of_copy": ratios, "target": 0.70}
    write(args.out, "kernel_bandwidth.json", doc)  # now, and again below: a part cut short keeps these numbers
    try:  # the model's fused ops (RMSNorm, SwiGLU, RoPE), forward and backward, against the eager formulas
        doc["model_kernels"] = measure_model_kernels()
    except Exception as e:  # recorded in the file and printed: the flat-buffer numbers above still count
        doc["model_kernels_error"] = f"{type(e).__name__}: {e}"
        print(f"model kernels not measured: {doc['model_kernels_error']}", file=sys.stderr)
    write(args.out, "kernel_bandwidth.json", doc)
    if "model_kernels" in doc:  # the chunked head's cross entropy, last: a part cut short keeps the rest
        try:
            doc["model_kernels"]["cross_entropy_fwd"] = measure_cross_entropy(doc["model_kernels"]["copy_GBps"])
        except Exception as e:
            doc["model_kernels"]["cross_entropy_error"] = f"{type(e).__name__}: {e}"
            print(f"cross entropy not measured: {doc['model_kernels']['cross_entropy_error']}", file=sys.stderr)
        write(args.out, "kernel_bandwidth.json", doc)


def cmd_sweep(args):
    """The flat-buffer kernels' GB/s for each (BLOCK, num_warps) pair, the module's own pair first; the file is
    rewritten after each pair, so that a part cut short keeps the pairs it measured."""
    from booster_fast.kernels import booster_kernels, measure_launch_constants

    default = (booster_kernels.BLOCK, booster_kernels.NUM_WARPS)
    pairs = [default] + [(b, w) for b in args.blocks for w in args.warps if (b, w) != default]
    doc = {"machine": machine(), "numel": args.numel, "default": {"BLOCK": default[0], "num_warps": default[1]},
           "target": 0.70, "results": []}
    for block, warps in pairs:
        try:
            doc["results"].append(measure_launch_constants(block, warps, n=args.numel))
        except Exception as e:  # one pair that does not compile or run costs its own row
            doc["results"].append({"BLOCK": block, "num_warps": warps, "error": f"{type(e).__name__}: {e}"[:300]})
        write(args.out, "kernel_sweep.json", doc)


def _booster(name, quant, device, graphs, packing, seed=0):
    model, tok = bf.load_model(name, quant=quant, seed=seed, device=device)
    torch.manual_seed(seed)
    model = bf.add_lora(model)
    cfg = bf.BoosterConfig(impl="fast", graphs=graphs, merge_passes=True, packing=packing)
    return model, bf.Booster(model, cfg)


def _equivalence(name, packing, args) -> dict:
    """Graph replays vs eager steps. Padded batches share one shape: every step brings fresh data. Packed ones
    come in bucketed lengths: one pair warms up, is captured and replays, then a second pair of another length
    warms up (in the graphs' pool with graphs.POOL_WARMUP), is captured, and the two alternate. Every step's
    outputs are read only at the end, as align reads them once per log interval: a warm-up output left in the
    pool would be overwritten by the replays after it."""
    gen = torch.Generator().manual_seed(0)
    m_g, b_g = _booster(name, "none", args.device, "on" if args.device == "cuda" else "off", packing)
    m_e, b_e = _booster(name, "none", args.device, "off", packing)
    vocab = m_g.config.vocab_size if name != "tiny" else 2000
    form = pack if packing else without_mask  # packed even where packing would not shrink it
    pairs = [tuple(to_device(form(random_batch(args.batch, length, vocab, gen)), args.device) for _ in "ah")
             for length in ((args.length, args.length // 2) if packing else [args.length] * args.steps)]
    # per length: 2 warm-up steps, the capture, a replay; then the second length's, then both replayed in turn
    order = [0] * 4 + [1] * 4 + [0, 1] if packing else range(args.steps)
    outs = [(b_g.step(*pairs[i]), b_e.step(*pairs[i])) for i in order]
    errors = [((p - q).norm() / q.norm()).item() for (_, p), (_, q) in zip(m_g.named_parameters(),
                                                                          m_e.named_parameters()) if p.requires_grad]
    worst = max(errors) if all(math.isfinite(e) for e in errors) else float("nan")  # max() would drop a NaN
    losses = [abs(og[k].item() - oe[k].item()) / max(abs(oe[k].item()), 1e-12)
              for og, oe in outs for k in ("loss", "harmful_loss")]
    graphs = b_g.engine.graphs
    return {"steps": len(outs), "packed": packing, "worst_relative_l2": worst,
            "worst_loss_relative": max(losses) if all(math.isfinite(x) for x in losses) else float("nan"),
            "loss_graph": outs[-1][0]["loss"].item(), "loss_eager": outs[-1][1]["loss"].item(),
            "captured": bool(graphs and graphs._graphs), "replays": graphs.replays if graphs else 0,
            "pool_warmups": getattr(graphs, "pool_warmups", 0), "fallback": graphs.fallback if graphs else None}


def _free_device_memory():
    gc.collect()  # FlatLoRA and the patched LoRA layers reference each other: only the collector frees a model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cmd_equivalence(args):
    results, default = {}, step_graphs.POOL_WARMUP
    names = args.models.split(",")
    # the experimental warm-up in the graphs' pool last: a CUDA error it leaves (sticky, for the whole process)
    # must not cost the other runs theirs
    runs = [(n, packing, False) for n in names for packing in (False, True)] + [(n, True, True) for n in names]
    try:
        for name, packing, in_pool in runs:
            label = f"{name}{' packed' if packing else ''}{', warm-up in the pool' if in_pool else ''}"
            step_graphs.POOL_WARMUP = in_pool  # read when the engine builds its StepGraphs
            try:
                results[label] = _equivalence(name, packing, args)
            except Exception as e:  # noqa: BLE001 - one model's failure (e.g. graphs='on' refusing) is a result
                if isinstance(e, CaptureInvalidated):  # but CUDA memory is suspect after this one: stop here
                    write(args.out, "graph_equivalence.json", {"machine": machine(), "results": results})
                    raise
                results[label] = {"steps": args.steps, "worst_relative_l2": None, "captured": False,
                                  "fallback": described(e)}
            _free_device_memory()
            # after each run: a part stopped by its time limit keeps what it has measured
            write(args.out, "graph_equivalence.json", {"machine": machine(), "results": results})
    finally:
        step_graphs.POOL_WARMUP = default


def _profile_one(args, impl, graphs, gen):
    """(summary, profiler table) of a few steps of one implementation. On CUDA the time is the kernels' (device
    rows only: a CPU op's row repeats its kernels' time as its own "self device" time, and user annotations span
    kernels too, so counting those would count the eager steps' GPU time twice); on the CPU, CPU op rows."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    busy = (lambda e: getattr(e, "self_device_time_total", 0)) if cuda else (lambda e: e.self_cpu_time_total)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    model, tok = bf.load_model(args.model, quant=args.quant, seed=0, device=args.device)
    torch.manual_seed(0)
    model = bf.add_lora(model)
    booster = bf.Booster(model, bf.BoosterConfig(impl=impl, graphs=graphs, merge_passes=True))
    vocab = model.config.vocab_size
    # as Booster.to_device prepares them (fast: packed; the reference: with the mask, padded to the longest row),
    # as in the bench. The timed steps repeat the warm-up pair: a packed step replays the graph of its own length.
    pair = tuple(booster.to_device(random_batch(args.batch, args.length, vocab, gen), args.device) for _ in "ah")
    batches = [pair] * (args.steps + 3)
    for a, h in batches[:3]:
        booster.step(a, h)  # warm-up (and capture)
    sync()
    # on CUDA only the device rows are used: without CPU activity the profiler records ~10x fewer events
    # and adds little host time to the wall time the idle share is taken from
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for a, h in batches[3:]:
            booster.step(a, h)
        sync()  # host sync: timing only
        wall_us = (time.perf_counter() - t0) * 1e6
    averages = prof.key_averages()
    rows = [e for e in averages if (e.device_type != DeviceType.CPU or not cuda)
            and not getattr(e, "is_user_annotation", False)]
    busy_us = sum(busy(e) for e in rows)
    if cuda and busy_us == 0:  # no kernel came back: not a GPU idle 100 % of the time
        raise RuntimeError("the profiler recorded no CUDA kernel")
    table = averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15)
    top = sorted(rows, key=busy, reverse=True)[:15]
    return {"wall_ms_per_step": wall_us / 1e3 / args.steps,
            "gpu_busy_ms_per_step": busy_us / 1e3 / args.steps if cuda else None,
            "gpu_idle_share": max(0.0, 1 - busy_us / wall_us) if cuda else None,
            "top_kernels": [{"name": e.key[:120], "ms_per_step": busy(e) / 1e3 / args.steps,
                             "calls_per_step": e.count / args.steps} for e in top]}, table


def cmd_profile(args):
    """Reference vs fast+graphs under torch.profiler (see _profile_one). `--device cpu` is a smoke test of this
    code: CPU op rows and CPU time, graphs off."""
    docs, tables = {}, []
    if args.device == "cuda":  # the profiler sees the kernels of CUDA graphs captured before it first ran only
        # after this call (PyTorch PR 100441); a private helper, so its absence is tolerated
        init = getattr(getattr(torch.profiler, "_utils", None), "_init_for_cuda_graphs", None)
        if init is not None:
            init()
    for impl, graphs in (("reference", "off"), ("fast", "on" if args.device == "cuda" else "off")):
        label = f"{impl}{'+graphs' if graphs == 'on' else ''}"
        try:
            # a generator seeded alike for each: both profile the same pair of batches
            docs[label], table = _profile_one(args, impl, graphs, torch.Generator().manual_seed(0))
            tables.append(f"## {label} on {args.model} ({args.quant}), {args.steps} steps\n{table}\n")
        except Exception as e:  # noqa: BLE001 - recorded: the other implementation's table still comes back
            docs[label] = {"error": described(e)}
            print(f"profile {label} failed: {docs[label]['error']}", file=sys.stderr)
        _free_device_memory()
        # after each implementation: a part stopped by its time limit keeps what it has measured
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile_{args.model}.txt"), "w") as f:
            f.write("\n".join(tables))
        write(args.out, f"profile_{args.model}.json", {"machine": machine(), "model": args.model,
                                                       "quant": args.quant, "device": args.device,
                                                       "batch": [args.batch, args.length], "results": docs})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    bw = sub.add_parser("bandwidth")
    bw.add_argument("--numel", type=int, default=2**27)
    eq = sub.add_parser("equivalence")
    eq.add_argument("--models", default="tiny,llama-1b-shape")
    eq.add_argument("--steps", type=int, default=5)
    eq.add_argument("--batch", type=int, default=4)
    eq.add_argument("--length", type=int, default=128)
    eq.add_argument("--device", default="cuda")
    pr = sub.add_parser("profile")
    pr.add_argument("--model", default="llama-7b-shape")
    pr.add_argument("--quant", default="none")
    pr.add_argument("--batch", type=int, default=10)
    pr.add_argument("--length", type=int, default=256)
    pr.add_argument("--steps", type=int, default=3)
    pr.add_argument("--device", default="cuda")
    sw = sub.add_parser("sweep")
    sw.add_argument("--numel", type=int, default=2**27)
    sw.add_argument("--blocks", type=_ints, default=(1024, 2048, 4096, 8192))
    sw.add_argument("--warps", type=_ints, default=(4, 8))
    for s in (bw, eq, pr, sw):
        s.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = p.parse_args(argv)
    if getattr(args, "device", "cuda") == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"gpu_checks {args.cmd}: needs a CUDA device")
    {"bandwidth": cmd_bandwidth, "equivalence": cmd_equivalence, "profile": cmd_profile,
     "sweep": cmd_sweep}[args.cmd](args)


def _ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers (argparse type)."""
    return tuple(int(x) for x in text.split(","))


if __name__ == "__main__":
    main()
