"""The bench's measurements: memory an implementation holds and needs (peak_mem_mb), the FLOPs of a step with
the matmul rate they are divided by (mfu: the FLOPs the method needs; hfu: those the entry computes), and how far
an entry's first step lies from its baseline's (first_step_agreement; `rewind` puts an entry that stepped to
capture its CUDA graphs back at the start first).

Peak memory (peak_mem_mb) estimates what one implementation would need alone in a process: the bytes it holds
between steps (model, LoRA weights, gradient buffers, optimizer state; counted tensor by tensor, storages
deduplicated; bitsandbytes' quantisation statistics included), plus the private memory pool of its
captured CUDA graphs, plus the transient peak of one extra step, measured in a separate pass after the timing.
On CUDA the transient is max_memory_allocated - memory_allocated around the step (exact at the allocator
level). On the CPU there are no allocator statistics: a thread samples glibc's heap-in-use figure (mallinfo2)
every 0.5 ms during the step and reports the rise. That misses peaks shorter than a sample and counts any other
thread's allocations; without glibc it falls back to the growth of the RSS high-water mark, which understates
the transient of a step that reuses pages an earlier step freed.
"""
from __future__ import annotations

import ctypes
import logging
import math
import resource
import threading
import time

import torch

from .batches import tokens
from .memory import storage_bytes
from .nf4 import quant_state_tensors

log = logging.getLogger("booster_fast")
SFT = ("sft", "fast-sft")  # the bench entries that time the plain SFT step
# How far an entry's first-step outputs (losses, harmful gradient norm) may lie from its baseline's before the
# bench flags the entry: a check for gross errors (a fused kernel that computes something else), not the tests'
# equivalence. bf16 steps with other kernels (flash attention, fused norms) differ by ~1e-2 at most; fp32 ~1e-6.
FIRST_STEP_RTOL = 0.05
FIRST_STEP_OUTPUTS = ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm", "loss_perturbed")
FLOPS_PER_POSITION = ("4N per position and pass: 2N forward + 2N backward to the activations (the base is frozen, "
                      "so no weight gradient; a checkpointed layer's recompute is not counted, as MFU has it); N = "
                      "base matmul parameters (LM head in, input embedding and LoRA out); attention-score FLOPs "
                      "ignored; divided by the GPU's dense bf16 peak (mfu_peak_tflops)")
MFU_FLOPS = ("the FLOPs the method needs, the same for every Booster entry: the real (non-pad) tokens of every pass "
             "through the body, the labelled positions through the LM head; " + FLOPS_PER_POSITION)
HFU_FLOPS = ("the FLOPs the entry computes: every position of every pass (pads and packing filler included) "
             "through the body, the LM head at the positions it runs on (all of a padded batch's, a packed batch's "
             "labelled ones); " + FLOPS_PER_POSITION)
# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; other GPUs: the measured
# 8192^3 matmul rate stands in (run_config says which)
# (the first name the device's contains wins: the PCIe and NVL cards before their SXM namesakes)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H800 PCIe", 756.0), ("H100 NVL", 835.5), ("H200 NVL", 835.5),
                    ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0), ("L40S", 362.1))


def peak_tflops(device, measured: float) -> tuple[float, str]:
    """(the mfu denominator in TFLOP/s, where it comes from) for this CUDA device."""
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name}: data-sheet dense bf16 peak"
    return measured, f"{name}: no data-sheet peak known here, the measured bf16 matmul rate instead"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a host sync for timing only, outside the step


def held_bytes(booster) -> int:
    """Bytes of every tensor an implementation keeps between steps (storages counted once)."""
    model, eng = booster.model, booster.engine
    ts = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
    ts += [v for st in booster.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    for obj in (eng, getattr(eng, "flat", None)):
        ts += [v for v in vars(obj).values() if torch.is_tensor(v)] if obj is not None else []
    ts += [t for p in model.parameters() for t in quant_state_tensors(p)]
    return storage_bytes(ts)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def cpu_gauge():
    """(description, bytes()) of the CPU memory gauge: glibc's heap in use (freed blocks excluded, so a step that
    reuses memory freed by an earlier one still shows its peak), else the RSS high-water mark."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
        mallinfo2.restype = _MallInfo2
        return "heap in use (glibc mallinfo2)", lambda: (lambda m: m.uordblks + m.hblkhd)(mallinfo2())
    except (OSError, AttributeError):
        return "RSS high-water mark (getrusage)", lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def transient_bytes(fn, device) -> int:
    """Memory one call of fn needs above what is allocated before it (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    gauge = cpu_gauge()[1]
    samples, done = [gauge()], threading.Event()

    def sample():  # torch ops release the GIL, so this thread samples while the step runs
        while not done.is_set():
            samples.append(gauge())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(max(samples), gauge()) - samples[0]


def matmul_tflops(device) -> float:
    """bf16 8192^3 torch.matmul rate in TFLOP/s (what the GPU reaches on one large GEMM; the mfu denominator
    where no data-sheet peak is known)."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * 8192**3 * reps / (time.perf_counter() - t0) / 1e12


def matmul_params(model) -> tuple[int, int]:
    """Parameters of the base model's matmuls: every nn.Linear (NF4 included) outside the LoRA adapters; and of
    those, the LM head's."""
    total = sum(m.in_features * m.out_features for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".lora_" not in n)
    head = model.get_output_embeddings()
    return total, head.in_features * head.out_features if isinstance(head, torch.nn.Linear) else 0


def micro(batch) -> list[dict]:
    """The micro-batches of one step argument: a list of them (packed ones under gradient accumulation), or one."""
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]


def pass_batches(name: str, args, pair) -> list[dict]:
    """The (micro-)batch of every pass of one step on `pair`: alignment (twice under perturb_aware: at w, then
    perturbed), then the harmful one once or twice."""
    align, harmful = (micro(b) for b in pair)
    if name in SFT:
        return align
    return align * (2 if getattr(args, "perturb_aware", False) else 1) + harmful * (1 if args.no_meta_term else 2)


def method_flops(name: str, args, params: tuple[int, int], pair) -> float:
    """The FLOPs the method needs for one step on `pair`, the collated CPU batches (MFU_FLOPS): 4N x the real
    tokens of every pass, the LM head's share only over the labelled positions (after the causal shift)."""
    n, head = params
    return 4.0 * sum((n - head) * int(b["attention_mask"].sum()) + head * int((b["labels"][:, 1:] != -100).sum())
                     for b in pass_batches(name, args, pair))


def model_flops(name: str, args, params: tuple[int, int], pair) -> float:
    """The FLOPs one step on `pair`, an entry's device batches, computes (HFU_FLOPS): 4N x the positions of every
    pass (rows x length of a padded batch, the packed length of a packed one), the LM head's share only over the
    positions it runs on (a packed batch's kept ones)."""
    n, head = params
    return 4.0 * sum((n - head) * tokens(b) + head * (b["keep"].numel() if "keep" in b else tokens(b))
                     for b in pass_batches(name, args, pair))


# ---- the entries' CUDA graphs, and their first step against the baseline's ------------------------------
def graphs_captured(engine) -> bool:
    """True once a fast engine replays a captured CUDA graph (booster_fast.graphs.StepGraphs holds one)."""
    g = getattr(engine, "graphs", None)
    return g is not None and getattr(g, "disabled", None) is None and bool(getattr(g, "_graphs", None))


def _optimized(booster) -> list[torch.Tensor]:
    """What the optimizer trains: the fast engine's flat buffer W, the reference's LoRA tensors."""
    return [p for group in booster.optimizer.param_groups for p in group["params"]]


def trainable_snapshot(booster) -> list[torch.Tensor]:
    """Clones of what the optimizer trains, taken before an entry's first step, for `rewind`."""
    return [p.detach().clone() for p in _optimized(booster)]


def rewind(booster, snapshot: list[torch.Tensor]) -> None:
    """Put an entry back where it started: the trained tensors as `snapshot` holds them, and the optimizer's state
    as torch's AdamW makes it at its first step (moments and step count all zero; in fp32, exact). In place, so that
    the CUDA graphs captured on these tensors replay from there: the bench rewinds a graph-using entry after the
    untimed steps that captured its graphs, so that its first timed step is checked like any other."""
    for p, p0 in zip(_optimized(booster), snapshot, strict=True):
        with torch.no_grad():
            p.copy_(p0)
        for v in booster.optimizer.state.get(p, {}).values():
            if not torch.is_tensor(v):
                raise TypeError(f"cannot rewind an optimizer state entry of type {type(v).__name__}")
            v.zero_()


def graph_pool_bytes(engine) -> int:
    """Bytes reserved in the private pools of an engine's captured CUDA graphs: a replay works in that memory,
    which memory_allocated does not show."""
    if not graphs_captured(engine):
        return 0
    try:
        pools = {tuple(entry[-1].pool()) for entry in engine.graphs._graphs.values()}
        return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) in pools)
    except Exception as e:  # noqa: BLE001 - an allocator API that moved must not cost the whole benchmark
        log.warning("bench: cannot size the CUDA graph pool (%s); peak_mem_mb leaves it out", e)
        return 0


def first_step_agreement(first: dict) -> dict[str, dict]:
    """Per entry: its first step's outputs (floats), and for an entry with a baseline that ran too (sft for
    fast-sft, the reference for the other Booster entries) the largest relative difference from the baseline's
    over the outputs both have (None when infinite), and whether it is within FIRST_STEP_RTOL. All entries start
    from the same weights and get the same rows, so the outputs must agree up to rounding."""
    values = {n: {k: float(out[k]) for k in FIRST_STEP_OUTPUTS if k in out}
              for n, out in first.items()}  # .item()-like reads: host syncs, after the timing
    report = {}
    for name, mine in values.items():
        # JSON has no NaN or infinity: such a value is written as its name ("nan")
        report[name] = {"first_step": {k: round(v, 6) if math.isfinite(v) else str(v) for k, v in mine.items()}}
        base = values.get("sft" if name in SFT else "reference")
        if base is None or name in ("sft", "reference"):
            continue
        diffs = [_rel_diff(mine[k], base[k]) for k in mine.keys() & base.keys()]
        if diffs:
            rel = max(diffs)
            report[name].update(first_step_rel_diff=round(rel, 6) if math.isfinite(rel) else None,
                                first_step_agrees=rel <= FIRST_STEP_RTOL)
    return report


def _rel_diff(x: float, ref: float) -> float:
    """|x - ref| relative to |ref|. Non-finite values agree only with themselves (both NaN: an output the step
    leaves undefined, harmful_loss_perturbed without the meta term) and are infinitely far from anything else."""
    if not (math.isfinite(x) and math.isfinite(ref)):
        return 0.0 if x == ref or (math.isnan(x) and math.isnan(ref)) else math.inf
    return abs(x - ref) / max(abs(ref), 1e-6)
