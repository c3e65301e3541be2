"""Test setup shared by every test module.

Triton kernels run on the CPU under TRITON_INTERPRET=1. Triton reads the variable when a kernel is
decorated, so it is set here, before anything imports booster_fast.kernels. On a CUDA machine the
kernels are compiled for real and the variable is left alone.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (-n N) the cores are shared out among the workers, and among the processes the tests start
# (the variable is inherited): N processes each running one OpenMP thread per core would spin-wait on one another.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(scope="session")
def aligned(tmp_path_factory):
    """A 2-step align run of the tiny model (max length 64, batch 2) with a checkpoint at step 2, for the attack
    tests to start from; read-only (each test writes its own outputs elsewhere)."""
    from booster_fast.cli import main

    out = tmp_path_factory.mktemp("aligned") / "aligned"
    assert main(["align", "--output", str(out), "--steps", "2", "--save-every", "2", "--max-length", "64",
                 "--batch-size", "2"]) == 0
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # the experimental warm-up in the graphs' pool last: a CUDA error it leaves behind (sticky, for the
        # whole process) must not cost the tests after it their results
        items.sort(key=lambda item: "pool_warmup" in item.keywords)
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (opted into with `pytestmark = pytest.mark.usefixtures(...)`): the
    tiny model gains nothing from a second one, and bit-exact comparisons need equal thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
