"""Rebuild the README's results table from the measured files in benchmarks/results/.

    python benchmarks/make_table.py [--results benchmarks/results] [--readme README.md]

Every `*.json` there is a document written by `booster-fast bench --json --output FILE`. The table replaces
whatever lies between the markers `<!-- results:start -->` and `<!-- results:end -->` in the README; the rest
of the README is left as it is. Without the markers the table is printed and the README is not touched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("machine", "model", "quant", "impl", "ms/step (median)", "speed-up vs reference", "tokens/s",
           "peak MB", "ops/step", "Booster/SFT")


def load_results(results_dir) -> list[tuple[str, dict]]:
    """(file name, document) of every results file, sorted by name; files that are not bench output are skipped."""
    docs = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"make_table: skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(doc, dict) or not {"machine", "config", "results"} <= doc.keys():
            print(f"make_table: skipping {path}: not a `booster-fast bench` document", file=sys.stderr)
            continue
        docs.append((path.name, doc))
    return docs


def hardware(machine: dict) -> str:
    """The GPU when there is one, else the CPU with its core count."""
    if machine.get("gpu"):
        return machine["gpu"]
    return f"{machine.get('cpu') or 'unknown CPU'} ({machine.get('cores') or '?'} cores)"


def _num(v, spec: str, suffix: str = "") -> str:
    return "—" if v is None else format(v, spec) + suffix


def rows(docs: list[tuple[str, dict]]) -> list[list[str]]:
    out = []
    for _, doc in docs:
        m, c = doc["machine"], doc["config"]
        model = f"{c.get('model')} ({c.get('batch_size')}+{c.get('harmful_batch_size')} × {c.get('max_length')}" \
                + (", grad. checkpointing)" if c.get("gradient_checkpointing") else ")")
        for impl, r in doc["results"].items():
            label = impl + (" (CUDA graph)" if r.get("cuda_graphs") else "")
            head = [hardware(m), model, str(c.get("quant")), label]
            if "skipped" in r:
                out.append(head + [f"skipped: {r['skipped']}"] + ["—"] * 5)
                continue
            booster = impl != "sft"  # speed-up and the SFT ratio describe Booster steps
            out.append(head + [
                _num(r.get("step_ms"), ".1f"),
                _num(doc.get("speedup", {}).get(impl) if booster else None, ".2f", "×"),
                _num(r.get("tokens_per_s"), ",.0f"),
                _num(r.get("peak_mem_mb"), ",.0f"),
                _num(r.get("ops_per_step"), ","),
                _num(r.get("ratio_to_sft") if booster else None, ".2f", "×"),
            ])
    return out


def markdown_table(docs: list[tuple[str, dict]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(docs)]
    files = ", ".join(f"`{name}` ({doc['machine'].get('date', '?')})" for name, doc in docs)
    return "\n".join(lines) + f"\n\nFrom benchmarks/results/: {files or 'no files yet'}. Regenerate with " \
                              "`python benchmarks/make_table.py`."


def update_readme(readme, table: str) -> bool:
    """Replace the block between the markers; False (README untouched) when the README or a marker is missing."""
    path = Path(readme)
    try:
        text = path.read_text()
    except OSError:
        return False
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        return False
    new = text[: i + len(START)] + "\n" + table + "\n" + text[j:]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def make_table(results_dir=ROOT / "benchmarks" / "results", readme=ROOT / "README.md") -> str:
    """Build the table and write it into `readme` between the markers (or print it if they are missing)."""
    table = markdown_table(load_results(results_dir))
    if update_readme(readme, table):
        print(f"make_table: updated {readme}", file=sys.stderr)
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
