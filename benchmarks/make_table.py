"""Rebuild the README's results table from the measured files in benchmarks/results/.

    python benchmarks/make_table.py [--results benchmarks/results] [--readme README.md]

Every `*.json` there written by `booster-fast bench --json --output FILE` becomes rows of the step table; the
GPU suite's `kernel_bandwidth.json`, `kernel_sweep.json`, `graph_equivalence.json` and `profile_*.json`
(benchmarks/gpu_checks.py) get a table each after it; a kernel below its share of the copy's GB/s is flagged.
The tables replace whatever lies between the markers `<!-- results:start -->` and `<!-- results:end -->` in the
README; the rest of the README is left as it is. Without the markers the tables are printed and the README is
not touched.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("machine", "model", "quant", "impl", "ms/step (median)", "speed-up vs reference", "tokens/s",
           "peak MiB", "launches/step", "host syncs/step", "Booster/SFT", "MFU", "HFU")
SFT = ("sft", "fast-sft")  # entries timing the SFT step
# the bench's defaults: a setting away from them is named in the row's label
DEFAULTS = {"lora_r": 32, "lora_alpha": 4, "targets": "q_proj,k_proj,v_proj", "lr": 5e-4, "weight_decay": 0.1,
            "max_grad_norm": 1.0, "lamb": 5.0, "alpha": 0.1, "grad_accum": 1, "merge_passes": "auto",
            "packing": "auto", "fused_ops": "auto", "meta_term": True, "dtype": None}
# (not graphs: the GPU suite pins --graphs off for its eager entries, and fast-graphs is its own row)
CHECKS = ("kernel_bandwidth", "kernel_sweep", "graph_equivalence", "profile")  # gpu_checks.py's, by name prefix
FLAT_OPS = ("sumsq", "normalize_perturb_", "restore_combine_")


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"make_table: skipping {path}: {e}", file=sys.stderr)
        return None


def load_results(results_dir) -> list[tuple[str, dict]]:
    """(file name, document) of every bench file, sorted by name; other files are skipped (the GPU checks' files
    silently: check_documents reads those; the other scripts' named in one line)."""
    docs, others = [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        if path.name.startswith(CHECKS):
            continue
        doc = _read(path)
        if doc is None:
            continue
        if not isinstance(doc, dict) or not {"machine", "config", "results"} <= doc.keys():
            others.append(path.name)
            continue
        docs.append((path.name, doc))
    if others:
        print(f"make_table: left out, not `booster-fast bench` documents: {', '.join(others)}", file=sys.stderr)
    return docs


def check_documents(results_dir) -> dict[str, list[tuple[str, dict]]]:
    """kind -> [(file name, document)] of the GPU suite's check files (`results`: a dict, or the sweep's list of
    rows); one line names a check file of another shape."""
    found: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        kind = next((k for k in CHECKS if path.name.startswith(k)), None)
        doc = _read(path) if kind else None
        if isinstance(doc, dict) and isinstance(doc.get("results"), (dict, list)):
            found.setdefault(kind, []).append((path.name, doc))
        elif doc is not None:
            print(f"make_table: left out {path.name}: no `results` in it", file=sys.stderr)
    return found


def cpu_label(model: str) -> str:
    """A CPU's model name as the table shows it, without trademark signs and a closing "Processor"
    ("Intel(R) Xeon(R) Processor" -> "Intel Xeon")."""
    short = re.sub(r"\((R|TM|tm)\)", "", model)
    short = re.sub(r"\s+Processor\s*$", "", " ".join(short.split()))
    return short or model


def hardware(machine: dict) -> str:
    """The GPU when there is one, else the CPU with its core count."""
    if machine.get("gpu"):
        return machine["gpu"]
    return f"{cpu_label(machine.get('cpu') or '') or 'unknown CPU'} ({machine.get('cores') or '?'} cores)"


def _num(v, spec: str, suffix: str = "", none: str = "—") -> str:
    return none if v is None else format(v, spec) + suffix


def data_label(c: dict) -> str | None:
    """The rows' name where they are not the bench's default for the model (tiny: the built-in set; any other
    model: random rows), local files by their file names."""
    data, tiny = str(c.get("data") or ""), c.get("model") == "tiny"
    random_rows = data.startswith("random tokens")
    if not data or data == ("builtin" if tiny else None) or (random_rows and not tiny):
        return None
    if random_rows:
        return "random rows"
    main, harmful = re.fullmatch(r"(.*?)(?: \(harmful: (.*)\))?", data).groups()  # (bench_data.data_description)
    return f"data {os.path.basename(main)}" + (f", harmful {os.path.basename(harmful)}" if harmful else "")


def settings(c: dict) -> list[str]:
    """What a run's label names besides model, batch and length: Vaccine, checkpointing, the rows when they are
    not the default ones, and every setting away from the bench's defaults (two runs that differ in one get
    different labels)."""
    named = [x for x, on in ((f"Booster + Vaccine, ρ {c.get('rho')}", c.get("perturb_aware")),
                             ("grad. checkpointing", c.get("gradient_checkpointing"))) if on]
    named += [x for x in (data_label(c),) if x]
    for key, default in DEFAULTS.items():
        if key in c and c[key] != default:
            named.append("no meta term" if key == "meta_term" else f"{key.replace('_', ' ')} {c[key]}")
    return named


def not_flash_alone(m: dict, c: dict) -> bool:
    """Whether a GPU run's packed batches ran another kernel than flash's variable-length one (the segment grid,
    slower: config.packed_attention says why). On the CPU the grid is the only packed attention."""
    return bool(m.get("gpu")) and any(k != "flash varlen" for k in c.get("packed_attention") or ())


def sft_ratio(impl: str, r: dict) -> str:
    """A Booster entry's step time over the SFT step's, naming the SFT entry when it ran on the other engine (files
    from before fast-sft existed: all against the reference engine's sft)."""
    base = r.get("sft_baseline", "sft")
    cell = _num(r.get("ratio_to_sft"), ".2f", "×")
    return cell if cell == "—" or (base == "fast-sft") == impl.startswith("fast") else f"{cell} (vs {base})"


def rows(docs: list[tuple[str, dict]]) -> list[list[str]]:
    out = []
    for name, doc in docs:
        m, c = doc["machine"], doc["config"]
        extras = settings(c) + (["partial run"] if doc.get("complete") is False else []) \
            + ([f"Triton kernels off: {m['triton_unusable'][:80]}"] if m.get("triton_unusable") else []) \
            + ([f"packed attention: {'; '.join(c['packed_attention'])[:100]}"] if not_flash_alone(m, c) else [])
        if doc.get("complete") is False:
            print(f"make_table: {name} is a partial run (stopped before its last measurement)", file=sys.stderr)
        model = f"{c.get('model')} ({c.get('batch_size')}+{c.get('harmful_batch_size')} × {c.get('max_length')}" \
                + "".join(f", {x}" for x in extras) + ")"
        for impl, r in doc["results"].items():
            marks = [m for m, on in (("packed", r.get("packed_share")), ("CUDA graph", r.get("cuda_graphs"))) if on]
            label = impl + (f" ({', '.join(marks)})" if marks else "")
            head = [hardware(m), model, str(c.get("quant")), label]
            if "skipped" in r or ("failed" in r and "step_ms" not in r):
                why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['failed']}"
                out.append(head + [why] + ["—"] * (len(COLUMNS) - len(head) - 1))
                continue
            if "failed" in r:  # timed, then failed while its memory and ops were measured
                head[-1] += f" (failed after the timing: {r['failed']})"
            if r.get("first_step_agrees") is False:  # its speed is not the same computation's
                off = _num(r["first_step_rel_diff"], ".1%", none="NaN/inf")  # None: a NaN or infinity on one side
                head[-1] += f" (first step off its baseline's by {off})"
            booster = impl not in SFT  # speed-up and the SFT ratio describe Booster steps
            out.append(head + [
                _num(r.get("step_ms"), ".1f"),
                _num(doc.get("speedup", {}).get(impl) if booster else None, ".2f", "×"),
                _num(r.get("tokens_per_s"), ",.0f"),
                _num(r.get("peak_mem_mb"), ",.0f")
                + (f" (est. {r['est_peak_mb']:,.0f})" if r.get("est_peak_mb") else ""),  # memory.py's estimate
                _num(r.get("launches_per_step"), ","),
                _num(r.get("host_syncs_per_step"), ","),
                sft_ratio(impl, r) if booster else "—",
                _num(r.get("mfu"), ".1%"),
                _num(r.get("hfu"), ".1%"),
            ])
    return out


def _grid(columns, body) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]


def _of_copy(fraction, target: float, flag: str = " (below {})") -> str:
    """A kernel's share of the copy's GB/s, with `flag` (naming the target) where it is below the target."""
    below = fraction is not None and fraction < target
    return _num(fraction, ".0%") + (flag.format(f"{target:.0%}") if below else "")


def check_tables(checks: dict[str, list[tuple[str, dict]]]) -> list[str]:
    """Markdown blocks for the GPU suite's kernel bandwidth, graph-equivalence and profile files."""
    blocks = []
    for name, doc in checks.get("kernel_bandwidth", []):
        res, frac, gpu = doc["results"], doc.get("fraction_of_copy", {}), doc.get("machine", {}).get("gpu")
        target = doc.get("target", 0.7)
        body = [[op, _num(res.get(f"{op}_GBps"), ",.0f"), _num(res.get(f"{op}_torch_GBps"), ",.0f"),
                 _of_copy(frac.get(op), target), _num(res.get(f"{op}_max_rel_err"), ".1e")]
                for op in ("copy", *FLAT_OPS)]
        blocks.append(f"Kernels on {gpu}, {res.get('n', '?'):,} fp32 elements (`{name}`; target: each kernel "
                      f"≥ {doc.get('target', 0.7):.0%} of the copy):\n\n"
                      + "\n".join(_grid(("op", "Triton GB/s", "torch GB/s", "of copy", "max rel. error vs torch"),
                                         body)))
        model = doc.get("model_kernels")
        if model:
            timed = [(f"{op} {d}", model[f"{op}_{d}"]) for op in ("rms_norm", "silu_mul", "rope")
                     for d in ("fwd", "bwd") if f"{op}_{d}" in model]
            if "cross_entropy_fwd" in model:  # the chunked head's: loss and gradient in one kernel
                ce = model["cross_entropy_fwd"]
                timed.append((f"cross_entropy + grad ({ce['rows']:,} × {ce['vocab']:,} logits)", ce))
            rows = [[label, _num(r["GBps"], ",.0f"), _num(r["ms"], ".3f"), _num(r["eager_ms"], ".3f"),
                     _num(r["speedup"], ".2f") + "×", _num(r["fraction_of_copy"], ".0%"),
                     _num(r.get("max_rel_err"), ".1e")] for label, r in timed]
            blocks.append(f"Fused model ops on {gpu}, bf16, {model['tokens']:,} tokens of the 7B shape "
                          f"(bf16 copy: {_num(model['copy_GBps'], ',.0f')} GB/s):\n\n"
                          + "\n".join(_grid(("op", "GB/s", "ms", "eager ms", "speed-up", "of copy",
                                             "max rel. error vs eager"), rows))
                          + (f"\n\nThe head's cross entropy: not measured ({model['cross_entropy_error']})."
                             if model.get("cross_entropy_error") else ""))
        elif doc.get("model_kernels_error"):
            blocks.append(f"Fused model ops: not measured ({doc['model_kernels_error']}).")
    for name, doc in checks.get("kernel_sweep", []):
        gpu, default, target = doc.get("machine", {}).get("gpu"), doc.get("default", {}), doc.get("target", 0.7)
        body = []
        for r in doc["results"]:
            pair = (r.get("BLOCK"), r.get("num_warps"))
            label = [f"{pair[0]:,}" + (" (default)" if pair == (default.get("BLOCK"), default.get("num_warps"))
                                         else ""), pair[1]]
            if "error" in r:
                body.append(label + [f"failed: {r['error']}"] + ["—"] * (len(FLAT_OPS) + 1))
                continue
            copy = r.get("copy_GBps")
            body.append(label + [_num(copy, ",.0f")]
                        + [_num(r.get(f"{op}_GBps"), ",.0f") + " (" + _of_copy(
                            r[f"{op}_GBps"] / copy if copy and r.get(f"{op}_GBps") else None, target, ", below {}")
                           + ")" for op in FLAT_OPS] + [_num(r.get("max_rel_err"), ".1e")])
        blocks.append(f"Flat-buffer kernels on {gpu} per launch constants, {doc.get('numel', 0):,} fp32 elements "
                      f"(`{name}`; GB/s, and of the copy timed beside them):\n\n"
                      + "\n".join(_grid(("BLOCK", "num_warps", "copy GB/s", *FLAT_OPS, "max rel. error vs torch"),
                                         body)))
    for name, doc in checks.get("graph_equivalence", []):
        body = [[model, r.get("steps"), _num(r.get("worst_relative_l2"), ".2e"),
                 _num(r.get("worst_loss_relative"), ".2e"), r.get("captured"), r.get("replays", "—"),
                 r.get("pool_warmups", "—"), r.get("fallback") or "—"] for model, r in doc["results"].items()]
        blocks.append(f"CUDA-graph replays vs eager steps, fast engine (`{name}`):\n\n"
                      + "\n".join(_grid(("model", "steps", "worst LoRA rel. L2", "worst loss rel.", "captured",
                                          "replays", "warm-ups in the pool", "fallback"), body)))
    for name, doc in checks.get("profile", []):
        body = [[impl, _num(r.get("wall_ms_per_step"), ".1f"), _num(r.get("gpu_busy_ms_per_step"), ".1f"),
                 _num(r.get("gpu_idle_share"), ".0%"),
                 r.get("error") and f"failed: {r['error']}"
                 or "; ".join(f"{k['name'][:40]} {k['ms_per_step']:.1f} ms" for k in r.get("top_kernels", [])[:3])]
                for impl, r in doc["results"].items()]
        blocks.append(f"Profile of {doc.get('model')} ({doc.get('quant')}), batch {doc.get('batch')} (`{name}`):\n\n"
                      + "\n".join(_grid(("impl", "wall ms/step", "GPU busy ms/step", "GPU idle", "top kernels"),
                                         body)))
    return blocks


def markdown_table(docs: list[tuple[str, dict]], checks: dict | None = None) -> str:
    files = ", ".join(f"`{name}` ({doc['machine'].get('date', '?')})" for name, doc in docs)
    parts = (["\n".join(_grid(COLUMNS, rows(docs)))] if docs else []) + check_tables(checks or {})
    return "\n\n".join(parts) + f"\n\nFrom benchmarks/results/: {files or 'no files yet'}. Regenerate with " \
                                  "`python benchmarks/make_table.py`."


def update_readme(readme, table: str) -> bool | None:
    """Replace the block between the markers: True when that changed the README, None when it held the table
    already, False (README untouched) when the README or a marker is missing."""
    path = Path(readme)
    try:
        text = path.read_text()
    except OSError:
        return False
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        return False
    new = text[: i + len(START)] + "\n" + table + "\n" + text[j:]
    if new == text:
        return None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def make_table(results_dir=ROOT / "benchmarks" / "results", readme=ROOT / "README.md") -> str:
    """Build the table and write it into `readme` between the markers (or print it if they are missing)."""
    table = markdown_table(load_results(results_dir), check_documents(results_dir))
    updated = update_readme(readme, table)
    if updated is not False:
        print(f"make_table: {'updated' if updated else 'the table is up to date in'} {readme}", file=sys.stderr)
    else:
        print(table)
        print(f"make_table: {readme} has no {START} ... {END} block; printed the table, README untouched",
              file=sys.stderr)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of bench JSON files")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README with the results markers")
    args = p.parse_args(argv)
    make_table(args.results, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
