"""Reporting for `booster-fast bench`: the machine and the settings a run measured (run_config), its table and plot."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

import torch

from .atomic import write_atomic
from .bench_data import data_description
from .bench_measure import HFU_FLOPS, MFU_FLOPS, cpu_gauge
from .kernels import triton_unusable


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """HEAD of the checkout the package runs from; where that is a copy without its .git (a machine the tree was
    sent to), BOOSTER_FAST_COMMIT names it (gpu_suite.sh passes it on)."""
    if os.environ.get("BOOSTER_FAST_COMMIT"):
        return os.environ["BOOSTER_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def machine_info(device) -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "triton_unusable": triton_unusable(device),  # why the fast entries ran torch paths on this GPU, or None
            **{k: _version(k) for k in ("transformers", "peft", "triton", "bitsandbytes")},
            "torch": torch.__version__, "cuda": torch.version.cuda,  # with its build tag (+cpu, +cu130)
            "python": platform.python_version(), "git_commit": _git_commit(),
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def format_table(doc: dict) -> str:
    m, c = doc["machine"], doc["config"]
    lines = [f"{c['model']} (quant {c['quant']}) on {m['gpu'] or m['cpu']} [{c['device']}], batch "
             f"{c['batch_size']}+{c['harmful_batch_size']} x {c['max_length']}, {c['steps']} steps after "
             f"{c['warmup']} warmup",
             f"{'impl':<14}{'ms/step':>10}{'p20-p80':>18}{'speedup':>9}{'tokens/s':>11}{'peak MiB':>10}"
             f"{'est. MiB':>10}{'launches':>10}{'syncs':>7}{'xSFT':>7}{'MFU':>7}{'HFU':>7}"]
    lines.append("-" * len(lines[1]))
    for name, r in doc["results"].items():
        if "skipped" in r or "step_ms" not in r:
            lines.append(f"{name:<14}" + (f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED {r['failed']}"))
            continue
        lines.append(f"{name:<14}{r['step_ms']:>10.2f}{r['step_ms_p20']:>9.2f}-{r['step_ms_p80']:<8.2f}"
                     f"{_fmt(doc['speedup'].get(name), '.2f'):>9}{r['tokens_per_s']:>11.0f}"
                     f"{_fmt(r.get('peak_mem_mb'), '.1f'):>10}{_fmt(r.get('est_peak_mb'), '.1f'):>10}"
                     f"{_fmt(r.get('launches_per_step'), 'd'):>10}{_fmt(r.get('host_syncs_per_step'), 'd'):>7}"
                     f"{_fmt(r.get('ratio_to_sft'), '.2f'):>7}{_fmt(r.get('mfu'), '.1%'):>7}"
                     f"{_fmt(r.get('hfu'), '.1%'):>7}"
                     + (f"  FAILED {r['failed']}" if "failed" in r else "")
                     + (f"  FIRST STEP OFF BY {_fmt(r['first_step_rel_diff'], '.1%', none='NaN/inf')}"
                        if r.get("first_step_agrees") is False else ""))
    lines.append("est.: memory.py's estimate; launches, syncs: per step; xSFT: the step over its engine's SFT step")
    return "\n".join(lines)


def plot(doc: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, r) for n, r in doc["results"].items() if "step_ms" in r]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.5))
    err = [[r["step_ms"] - r["step_ms_p20"] for _, r in rows], [r["step_ms_p80"] - r["step_ms"] for _, r in rows]]
    ax.bar([n for n, _ in rows], [r["step_ms"] for _, r in rows], yerr=err, capsize=4, color="tab:blue")
    ax.set_ylabel("ms / step (median, p20-p80)")
    ax.set_title(f"{doc['config']['model']} ({doc['config']['quant']}), "
                 f"{doc['machine']['gpu'] or doc['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


TOKENS_COUNTED = ("real (non-pad) tokens per step / step time: alignment + harmful rows for Booster steps "
                  "(harmful rows counted once), alignment rows for sft and fast-sft")


def run_config(args, names, device, n_params, n_lora, rate, peak=(None, None)) -> dict:
    """The document's `config`: the bench's settings and what its numbers mean."""
    knobs = ("model", "quant", "dtype", "seed", "batch_size", "harmful_batch_size", "max_length", "lora_r",
             "lora_alpha", "targets", "lr", "weight_decay", "max_grad_norm", "lamb", "alpha", "grad_accum",
             "merge_passes", "packing", "fused_ops", "graphs", "steps", "warmup")
    gauge = "CUDA max_memory_allocated" if device.type == "cuda" else cpu_gauge()[0] + " sampled every 0.5 ms"
    return {**{k: getattr(args, k) for k in knobs}, "device": str(device), "meta_term": not args.no_meta_term,
            "perturb_aware": bool(getattr(args, "perturb_aware", False)),
            "rho": getattr(args, "rho", None) if getattr(args, "perturb_aware", False) else None,
            "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)), "impls": names,
            "data": data_description(args),
            "order": "interleaved step by step, first impl rotating each round",
            "tokens_per_s_counts": TOKENS_COUNTED,
            "peak_mem_mb_means": f"held tensors + CUDA graph pools (at their reserved size: a replay owns that "
                                 f"memory) + step transient ({gauge})",
            "mfu_flops": MFU_FLOPS if rate else None, "hfu_flops": HFU_FLOPS if rate else None,
            "mfu_peak_tflops": peak[0], "mfu_peak": peak[1],
            "matmul_bf16_tflops": round(rate, 1) if rate else None,
            "matmul_params": n_params and n_params[0], "lm_head_params": n_params and n_params[1],
            "lora_params": n_lora}
