"""`booster-fast bench`: reference vs fast Booster steps (and plain SFT), side by side in one process.

Method. Every implementation gets its own copy of the model, built the same way (same preset or checkpoint,
`load_model(..., seed)`, then `torch.manual_seed(seed)` + `add_lora`); the initial LoRA weights are checked
equal across implementations before the first step. All of them are fed the SAME batches, generated once and
already on the device: the built-in data set for `tiny`, random right-padded token batches otherwise. They run
interleaved step by step (A B C, B C A, C A B, ...: one step each per round, the first one rotating), so that
drift of the machine (clock boost, heat, other load) spreads over every implementation instead of biasing one.
The first `--warmup` rounds are not timed. A step's time is host wall time (time.perf_counter) around one
update; on CUDA a torch.cuda.synchronize() on both sides makes it the device time of the whole update.
We report the median and the 20th/80th percentiles. Every model stays resident; their frozen unquantised base
weights (identical by construction, checked) are one shared copy, so four entries of a 7B bf16 model hold one
13 GB base instead of four; NF4 ones share their packed weights and quantisation statistics too.

Entries: reference; fast (follows --merge-passes, --packing, --fused-ops and --graphs, default auto); fast-merged /
fast-unmerged (merge pinned, eager); fast-graphs (graphs='on', CUDA only: recorded as skipped, with the reason,
when there is no CUDA device or the step is not captured); sft (the reference engine's plain SFT step: torch AdamW
and clipping as the HF Trainer does them); fast-sft (the fast engine's SFT step, with fast's settings).
ratio_to_sft is a Booster entry's step time over the SFT step of its own engine (`sft_baseline` names it): the
reference against sft, a fast entry against fast-sft where the two engines pack, fuse the model ops and capture
CUDA graphs alike, else against sft.
Entries that use CUDA graphs get extra untimed steps until their step is captured, so no capture lands in the
timing; `cuda_graphs` says which replay.
Each entry gets the batches in the form its engine runs: fast entries as `Booster.to_device` prepares them
(without the attention mask, or packed without pads when the engine packs: packing.py), the reference and sft
with the mask and padded to the longest row, as the original trainer's collator makes them. fast-padded pins
packing off, to show what packing buys, and fast-unfused the fused RMSNorm/SwiGLU/RoPE kernels (fused_ops.py),
to show what they buy. config.packed_attention names the kernels packed batches ran (flash's variable-length
kernel, or the segment grid and why not flash: the first flash failure in a process turns it off for the rest).

Tokens. tokens_per_s counts the real (non-pad) tokens of the batches a step consumes: alignment + harmful rows
for a Booster step (the harmful batch counted once, although the step runs it twice), the alignment rows for
SFT. mfu (CUDA only) is model FLOPs utilisation: the FLOPs the method needs (`method_flops`: the real tokens of
every pass through the body, the labelled positions through the LM head), the same for every Booster entry, over
step time and the GPU's peak, so mfu ratios are speed ratios. hfu counts instead the positions each entry
computes (`model_flops`: pads, packing filler and the LM head on unlabelled positions included): how busy the
entry keeps the GPU, useful work or not.

Peak memory (peak_mem_mb): what one implementation would need alone in a process (bench_measure.py says how
it is measured on CUDA and on the CPU); est_peak_mb beside it is memory.py's estimate from the model's shape,
the one `booster-fast memory` prints and align checks before its first step.

Agreement. Every entry starts from the same weights and gets the same rows, so its first step's outputs (losses,
harmful gradient norm: `first_step`) must match its baseline's (the reference's; sft's for fast-sft) up to
rounding. `first_step_rel_diff` is the largest relative difference; beyond FIRST_STEP_RTOL the entry is flagged
(`first_step_agrees` false, in the tables too) and the bench exits 1: a gross-error check on the machine where
the speed is measured, not the tests' equivalence. Entries that capture CUDA graphs take untimed steps to capture
them and are then rewound (their weights restored and their optimizer state zeroed, in place), so their first
step, a graph replay, is checked the same way.

ops_per_step: aten ops dispatched by one more step (booster_fast.opcount); launches_per_step: those of them
that launch a kernel on a GPU (views, other metadata ops and bare allocations left out), plus the package's
Triton kernels (launched past the dispatcher, counted at their launch sites): what a step pays in
launches without CUDA graphs (for a graph replay, only the host-side ops: input copies and output clone); for
fast entries also the bookkeeping part (everything outside the model passes). host_syncs_per_step: the ops that
read a device value back to the host (a sync on a GPU; counted on the CPU too; a non-fused optimizer's step
counters, which stay on the host, are left out).

The document is written after the timing and again after each entry's memory and op-count pass; `complete` is
false until the last write, so a run stopped by a time limit leaves a file that says it is partial (one killed
before the timing ends leaves --output as it was, as an atomic write does). An entry that fails keeps what was
measured of it before, with `failed` saying where it failed. A CUDA graph capture that CUDA invalidated leaves
the process's GPU memory suspect: the bench then writes what it has and exits 3 (benchmarks/gpu_suite.sh reruns
such a part without fast-graphs, in a new process).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time

import torch

from . import attention
from .batches import tokens
from .errors import described, reason
from .bench_measure import (FIRST_STEP_RTOL, SFT, first_step_agreement, graph_pool_bytes, graphs_captured,
                            held_bytes, matmul_params, matmul_tflops, method_flops, micro, model_flops, pass_batches,
                            peak_tflops, rewind, sync, trainable_snapshot, transient_bytes)
from .atomic import check_writable_file, write_json_atomic
from .bench_entries import check_knobs_followed, impl_config, parse_impls, sft_baselines, sft_modes
from .bench_data import MIN_RANDOM_LENGTH, RANDOM, data_source, entry_batches, load_rows, make_batches
from .bench_report import format_table, machine_info, plot, run_config
from .cli import UsageError
from .config import BoosterConfig
from .data import DataError
from .models import ModelError, check_rope_length, length_dependent_rope
from .graphs import CaptureInvalidated
from .nf4 import quant_state_tensors
from .run_args import check_common_args, check_device_flags, resolve_device

log = logging.getLogger("booster_fast")
GRAPHS_NOT_CAPTURED = "the step was not captured into a CUDA graph after the warm-up steps"


# ---- implementations and batches -------------------------------------------------------------------------
def build_impl(name: str, args, device):
    """(Booster, tokenizer, initial LoRA weights on the CPU), built from scratch with the bench seed."""
    from . import Booster, add_lora, load_model
    from .compute import enable_gradient_checkpointing
    from .lora import trainable_parameters
    from .models import check_positions

    cfg = impl_config(name, args)
    model, tok = load_model(args.model, quant=args.quant, seed=args.seed, device=device,
                            dtype=getattr(args, "dtype", None),
                            trust_remote_code=getattr(args, "trust_remote_code", False))
    beyond = check_positions(model, args.max_length)
    if beyond:
        log.warning(beyond)
    if getattr(args, "gradient_checkpointing", False):
        # non-reentrant (before add_lora): needs no enable_input_require_grads(), it recomputes under autograd
        enable_gradient_checkpointing(model)
    torch.manual_seed(args.seed)
    model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=args.targets)  # (add_lora splits it)
    lora0 = {n: p.detach().cpu().clone() for n, p in trainable_parameters(model)}
    return Booster(model, cfg), tok, lora0


def share_frozen_weights(src, dst) -> int:
    """Point dst's frozen parameters at src's equal ones (same name, shape, dtype; checked on the device), the
    NF4 ones with their quantisation statistics; returns the bytes freed. LoRA parameters keep their own storage.
    With one resident base, three entries of a 4-bit 70B shape fit on one 141 GB GPU."""
    theirs, freed = dict(src.named_parameters()), 0
    for name, p in dst.named_parameters():
        q = theirs.get(name)
        if p.requires_grad or q is None or type(q) is not type(p) or not isinstance(p, torch.nn.Parameter):
            continue
        if q.shape != p.shape or q.dtype != p.dtype or q.device != p.device or q.data_ptr() == p.data_ptr():
            continue
        mine, other = [p, *quant_state_tensors(p)], [q, *quant_state_tensors(q)]
        if type(p) is not torch.nn.Parameter and len(mine) == 1:
            continue  # a parameter subclass this function does not know: leave it alone
        if len(mine) != len(other) or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, other)):
            raise AssertionError(f"frozen weight {name} differs between entries built from the same seed")  # synced
        freed += sum(t.untyped_storage().nbytes() for t in mine)
        p.data = q.data
        if hasattr(q, "quant_state"):
            p.quant_state = q.quant_state
            if getattr(getattr(p, "module", None), "quant_state", None) is not None:  # bitsandbytes' back link
                p.module.quant_state = q.quant_state
    return freed


def _estimated_mb(name: str, booster, args) -> float | None:
    """memory.py's estimate of the entry's peak (MB), beside the measured peak_mem_mb: the GPU suite checks it.
    Both are of the steady state, graphs replayed: the estimate's eager warm-up of a new packed length beside the
    graphs' pool is left out, as warm_graphs captures every length before anything is measured."""
    from .memory import of_booster

    try:
        est = of_booster(booster, args.batch_size, args.harmful_batch_size, args.max_length,
                         "sft" if name in SFT else "booster", graph_warmup=False)
    except Exception as e:  # noqa: BLE001 - an estimate must not cost the entry its measurements
        log.warning("bench: no memory estimate for %s (%s)", name, e)
        return None
    return None if est is None else round(est.total / 2**20, 1)


def warm_graphs(name: str, booster, fn, pairs, tries: int = 4) -> str | None:
    """Extra untimed steps until a graph-using entry has captured the step for every batch shape it will meet
    (one for padded batches, a few bucketed lengths for packed ones), so that no capture lands in the timing.
    Returns why fast-graphs cannot be timed, else None (graphs='auto' may fall back to eager: that is timed)."""
    graphs = getattr(booster.engine, "graphs", None)
    from .graphs import batch_signature

    shapes = {tuple(batch_signature(b) for b in p): p for p in pairs} if graphs is not None else {}
    try:
        for pair in shapes.values():
            for _ in range(tries):  # until a step of this shape is a replay, or it is known to run eagerly
                replays, eager = graphs.replays, len(getattr(graphs, "eager_keys", ()))
                if getattr(graphs, "disabled", None):
                    break
                fn(*pair)
                if graphs.replays > replays or len(getattr(graphs, "eager_keys", ())) > eager:
                    break
    except Exception as e:  # noqa: BLE001 - graphs='on' raises when the capture fails: reported, not fatal
        if name != "fast-graphs" or isinstance(e, CaptureInvalidated):  # the latter: CUDA memory is suspect
            raise
        return "not captured: " + reason(e)
    return GRAPHS_NOT_CAPTURED if name == "fast-graphs" and not graphs_captured(booster.engine) else None


def phase(what: str) -> None:
    """One log line on the bench's progress where no bar is drawn (stderr kept in a file, as the GPU suite keeps
    each part's): a part stopped by its time limit then shows where it was."""
    from .progress import shown

    if not shown():
        log.info("bench: %s", what)


def step_fn(name: str, booster):
    """fn(align_batch, harmful_batch) running one update of this entry."""
    if name in SFT:
        return lambda a, h: booster.sft_step(a)
    return booster.step


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


# ---- the run ---------------------------------------------------------------------------------------------
def check_bench_args(args) -> list[str]:
    check_common_args(args)
    random_rows = data_source(args) == RANDOM
    if random_rows and args.max_length < MIN_RANDOM_LENGTH:
        raise UsageError(f"--max-length {args.max_length}: bench's random rows need at least {MIN_RANDOM_LENGTH} "
                         f"tokens (a prompt and a labelled answer)")
    if random_rows and getattr(args, "harmful_data", None):
        raise UsageError(f"--harmful-data {args.harmful_data} needs a --data set: the random rows have no harmful "
                         f"set of their own to replace")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    names = parse_impls(args.impls)
    check_knobs_followed(names, args)
    for name in names:
        impl_config(name, args)  # bad knob values fail here, in one line
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'booster-fast[plot]'") from None
    if not getattr(args, "perturb_aware", False) and getattr(args, "rho", BoosterConfig.rho) != BoosterConfig.rho:
        raise UsageError(f"--rho {args.rho} does nothing without --perturb-aware")
    output, plot_to = getattr(args, "output", None), getattr(args, "plot", None)
    if output and plot_to and os.path.realpath(output) == os.path.realpath(plot_to):
        raise UsageError(f"--output and --plot name the same file: {output}")
    for flag in ("output", "plot"):  # before the timing, not after it ('' is refused, not taken for no file)
        if getattr(args, flag, None) is not None:
            check_writable_file(getattr(args, flag), f"--{flag}")
    return names


def _failed(results, name, stage, e):
    """Record that entry `name` failed (one log line; run_bench then exits 1), keeping what was measured of it
    before (its step times when the memory pass fails): on a borrowed GPU, one broken entry must not cost the
    others' numbers, nor its own timing."""
    results[name] = {**results.get(name, {}), "failed": f"{stage}: {described(e)}"}
    log.error("bench: %s failed while %s", name, results[name]["failed"])


def build_all(names, args, device, results, rows=None, announce=lambda entries: None):
    """Build every entry from identical initial weights; returns (impls, batches, matmul params, LoRA params).
    `rows`: the data set's rows (bench_data.load_rows), if already parsed. `announce(names)`, with the entries
    it will build, is called once the first is built and checked, before the others: bad input has failed by
    then, its error the only line."""
    impls, first = {}, None  # name -> (booster, step function, its batches)
    to_build = [n for n in names if n != "fast-graphs" or device.type == "cuda"]
    for name in names:
        if name not in to_build:
            results[name] = {"skipped": "CUDA graphs need a CUDA device"}
            continue
        try:
            t0 = time.perf_counter()
            booster, tok, lora0 = build_impl(name, args, device)
            took = time.perf_counter() - t0
            if first is None and any(impl_config(n, args).impl == "fast" for n in names):
                # the fast entries' check_length, once, at the first entry (all share the model): bad input ends
                # the bench before any entry is timed, whichever comes first
                check_rope_length(length_dependent_rope(booster.model), args.max_length,
                                  f"--max-length {args.max_length}")
        except (UsageError, DataError, ModelError):
            if first is None:  # bad input (a model or target that does not exist): one line, exit 2, nothing
                raise          # written; for a later entry (out of GPU memory, say) the others still run
            _failed(results, name, "building it", sys.exc_info()[1])
            continue
        except Exception as e:  # noqa: BLE001 -- reported in the results and the exit code, the others still run
            if name == "fast-graphs" and isinstance(e, (ValueError, RuntimeError)):
                results[name] = {"skipped": f"graphs='on' unavailable: {reason(e)}"}
            else:
                _failed(results, name, "building it", e)
            continue
        if first is None:
            announce(to_build)
            first, first_name, batches = lora0, name, make_batches(args, tok, booster.model, rows)
            sizes = matmul_params(booster.model), sum(v.numel() for v in lora0.values())
            base = booster.model
        else:
            share_frozen_weights(base, booster.model)
        phase(f"built {name} in {took:.1f} s")
        assert first.keys() == lora0.keys() and all(torch.equal(first[k], lora0[k]) for k in first), \
            f"{name}: initial LoRA weights differ from {first_name}'s"
        impls[name] = (booster, step_fn(name, booster), entry_batches(booster, batches, device))
        results[name] = {}
    return (impls, batches, *sizes) if impls else (impls, [], None, None)


def time_interleaved(impls, batches, args, device, results):
    """Per entry: the timed step times (s), tokens/s, and the outputs of its first step, which starts from the
    initial weights (an entry that stepped to capture its graphs is rewound first). One step of each per round,
    the first one rotating. Stopped (Ctrl-C, SIGTERM), the exception carries the times so far as `.timed`."""
    from .progress import progress_bar

    times, tps, first = {n: [] for n in impls}, {n: [] for n in impls}, {}

    def drop(name):  # the entry leaves the timing; the caller records why
        del impls[name], times[name], tps[name]

    # graphs capture lazily: get that done untimed, before the warm-up rounds (a capture empties torch's allocator
    # cache, which the eager entries then refill during the warm-up, not in a timed step)
    for name in list(impls):
        booster, fn, mine = impls[name]
        t0 = time.perf_counter()
        graphs = getattr(booster.engine, "graphs", None) is not None
        start = trainable_snapshot(booster) if graphs else None
        try:  # the first round's shapes, the timed rounds' and the two after
            why = warm_graphs(name, booster, fn, mine[:1] + mine[args.warmup:])
        except CaptureInvalidated as e:
            _failed(results, name, "capturing its step", e)
            raise
        if graphs:
            rewind(booster, start)  # its first timed step then starts where the other entries' do
            start = None  # (the copy's memory back before the timing)
            phase(f"{name}: CUDA graphs warmed up and captured in {time.perf_counter() - t0:.1f} s"
                  + (f" ({why})" if why else ""))
        if why:
            drop(name)
            results[name] = {"skipped": why}
    if not impls:  # every entry was skipped (fast-graphs alone, where CUDA graphs cannot be captured)
        return times, tps, first

    bar, started = progress_bar((args.warmup + args.steps) * len(impls), "bench"), time.perf_counter()
    try:
        for i in range(args.warmup + args.steps):
            _, _, na, nh = batches[i]
            order = list(impls)[i % len(impls):] + list(impls)[:i % len(impls)] if impls else []
            for name in order:
                sync(device)
                t0 = time.perf_counter()
                try:
                    out = impls[name][1](*impls[name][2][i])
                except Exception as e:  # noqa: BLE001
                    drop(name)
                    if isinstance(e, CaptureInvalidated):  # nothing measured after it in this process is trusted
                        _failed(results, name, f"step {i}", e)
                        raise
                    if name == "fast-graphs":  # graphs='on' raises when capture is impossible: skipped, not failed
                        results[name] = {"skipped": "not captured: " + reason(e)}
                    else:
                        _failed(results, name, f"step {i}", e)
                    continue
                sync(device)
                dt = time.perf_counter() - t0
                if i == 0:
                    # device tensors, read after the timing (cloned: an engine may reuse an output's buffer)
                    first[name] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}
                if i >= args.warmup:
                    times[name].append(dt)
                    tps[name].append((na if name in SFT else na + nh) / dt)
                bar.update(1)
            if i + 1 in (args.warmup, args.warmup + args.steps):
                kind, n = ("warm-up", args.warmup) if i + 1 == args.warmup else ("timed", args.steps)
                phase(f"{n} {kind} round{'s' * (n != 1)} of {len(impls)} entries done, "
                      f"{time.perf_counter() - started:.1f} s in all")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM at a time limit: the caller keeps the steps timed so far
        e.timed = times, tps
        raise
    finally:
        bar.close()
    return times, tps, first


def record_times(results: dict, times: dict, tps: dict) -> None:
    """Each entry's median step time, its 20th and 80th percentiles and its tokens/s into `results` (an entry
    stopped before its first timed step gets none; `timed_steps` says over how many steps)."""
    for name, ts in times.items():
        if ts:
            results[name] = {"step_ms": round(statistics.median(ts) * 1e3, 3),
                             "step_ms_p20": round(_pct(ts, 20) * 1e3, 3), "step_ms_p80": round(_pct(ts, 80) * 1e3, 3),
                             "tokens_per_s": round(statistics.median(tps[name]), 1), "timed_steps": len(ts)}


def run_bench(args) -> int:
    from .opcount import count_ops, host_resident_scalars

    names = check_bench_args(args)
    device = resolve_device(args.device)
    check_device_flags(args, device)
    if device.type != "cuda" and set(names) == {"fast-graphs"}:
        raise UsageError("--impls fast-graphs: CUDA graphs need a CUDA device; nothing would be measured here")
    rows = load_rows(args)  # bad data fails here, before a model is loaded
    results: dict[str, dict] = {}
    kernels_before = attention.packed_kernel_calls.copy()  # what packed attention runs, counted from here

    def announce(entries):  # what is timed, once the first entry is built (the others' builds and failures follow it)
        log.info("bench: %s on %s, %s: %d warm-up and %d timed steps each, %d+%d rows x %d tokens (%s rows)",
                 args.model, device, ", ".join(entries), args.warmup, args.steps, args.batch_size,
                 args.harmful_batch_size, args.max_length, data_source(args))

    impls, batches, n_params, n_lora = build_all(names, args, device, results, rows, announce)
    modes = sft_modes(impls)
    rate, peak = None, (None, None)  # the GPU's matmul rate, measured after the timing

    def publish(complete=False):  # the document so far, to --output: a part stopped by a time limit keeps
        # what it measured, marked incomplete
        ref = results.get("reference", {}).get("step_ms")
        for n, r in results.items():
            if "step_ms" in r and n not in SFT:
                base = next((b for b in sft_baselines(n, modes) if "step_ms" in results.get(b, {})), None)
                r["ratio_to_sft"] = round(r["step_ms"] / results[base]["step_ms"], 3) if base else None
                r["sft_baseline"] = base
        speedup = {n: round(ref / r["step_ms"], 3) if ref and "step_ms" in r and n not in SFT else None
                   for n, r in results.items()}  # of Booster steps: an SFT step is another update
        ran = attention.packed_kernel_calls - kernels_before
        doc = {"machine": machine_info(device),
               "config": run_config(args, names, device, n_params, n_lora, rate, peak) | {
                   "packed_attention": sorted(ran) or None},  # every kernel packed batches ran, or None
               "results": results, "speedup": speedup, "complete": complete}
        if getattr(args, "output", None):
            write_json_atomic(args.output, doc)  # a full disk: one line, exit 1
        return doc

    try:
        try:
            times, tps, first = time_interleaved(impls, batches, args, device, results)
        except KeyboardInterrupt as e:  # stopped (a time limit's SIGTERM): the steps timed so far, marked incomplete
            record_times(results, *getattr(e, "timed", ({}, {})))  # (none when stopped in a graph capture)
            publish()
            raise
        record_times(results, times, tps)
        # ---- the times first; then separate passes, one step each for memory and for the op count ----
        rate = matmul_tflops(device) if device.type == "cuda" and impls else None
        peak = peak_tflops(device, rate) if rate else (None, None)
        for name, check in first_step_agreement(first).items():
            if name in impls:
                results[name].update(check)
        publish()
        phase("next: each entry's peak memory and op count, one step each")
        raw = batches[args.warmup:args.warmup + args.steps]  # the timed batches as collated: mfu's numerator
        for name, (booster, fn, mine) in impls.items():
            timed = mine[args.warmup:args.warmup + args.steps]
            try:
                transient = transient_bytes(lambda: fn(*mine[-2]), device)
                ops = count_ops(fn, *mine[-1], host_resident=host_resident_scalars(booster.optimizer))
                held = held_bytes(booster) + graph_pool_bytes(booster.engine) + max(transient, 0)
                mfu = hfu = None
                if rate:
                    per_s = 1e3 / results[name]["step_ms"] / (peak[0] * 1e12)
                    mfu = round(statistics.mean(method_flops(name, args, n_params, b[:2]) for b in raw) * per_s, 4)
                    hfu = round(statistics.mean(model_flops(name, args, n_params, p) for p in timed) * per_s, 4)
            except Exception as e:  # noqa: BLE001
                _failed(results, name, "measuring memory and ops", e)
                if isinstance(e, CaptureInvalidated):
                    raise
                publish()
                continue
            graphs = getattr(booster.engine, "graphs", None)
            results[name].update({
                "peak_mem_mb": round(held / 2**20, 1), "est_peak_mb": _estimated_mb(name, booster, args),
                "ops_per_step": ops["total"],
                "launches_per_step": ops["launches"],
                "bookkeeping_ops": ops["bookkeeping"] if name.startswith("fast") else None,
                "host_syncs_per_step": sum(ops["host_syncs"].values()),
                "cuda_graphs": graphs_captured(booster.engine),
                "graphs_fallback": getattr(graphs, "fallback", None),
                "packed_share": round(statistics.mean("cu_seqlens" in m for p in timed for b in p
                                                      for m in micro(b)), 3),
                "positions_per_step": round(statistics.mean(sum(map(tokens, pass_batches(name, args, p)))
                                                            for p in timed)),
                "mfu": mfu, "hfu": hfu})
            publish()
    except CaptureInvalidated as e:  # CUDA memory is suspect: nothing more is measured in this process
        publish()
        kept = f"; what was measured before is in {args.output}" if getattr(args, "output", None) else ""
        print(f"booster-fast: error: bench stopped: {reason(e)}{kept}", file=sys.stderr)
        return 3
    doc = publish(complete=True)
    print(format_table(doc), file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the document alone
    off = [n for n, r in results.items() if r.get("first_step_agrees") is False]
    if off:
        print(f"booster-fast: error: the first step of {', '.join(off)} is more than {FIRST_STEP_RTOL:.0%} off its "
              "baseline's (first_step in the document): it computes something else", file=sys.stderr)
    if getattr(args, "plot", None):
        plot(doc, args.plot)
    if args.json:
        print(json.dumps(doc))
    return 1 if off or any("failed" in r for r in results.values()) else 0
