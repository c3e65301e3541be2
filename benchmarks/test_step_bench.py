"""pytest-benchmark suite: one Booster (or SFT) step on the tiny model, batch 8 x 64, harmful batch 8.

    pytest benchmarks/ --benchmark-only

CI does not collect this file (pyproject's testpaths is tests/). Each case builds its model the way
`booster-fast bench` does (same seed, so identical initial weights, and the same pre-generated batches) and
records the aten ops of one step in `benchmark.extra_info`. pytest-benchmark runs the cases one after the other,
so machine drift is not cancelled here: for side-by-side numbers use `booster-fast bench`, which interleaves.
"""
import itertools

import pytest
import torch

from booster_fast import bench
from booster_fast.cli import build_parser
from booster_fast.opcount import count_ops

CASES = {"reference": "reference", "fast_merged": "fast-merged", "fast_unmerged": "fast-unmerged", "sft": "sft"}
ARGV = ["bench", "--model", "tiny", "--batch-size", "8", "--harmful-batch-size", "8", "--max-length", "64",
        "--steps", "10", "--warmup", "2"]


@pytest.fixture(scope="module")
def args():
    a = build_parser().parse_args(ARGV)
    bench.check_bench_args(a)
    return a


@pytest.fixture(scope="module")
def device(args):
    return bench.resolve_device(args.device)


@pytest.fixture(scope="module")
def batches(args, device):
    from booster_fast import load_model

    model, tok = load_model("tiny", seed=args.seed, device=device)
    return bench.make_batches(args, tok, model, device)


@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, args, device, batches, case):
    name = CASES[case]
    booster, _, _ = bench.build_impl(name, args, device)
    fn = bench.step_fn(name, booster)
    ops = count_ops(fn, *batches[0][:2])
    benchmark.extra_info.update(impl=name, device=str(device), ops_per_step=ops["total"],
                                bookkeeping_ops=ops["bookkeeping"] if name.startswith("fast") else None)
    cycle = itertools.cycle(batches)

    def one_step():
        a, h, _, _ = next(cycle)
        fn(a, h)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a host sync for timing only, outside the step

    benchmark.pedantic(one_step, rounds=args.steps, warmup_rounds=args.warmup, iterations=1)
