"""Count the aten ops a step dispatches, split into model passes and bookkeeping.

Every aten op is a kernel launch on a GPU without CUDA graphs, so the op count is the launch count a step pays.
`count_ops(fn)` runs `fn` under a TorchDispatchMode; regions that the fast step marks with `fast.model_pass()`
(forward, loss, backward) are counted as "pass", the rest as "bookkeeping". The reference step has no markers,
so there "bookkeeping" equals "total" and means nothing. Profiler bookkeeping ops (`profiler.*`) are not kernels and are
skipped. Ops that read a value back to the host (`.item()`, `bool(t)`, `nonzero`, `equal`: a host sync on a GPU,
fatal inside a CUDA-graph capture) are counted apart as "host_syncs" — on the CPU too, where they cost nothing,
so that a CPU test can prove a step free of them.
"""
from __future__ import annotations

import contextlib
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

from . import fast


SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select",
            "aten._unique", "aten.unique")


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.pass_depth = 0
        self.counts = Counter()
        self.bookkeeping_ops = Counter()
        self.syncs = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNC_OPS):
            self.syncs[name] += 1
        if not name.startswith("profiler."):
            self.counts["pass" if self.pass_depth else "bookkeeping"] += 1
            if not self.pass_depth:
                self.bookkeeping_ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args, **kwargs) -> dict:
    """Run fn(*args, **kwargs) once; return {"total", "pass", "bookkeeping", "bookkeeping_ops", "host_syncs"}."""
    counter = _Counter()

    @contextlib.contextmanager
    def marker():
        counter.pass_depth += 1
        try:
            yield
        finally:
            counter.pass_depth -= 1

    prev, fast._pass_marker = fast._pass_marker, marker
    try:
        with counter:
            fn(*args, **kwargs)
    finally:
        fast._pass_marker = prev
    c = counter.counts
    return {"total": c["pass"] + c["bookkeeping"], "pass": c["pass"], "bookkeeping": c["bookkeeping"],
            "bookkeeping_ops": dict(counter.bookkeeping_ops), "host_syncs": dict(counter.syncs)}
