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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
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
