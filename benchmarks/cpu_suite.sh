#!/usr/bin/env bash
# The CPU rows of the README's results table: three `booster-fast bench` runs of the tiny model on the built-in
# data, each side by side in one process (about 2 minutes on 2 cores). Run it on an otherwise idle machine, then
# `python benchmarks/make_table.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH="python3 -m booster_fast bench --model tiny --device cpu --warmup 3 --json"
OUT=${OUT:-benchmarks/results}
# 64 tokens: the built-in rows fill them, so fast and reference compute the same positions
$BENCH --steps 30 --impls reference,fast-unmerged,fast-merged,sft,fast-sft --output "$OUT/cpu_tiny.json" > /dev/null
# the paper's 256 tokens: packing computes only the real tokens; fast-padded shows the step without it
$BENCH --max-length 256 --steps 20 --impls reference,fast-padded,fast,sft,fast-sft --output "$OUT/cpu_tiny_len256.json" > /dev/null
# Booster + Vaccine: the original's four passes against the fast step's packed ones
$BENCH --max-length 256 --steps 20 --impls reference,fast,fast-merged,sft,fast-sft --perturb-aware --rho 5 \
  --output "$OUT/cpu_tiny_len256_vaccine.json" > /dev/null
