"""pytest-benchmark suite: one Booster (or SFT) step on the tiny model, batch 8 + 8 rows of 64 tokens (the
built-in rows fill them) and of 256 tokens (~36% real: where packing pays).

    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/pytest_benchmark_cpu.json

CI does not collect this file (pyproject's testpaths is tests/). Each case builds its model the way
`booster-fast bench` does (same seed, so identical initial weights, and the same pre-generated batches in the
form its engine runs: `bench_data.entry_batches`) and records the aten ops of one step in `benchmark.extra_info`.
pytest-benchmark runs the cases one after the other, so machine drift is not cancelled here: for side-by-side
numbers use `booster-fast bench`, which interleaves.
"""
import itertools

import pytest
import torch

from booster_fast import bench, bench_data
from booster_fast.cli import build_parser
from booster_fast.opcount import count_ops

# case -> (bench entry, extra flags); the `+vaccine` cases run Booster + Vaccine (--perturb-aware): four passes
# for the reference, three for the merged fast step
CASES = {"reference": ("reference", ()), "fast": ("fast", ()), "fast_padded": ("fast-padded", ()),
         "fast_merged": ("fast-merged", ()), "sft": ("sft", ()),
         "reference+vaccine": ("reference", ("--perturb-aware",)), "fast+vaccine": ("fast", ("--perturb-aware",)),
         "fast_merged+vaccine": ("fast-merged", ("--perturb-aware",))}
LENGTHS = (64, 256)


def parsed(length, extra=()):
    # graphs off: on a CUDA machine "auto" would capture a new packed length inside a timed round (the bench's
    # fast-graphs entry captures every shape before its timing)
    a = build_parser().parse_args(["bench", "--model", "tiny", "--batch-size", "8", "--harmful-batch-size", "8",
                                   "--max-length", str(length), "--steps", "10", "--warmup", "2", "--graphs", "off",
                                   *extra])
    bench.check_bench_args(a)
    return a


@pytest.fixture(scope="module")
def pairs():
    """length -> the CPU batch pairs `booster-fast bench` makes for it."""
    from booster_fast import load_model

    model, tok = load_model("tiny", seed=parsed(64).seed, device="cpu")
    return {n: bench_data.make_batches(parsed(n), tok, model) for n in LENGTHS}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, pairs, case, length):
    name, extra = CASES[case]
    args = parsed(length, extra)
    device = bench.resolve_device(args.device)
    booster, _, _ = bench.build_impl(name, args, device)
    fn = bench.step_fn(name, booster)
    batches = bench_data.entry_batches(booster, pairs[length], device)
    fn(*batches[0])  # the first step also creates the optimizer state: count a later one, as the bench does
    ops = count_ops(fn, *batches[1])
    benchmark.extra_info.update(impl=name, perturb_aware=args.perturb_aware, device=str(device), max_length=length,
                                ops_per_step=ops["total"], launches_per_step=ops["launches"],
                                bookkeeping_ops=ops["bookkeeping"] if name.startswith("fast") else None,
                                packed=any("cu_seqlens" in b for pair in batches for b in pair))
    cycle = itertools.cycle(batches)

    def one_step():
        fn(*next(cycle))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a host sync for timing only, outside the step

    benchmark.pedantic(one_step, rounds=args.steps, warmup_rounds=args.warmup, iterations=1)
