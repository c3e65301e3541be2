"""Count the aten ops a step dispatches, split into model passes and bookkeeping.

Every aten op is a kernel launch on a GPU without CUDA graphs, so the op count is the launch count a step pays.
`count_ops(fn)` runs `fn` under a TorchDispatchMode; regions that the fast step marks with `fast.model_pass()`
(forward, loss, backward, and the label counts the losses divide by: per micro-batch work, as the passes are) are
counted as "pass", the rest as "bookkeeping". The reference step has no markers, so there "bookkeeping" equals
"total" and means nothing. Profiler bookkeeping ops (`profiler.*`) are not kernels and are skipped.
Ops that read a value back to the host (`.item()`, `bool(t)`, `nonzero`, `equal`: a host sync on a GPU,
fatal inside a CUDA-graph capture) are counted apart as "host_syncs" — on the CPU too, where they cost nothing,
so that a CPU test can prove a step free of them. Reads of tensors that stay on the host in a GPU run as well
(`host_resident`, e.g. a non-fused optimizer's step counters) are no device sync and are left out.
"launches" leaves out the ops that launch no kernel on a GPU: views and other metadata ops (`view`, `t`,
`slice`, `detach`, ...) and bare allocations (`empty`); about half of a model pass's aten ops are of that kind.
It adds the package's Triton kernels, which are launched past the dispatcher (kernels/launches.py counts them:
"triton_launches"; on the CPU they run only under Triton's interpreter).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import fast
from .kernels import launches


NO_KERNEL_OPS = ("aten._unsafe_view", "aten._reshape_alias", "aten.empty", "aten.empty_strided", "aten.new_empty",
                 "aten.new_empty_strided", "aten.resize_")  # besides the view ops (OpOverload.is_view)
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select",
            "aten._unique", "aten.unique")


class _Counter(TorchDispatchMode):
    def __init__(self, host_resident=()):
        super().__init__()
        self.pass_depth = 0
        self.counts = Counter()
        self.bookkeeping_ops = Counter()
        self.syncs = Counter()
        self.host_storages = {t.untyped_storage().data_ptr() for t in host_resident}

    def _reads_back(self, name, args, kwargs) -> bool:
        """Whether an op reads a device value back to the host: the scalar reads and the data-dependent shapes
        (nonzero, boolean-mask indexing, repeat_interleave without output_size). `.tolist()` and `.cpu()` cannot be
        told from host work on the CPU; on a GPU, torch's sync debug mode (graphs.py) catches those too."""
        if name.startswith(SYNC_OPS):
            return not (args and isinstance(args[0], torch.Tensor)
                        and args[0].untyped_storage().data_ptr() in self.host_storages)
        if name.startswith(("aten.index.Tensor", "aten.index_put")):
            indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name.startswith("aten.repeat_interleave"):
            return kwargs.get("output_size") is None
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self._reads_back(name, args, kwargs or {}):
            self.syncs[name] += 1
        if not name.startswith("profiler."):
            self.counts["pass" if self.pass_depth else "bookkeeping"] += 1
            if not (func.is_view or name.startswith(NO_KERNEL_OPS)):
                self.counts["launches"] += 1
            if not self.pass_depth:
                self.bookkeeping_ops[name] += 1
        return func(*args, **(kwargs or {}))

    def triton_launch(self, kernel: str):
        self.counts["launches"] += 1
        self.counts["triton"] += 1
        if not self.pass_depth:
            self.bookkeeping_ops[f"triton.{kernel}"] += 1


def host_resident_scalars(optimizer) -> list:
    """The optimizer state torch keeps on the host in a GPU run too: the step counters of an optimizer that is
    neither fused nor capturable (reading them is no device sync)."""
    group = optimizer.param_groups[0]
    if group.get("fused") or group.get("capturable"):
        return []
    return [st["step"] for st in optimizer.state.values() if torch.is_tensor(st.get("step"))]


def count_ops(fn, *args, host_resident=(), **kwargs) -> dict:
    """Run fn(*args, **kwargs) once; return {"total", "pass", "bookkeeping", "launches", "triton_launches",
    "bookkeeping_ops", "host_syncs"} ("total" and its parts count aten ops; "bookkeeping_ops" names them, and the
    Triton kernels launched outside the passes as "triton.NAME").
    host_resident: tensors whose reads are not counted as host syncs (see the module docstring)."""
    counter = _Counter(host_resident)

    @contextlib.contextmanager
    def marker():
        counter.pass_depth += 1
        try:
            yield
        finally:
            counter.pass_depth -= 1

    prev, fast._pass_marker = fast._pass_marker, marker
    try:
        with counter, launches.observed(counter.triton_launch):
            fn(*args, **kwargs)
    finally:
        fast._pass_marker = prev
    c = counter.counts
    return {"total": c["pass"] + c["bookkeeping"], "pass": c["pass"], "bookkeeping": c["bookkeeping"],
            "launches": c["launches"], "triton_launches": c["triton"],
            "bookkeeping_ops": dict(counter.bookkeeping_ops),
            "host_syncs": dict(counter.syncs)}
