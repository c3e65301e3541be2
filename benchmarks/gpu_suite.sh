#!/usr/bin/env bash
# The GPU suite: ONE prepared script for a lent GPU machine (H200 class), at most ~6 minutes (a deadline).
#   bash benchmarks/gpu_suite.sh                  # every part, within 345 s
#   bash benchmarks/gpu_suite.sh bench_7b_bf16    # only the named parts (a rerun after a fix), within 540 s
#   SUITE_DEADLINE=300 bash benchmarks/gpu_suite.sh ...  # another deadline: keep it 30 s under the machine's limit
#   bash benchmarks/gpu_suite.sh bench_70b_nf4_ckpt   # an opt-in part (OPT_IN below): runs only when named
# Results: with $OUT set (a machine that hands back only a few files from it), everything goes into
# $OUT/gpu_suite.tgz, repacked after each part and every 20 s, so that a suite stopped early (by the machine's
# limit, even inside a part) still returns what it has, plus
# $OUT/gpu_suite.log; unpack with `tar xzf gpu_suite.tgz -C benchmarks/results`. Without $OUT, the files go
# straight into benchmarks/results/. Either way each part's full output is in gpu_logs/. Wheels in .whl/ are
# installed first, ahead of the machine's own packages: bitsandbytes (the machine has none), peft 0.21.2
# (pure Python; a peft older than 0.18 cannot import under transformers 5) and accelerate 1.15.0, which that peft
# imports from (pure Python; an old accelerate lacks some of what it imports). Every part has its own time limit and
# the suite goes on when one part fails; it stops at once when the stack itself does not import.
set -uo pipefail
ONLY=" $* "
OPT_IN=" bench_70b_nf4_ckpt "  # parts beyond the 6-minute budget of a full run
cd "$(dirname "$0")/.."
PARTS=" $(sed -n 's/^\(NEED_PERCENT=[0-9]* \)\{0,1\}\(bench_\)\{0,1\}part \([a-z0-9_]*\) .*/\3/p' benchmarks/gpu_suite.sh \
  | tr '\n' ' ')"
for name in "$@"; do  # a typo must not cost a borrowed machine's start-up for nothing
  [[ "$PARTS" == *" $name "* ]] || { echo "gpu_suite.sh: no part named '$name'; parts:$PARTS" >&2; exit 2; }
done
if [[ -n "${OUT:-}" ]]; then
  DEST=$OUT RES=$(mktemp -d)
  mkdir -p "$DEST"
else
  DEST="" RES=benchmarks/results
fi
mkdir -p "$RES/gpu_logs"
LOG="$RES/gpu_suite.log"
: > "$LOG"
pack() {  # the results so far, as the two files that come back. One pack at a time (the packer below runs
  # beside the parts: an older snapshot must not land after a newer one), each file written whole, then renamed
  [[ -n "$DEST" ]] || return 0
  if command -v flock > /dev/null; then
    ( flock 9; pack_now ) 9> "$RES.pack.lock"
  else
    pack_now
  fi
}
pack_now() {
  local tmp="$DEST/.pack.$BASHPID"
  # (tar's exit 1, a file that changed or went while it read, still leaves a whole archive: keep it)
  tar czf "$tmp" -C "$RES" --exclude=./.stop_packing . 2> /dev/null
  (( $? <= 1 )) && mv "$tmp" "$DEST/gpu_suite.tgz"
  cp "$LOG" "$tmp" && mv "$tmp" "$DEST/gpu_suite.log"
}

# what each part writes comes back even if the machine's limit cuts a part short: packed every 20 s too, from
# before the install on (a setup step that hangs still leaves its log). On SIGTERM (the machine's limit) the part
# running is stopped and the results packed once more before the suite exits
packer() {
  local i=0
  while [[ ! -e "$RES/.stop_packing" ]]; do
    sleep 1
    (( ++i % ${PACK_EVERY:-20} )) || pack
  done
}
stop_packer() {  # before the last pack; also on any exit of this shell (a signal), so that none outlives it
  [[ -n "${PACKER:-}" ]] || return 0
  touch "$RES/.stop_packing"; wait "$PACKER"; rm -f "$RES/.stop_packing"
  PACKER=""
}
PACKER="" CHILD=""
on_exit() { stop_packer; pack; [[ -z "$DEST" ]] || rm -f "$DEST"/.pack.*; }  # (a pack the packer left half-done)
on_signal() {  # on_signal CODE: a signal arrived (during a part, at once; during a setup step, when it ends)
  if [[ -n "$CHILD" ]]; then
    kill -TERM "$CHILD" 2> /dev/null  # `timeout` passes it on to the part, which writes what it has measured:
    for _ in 1 2 3 4 5 6 7 8; do kill -0 "$CHILD" 2> /dev/null || break; sleep 1; done  # up to 8 s for that
  fi
  echo "== stopped by a signal after ${SECONDS}s" | tee -a "$LOG"; exit "$1"
}
trap 'on_signal 143' TERM
trap 'on_signal 130' INT
[[ -n "$DEST" ]] && { trap on_exit EXIT; packer & PACKER=$!; }

# -- install: the carried wheels, then the project itself (no dependencies: the machine has them) ----------------
# (no network there: pip never looks at an index, nor for its own newer version; each step has a time limit)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
SITE=${SUITE_SITE:-/tmp/site} WHEELS=${SUITE_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl \
    || { echo "pip could not install the wheels: unpacking them" | tee -a "$LOG"
         for w in "$WHEELS"/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  # peft imports bitsandbytes whenever it finds one: one that fails to import would fail the bf16 parts too, so
  # it goes (and only the NF4 parts fail, on their own)
  if compgen -G "$WHEELS/bitsandbytes-*.whl" > /dev/null && ! bnb=$(timeout 60 python3 -c "import bitsandbytes" 2>&1); then
    echo "bitsandbytes does not import (removed; the NF4 parts will fail): $(tail -n 1 <<< "$bnb")" | tee -a "$LOG"
    rm -rf "$SITE"/bitsandbytes "$SITE"/bitsandbytes-*
  fi
elif ! python3 -c "import bitsandbytes" 2>/dev/null; then
  echo "no bitsandbytes here and no wheel in .whl/: the NF4 parts (and the NF4 tests) will fail" | tee -a "$LOG"
fi
timeout 60 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "project install failed: importing it from the checkout" | tee -a "$LOG"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
# the commit every document records (bench_report.machine_info): a tree sent without its .git cannot tell
BOOSTER_FAST_COMMIT=${BOOSTER_FAST_COMMIT:-$(git rev-parse HEAD 2> /dev/null)}
export BOOSTER_FAST_COMMIT
echo "commit: ${BOOSTER_FAST_COMMIT:-unknown (no .git here: run the suite as BOOSTER_FAST_COMMIT=SHA bash ...)}" \
  | tee -a "$LOG"
# the stack: every part needs it, so a failure here ends the suite (its time is better spent on a rerun)
# (bitsandbytes is not part of it: only the NF4 parts need it, and they fail on their own without it)
check_stack() {
  timeout 90 python3 - 2>&1 <<'PY'
import torch, triton, transformers, accelerate, peft, booster_fast
try:
    import bitsandbytes
    bnb = bitsandbytes.__version__
except Exception as e:  # absent, or its CUDA libraries do not load: the NF4 parts will say so
    bnb = f"not usable ({type(e).__name__}: {e})"
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "peft", peft.__version__, "bnb", bnb)

def below_floors() -> list[str]:
    """The installed packages older than their floor in pyproject.toml (the project goes in without its
    dependencies, so nothing else checks them here)."""
    from importlib.metadata import PackageNotFoundError, requires, version
    from packaging.requirements import Requirement
    below = []
    for r in map(Requirement, requires("booster-fast")):
        if r.marker is not None:  # (an extra's: the tests' and plots' packages)
            continue
        try:
            have = version(r.name)
        except PackageNotFoundError:  # (absent: the parts that need it say so)
            continue
        if not r.specifier.contains(have, prereleases=True):
            below.append(f"{r.name} {have} (pyproject.toml: {r.specifier})")
    return below


try:  # a line of information: nothing here stops the suite
    if below := below_floors():
        print("below the declared floors, results may differ:", "; ".join(below))
except Exception as e:  # (the project imported from the checkout has no metadata)
    print(f"floors not checked ({type(e).__name__}: {e})")
PY
}
stack=$(check_stack); stack_rc=$?
if (( stack_rc != 0 )) && compgen -G "$SITE/peft*" > /dev/null; then  # the carried peft (or accelerate) may not
  # import beside this machine's transformers: once more with the machine's own
  tail -n 2 <<< "$stack" | tee -a "$LOG"
  echo "the stack does not import with the carried peft and accelerate: once more with the machine's own" \
    | tee -a "$LOG"
  rm -rf "$SITE"/peft "$SITE"/peft-* "$SITE"/accelerate "$SITE"/accelerate-*
  stack=$(check_stack); stack_rc=$?
fi
if (( stack_rc != 0 )); then
  tail -n 5 <<< "$stack" | tee -a "$LOG"
  echo "the stack does not import (above): stopping" | tee -a "$LOG"; exit 3  # (on_exit packs what there is)
fi
tail -n 3 <<< "$stack" | tee -a "$LOG"

# preflight, in one process (each import of torch and start of CUDA costs seconds): one NF4 round trip on the GPU
# (bitsandbytes may import with its CUDA library missing: it warns, then fails at the first 4-bit call, which this
# line states before the NF4 parts meet it), then one Triton kernel launched for real (Triton builds a small C
# launcher at its first launch: it needs a C compiler and Python's headers; where it cannot, the fast engine runs
# its torch paths without fused model ops, and every bench document says so: machine.triton_unusable)
preflight=$(timeout 150 python3 - 2>&1 <<'PY'
import torch
try:
    import bitsandbytes.functional as F
    w = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    err = ((F.dequantize_4bit(q, state) - w).float().norm() / w.float().norm()).item()
    print(f"preflight: bitsandbytes NF4 on the GPU: relative error {err:.3f}" + ("" if err < 0.2 else " (too large)"),
          flush=True)
except Exception as e:  # noqa: BLE001
    print(f"preflight: bitsandbytes NF4 on the GPU fails ({type(e).__name__}: {e}); the NF4 parts will fail",
          flush=True)
try:
    from booster_fast.kernels import triton_unusable
    print("preflight: Triton", triton_unusable(torch.device("cuda")) or "launches", flush=True)
except Exception as e:  # noqa: BLE001
    print(f"preflight: Triton not checked ({type(e).__name__}: {e})", flush=True)
PY
); preflight_rc=$?
grep -E '^(preflight|[A-Za-z_.]*(Error|Exception))' <<< "$preflight" | tee -a "$LOG"  # (and a traceback's last line)
(( preflight_rc == 0 )) || echo "preflight: exit code $preflight_rc (124: its 150 s limit)" | tee -a "$LOG"

# the whole suite's deadline (seconds from its start): a part gets at most what is left, and none starts with
# under half its limit (or 20 s) left, a bench part with under 80 % (stopped during its timing, it writes only the
# steps it had timed), so that the results come back before the machine's own limit however the parts run, and
# no part is started only to be cut off before it writes anything. Named parts get a longer deadline (the 70B
# part alone has a 420 s limit): give the machine's call a limit at least 30 s above it
if [[ "$ONLY" == "  " ]]; then DEADLINE=${SUITE_DEADLINE:-345}; else DEADLINE=${SUITE_DEADLINE:-540}; fi
SKIPPED="" FAILED=""  # the parts the deadline left out, and those that exited non-zero, for the last lines
wanted() { [[ ( "$ONLY" == "  " && "$OPT_IN" != *" $1 "* ) || "$ONLY" == *" $1 "* ]]; }
part() {  # part NAME SECONDS CMD...: run one part with a time limit, log its tail, never abort the suite
  wanted "$1" && run_part "$@"
}
run_part() {  # returns the part's exit code (0 when skipped for time)
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS)) need=${NEED_PERCENT:-50}
  if (( left < 20 || 100 * left < need * limit )); then
    echo "== $name: skipped, ${left}s left before the suite's deadline (${DEADLINE}s)" | tee -a "$LOG"
    [[ "$SKIPPED " == *" ${name%_eager} "* ]] || SKIPPED+=" ${name%_eager}"  # (a rerun without graphs: its part)
    return 0
  fi
  (( left < limit )) && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" > "$RES/gpu_logs/$name.out" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=""
  tail -n 5 "$RES/gpu_logs/$name.out" | cut -c 1-400 >> "$LOG"  # (a JSON document is a line: its start)
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  (( rc == 0 )) || FAILED+=" $name(rc=$rc)"
  pack
  return $rc
}

BENCH="python3 -m booster_fast bench --device cuda --graphs off --batch-size 10 --harmful-batch-size 10 --max-length 256 --json"
bench_part() {  # bench_part NAME SECONDS BENCH-ARGS...: a part running the bench. Exit code 3 means CUDA
  # invalidated a graph capture, after which nothing more can be measured in that process: the part then runs
  # once more in a new process without fast-graphs (as NAME_eager, within the suite's deadline), so the
  # reference and fast eager numbers still come back; the first document is kept as *.json.invalidated (out
  # of make_table's *.json). The later parts of the same --quant then leave fast-graphs out from the start
  # (what invalidated one capture would invalidate theirs, and the suite has no time for two runs of each)
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  local quant args
  quant=$(sed -n 's/.*--quant \([a-z0-9]*\).*/\1/p' <<< "$*")
  if [[ "$INVALIDATED " == *" $quant "* ]]; then
    echo "== $name: without fast-graphs (a capture was invalidated in an earlier $quant part)" | tee -a "$LOG"
    mapfile -t args < <(without_graphs "$@")
    NEED_PERCENT=80 run_part "$name" "$limit" $BENCH "${args[@]}"
    return 0
  fi
  NEED_PERCENT=80 run_part "$name" "$limit" $BENCH "$@"
  (( $? == 3 )) || return 0
  INVALIDATED+=" $quant"
  local out
  out=$(sed -n 's/.*--output \([^ ]*\).*/\1/p' <<< "$*")
  [[ -n "$out" && -f "$out" ]] && mv "$out" "$out.invalidated"
  echo "== $name: a CUDA graph capture was invalidated; once more without fast-graphs" | tee -a "$LOG"
  mapfile -t args < <(without_graphs "$@")
  NEED_PERCENT=80 run_part "${name}_eager" "$limit" $BENCH "${args[@]}"
}
INVALIDATED=""  # the --quant values whose bench parts had a capture invalidated
without_graphs() {  # the bench arguments with fast-graphs gone from --impls (none has a space in it)
  local prev=""
  for a in "$@"; do
    [[ "$prev" == --impls ]] && a=$(tr , '\n' <<< "$a" | grep -vx fast-graphs | paste -sd, -)
    printf '%s\n' "$a"
    prev=$a
  done
}

# the parts in the order of the issue's targets, so that a suite cut short by its deadline still has them: the
# step benchmark with peak memory (reference / fast eager / fast graphs) at 7B in bf16 (speed) and in NF4 with
# checkpointing (memory), then at 1B in bf16 (speed; fast-padded shows what packing buys, fast-unfused what the
# fused model ops buy, fast-unmerged what the merged pass buys, the CUDA default that this row confirms or
# changes, sft / fast-sft what Booster costs over plain SFT), then (1) each kernel's GB/s against a d2d copy; the
# NF4 rows without checkpointing and at 1B after them. Fast entries pack their batches and fuse
# RMSNorm/SwiGLU/RoPE (the defaults). Timed steps are a multiple of the entries, so that every entry goes first
# equally often in the rotating order
bench_part bench_7b_bf16 85 --model llama-7b-shape --quant none --impls reference,fast,fast-graphs \
  --steps 6 --warmup 2 --output "$RES/gpu_llama-7b-shape_bf16.json"
bench_part bench_7b_nf4_ckpt 70 --model llama-7b-shape --quant nf4 --impls reference,fast,fast-graphs \
  --steps 3 --warmup 2 --gradient-checkpointing --output "$RES/gpu_llama-7b-shape_nf4_ckpt.json"
bench_part bench_1b_bf16 65 --model llama-1b-shape --quant none \
  --impls reference,fast,fast-graphs,fast-padded,fast-unfused,fast-unmerged,sft,fast-sft \
  --steps 8 --warmup 3 --output "$RES/gpu_llama-1b-shape_bf16.json"
# (1) each kernel's GB/s against a d2d copy (the model ops too), each checked against its torch formula
part kernel_bandwidth 55 python3 benchmarks/gpu_checks.py bandwidth --out "$RES"
bench_part bench_7b_nf4 50 --model llama-7b-shape --quant nf4 --impls reference,fast,fast-graphs \
  --steps 3 --warmup 2 --output "$RES/gpu_llama-7b-shape_nf4.json"
bench_part bench_1b_nf4 40 --model llama-1b-shape --quant nf4 --impls reference,fast,fast-graphs \
  --steps 6 --warmup 2 --output "$RES/gpu_llama-1b-shape_nf4.json"
# (2) graph vs eager on tiny and llama-1b-shape: 5 padded steps; packed, a second length warming up after the
# first capture, beside the graphs' pool and (POOL_WARMUP) inside it
part graph_equivalence 70 python3 benchmarks/gpu_checks.py equivalence --out "$RES"
# (1) the GPU-marked tests (kernels compiled for real; a module that fails to import costs its own tests only;
# -v: a line per test as it ends, so that a part cut short by its limit still says what passed: it starts with a
# quarter of its limit left)
NEED_PERCENT=25 part gpu_tests 120 python3 -m pytest -v -rfE -p no:cacheprovider --continue-on-collection-errors -m gpu \
  tests/test_kernels.py tests/test_fast.py tests/test_graphs.py tests/test_packing.py tests/test_fused_ops.py \
  tests/test_perturb_aware.py tests/test_option_combinations.py tests/test_head_loss.py
# (5) where the time goes on llama-7b-shape: reference vs fast+graphs
part profile_7b 65 python3 benchmarks/gpu_checks.py profile --model llama-7b-shape --out "$RES"
# the flat-buffer kernels' GB/s over BLOCK x num_warps, the pair they run with first: what confirms or replaces it
part kernel_sweep 40 python3 benchmarks/gpu_checks.py sweep --out "$RES"
# the 1B shape on the built-in data set's rows (varied lengths, ~a third of 256 tokens) instead of the random rows
# (80 % real): what packing saves on rows of varied lengths, when time is left
bench_part bench_1b_bf16_data 50 --model llama-1b-shape --quant none --data builtin \
  --impls reference,fast,fast-graphs,fast-padded --steps 8 --warmup 2 --output "$RES/gpu_llama-1b-shape_bf16_builtin.json"
# opt-in: Llama-2-70B's shape in NF4 with checkpointing on this one GPU, the entries sharing one 34 GB packed base
bench_part bench_70b_nf4_ckpt 420 --model llama-70b-shape --quant nf4 --impls reference,fast,fast-graphs \
  --steps 3 --warmup 1 --gradient-checkpointing --output "$RES/gpu_llama-70b-shape_nf4_ckpt.json"
echo "suite done in ${SECONDS}s" | tee -a "$LOG"
[[ -z "$FAILED" ]] || echo "exited non-zero:$FAILED (each part's output: gpu_logs/NAME.out)" | tee -a "$LOG"
[[ -z "$SKIPPED" ]] || echo "skipped for time:$SKIPPED; they run by name with a deadline of their own:" \
  "bash benchmarks/gpu_suite.sh$SKIPPED" | tee -a "$LOG"
