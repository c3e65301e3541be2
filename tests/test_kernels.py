"""Fused flat-buffer kernels against the float64 references, for both backends.

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1, so backend="triton" runs the real kernels with
numpy. Sizes are irregular (not multiples of BLOCK), data are fresh random normals per case (never zeros),
and every output is poisoned with NaN before the op so a missed element cannot pass by accident.
"""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from booster_fast.kernels import (BLOCK, kernel_errors, launch_constants, measure_bandwidth, measure_launch_constants,
                                  normalize_perturb_, restore_combine_, sumsq)
from booster_fast.kernels.reference import normalize_perturb_ref, restore_combine_ref, sumsq_ref

ALPHA, LAMB, EPS = 0.1, 5.0, 1e-7
BACKENDS = ["torch", "triton"]
BIG = 1823 * 781  # 1,423,763: irregular, > 300 blocks; run once per op and backend (the interpreter is slow)
SIZES = [1, 7, 1023, 1024, 1025, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5, 65537, BIG]
# dtype -> (atol, rtol) against the float64 reference. Element-wise ops are a few fp32 roundings deep
# (atol covers cancellation in G_f + lamb*G_h, |values| up to ~25); sumsq gets a relative bound: CPU
# torch.dot's accumulation is the BLAS library's (below), the Triton kernel's a tree (~1e-8).
TOLERANCES = {torch.float32: (1e-5, 1e-5)}
SUMSQ_TOLERANCES = {torch.float32: (0.0, 1e-5)}
# torch.dot's accumulation order is the BLAS library's and the thread count's: one thread sums long runs in
# sequence, whose error grows like sqrt(n)·eps (~7e-5 at BIG; measured 1.4e-5 on an AMD EPYC at one thread)
TORCH_SUMSQ_TOLERANCES = {torch.float32: (0.0, 1e-4)}
# The step W0 - W = s * G_h is ~1e-4 at BIG, below TOLERANCES' atol, so it is checked on its own: atol
# covers the rounding of W (|W| < ~6, ulp < 5e-7), rtol catches a wrong scale s.
STEP_TOLERANCES = {torch.float32: (2e-6, 1e-3)}


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _gen(*key) -> torch.Generator:
    """A generator seeded per test case, so every case gets its own (reproducible) data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _buffers(n: int, g: torch.Generator, device="cpu"):
    """W, G_h, G_f random normal; B poisoned with NaN."""
    W, G_h, G_f = (torch.randn(n, generator=g).to(device) for _ in range(3))
    B = torch.full((n,), float("nan"), device=device)
    return W, B, G_h, G_f


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, table=TOLERANCES) -> None:
    atol, rtol = table[actual.dtype]
    a, e = actual.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    ok = torch.isclose(a, e, atol=atol, rtol=rtol)
    if bool(ok.all()):
        return
    err = (a - e).abs().nan_to_num(float("inf"))
    idx = int(err.reshape(-1).argmax())
    where = tuple(torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
    raise AssertionError(
        f"{what}: {int((~ok).sum())}/{ok.numel()} elements outside atol={atol}, rtol={rtol}; "
        f"max abs err {err.reshape(-1)[idx].item():.3e} at index {tuple(int(i) for i in where)} "
        f"(actual {a.reshape(-1)[idx].item()!r}, expected {e.reshape(-1)[idx].item()!r}); "
        f"NaNs in actual: {int(a.isnan().sum())}"
    )


class OpCounter(TorchDispatchMode):
    """Records every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------------
# correctness per op
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_sumsq(n, backend):
    x = torch.randn(n, generator=_gen("sumsq", n, backend))
    x_before = x.clone()
    out = torch.full((), float("nan"))
    res = sumsq(x, out=out, backend=backend)
    assert res is out, "sumsq(out=...) must return the out tensor"
    assert res.dim() == 0 and res.dtype == torch.float32 and res.device == x.device
    assert_close(res, sumsq_ref(x), f"sumsq[{backend}, n={n}]",
                 TORCH_SUMSQ_TOLERANCES if backend == "torch" else SUMSQ_TOLERANCES)
    assert torch.equal(x, x_before), "sumsq modified its input"
    # without out=: a fresh 0-dim tensor, bit-identical to the out= result (deterministic reduction)
    res2 = sumsq(x, backend=backend)
    assert res2.dim() == 0 and torch.equal(res2, out), f"sumsq not deterministic: {res2.item()} vs {out.item()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_normalize_perturb(n, backend):
    W, B, G_h, G_f = _buffers(n, _gen("normalize", n, backend))
    ss = sumsq_ref(G_h).to(torch.float32)
    W0, G_h0, G_f0, ss0 = W.clone(), G_h.clone(), G_f.clone(), ss.clone()
    out = torch.full((), float("nan"))
    norm = normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, EPS, out=out, backend=backend)

    ref = normalize_perturb_ref(W0, G_h0, G_f0, ss0, ALPHA, LAMB, EPS)
    tag = f"normalize_perturb_[{backend}, n={n}]"
    assert norm is out
    assert torch.equal(norm, ss0.sqrt()), f"{tag}: norm {norm.item()!r} != sqrt(ss) {ss0.sqrt().item()!r}"
    assert torch.equal(B, W0), f"{tag}: backup B is not a bit-exact copy of W"
    assert torch.equal(G_h, torch.zeros_like(G_h)), f"{tag}: G_h not exactly zero ({int(G_h.count_nonzero())} nonzero)"
    assert_close(W, ref["W"], f"{tag} W")
    assert_close(W0 - W, ref["B"] - ref["W"], f"{tag} step W0 - W", STEP_TOLERANCES)
    assert_close(G_f, ref["G_f"], f"{tag} G_f")
    assert torch.equal(ss, ss0), f"{tag}: ss was modified"
    assert not torch.equal(W, W0), f"{tag}: W did not move"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm, eps", [(1e-4, EPS), (1e-6, EPS), (1e-6, 1e-5)])
def test_normalize_perturb_at_a_small_norm(norm, eps, backend):
    """Where ‖G_h‖ is near eps the step's scale α/(‖G_h‖ + eps) depends on where eps is added (random normals
    have norms of ~30, where it is invisible): at 1e-4 eps under the root would shrink the step by two thirds.
    An eps other than the default, larger than the norm, must be the one used (the step is then 11x smaller)."""
    n = 1025
    W, B, G_h, G_f = _buffers(n, _gen("small-norm", norm, backend))
    G_h.mul_(norm / G_h.norm())
    ss = sumsq_ref(G_h).to(torch.float32)
    W0, G_h0, G_f0 = W.clone(), G_h.clone(), G_f.clone()
    normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, eps, backend=backend)
    ref = normalize_perturb_ref(W0, G_h0, G_f0, ss, ALPHA, LAMB, eps)
    expected_step = ALPHA * G_h0.double() / (norm + eps)
    assert torch.allclose(ref["B"] - ref["W"], expected_step, rtol=1e-6, atol=0), "the float64 reference's step"
    assert_close(W0 - W, expected_step, f"normalize_perturb_[{backend}, norm={norm}, eps={eps}] step W0 - W",
                 STEP_TOLERANCES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_restore_combine(n, backend):
    g = _gen("restore", n, backend)
    B, G_h, G_f = (torch.randn(n, generator=g) for _ in range(3))
    W = torch.full((n,), float("nan"))  # restore must overwrite every element
    B0, G_h0, G_f0 = B.clone(), G_h.clone(), G_f.clone()
    restore_combine_(W, B, G_h, G_f, LAMB, backend=backend)

    ref = restore_combine_ref(B0, G_h0, G_f0, LAMB)
    tag = f"restore_combine_[{backend}, n={n}]"
    assert torch.equal(W, B0), f"{tag}: W is not a bit-exact copy of B"
    assert_close(G_f, ref["G_f"], f"{tag} G_f")
    assert torch.equal(B, B0) and torch.equal(G_h, G_h0), f"{tag}: B or G_h was modified"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1025, 3 * BLOCK + 5])
def test_full_step_restores_bit_exact(n, backend):
    """sumsq -> normalize_perturb_ -> (grad at the perturbed point lands in G_h) -> restore_combine_."""
    g = _gen("step", n, backend)
    W, B, G_h, G_f = _buffers(n, g)
    W0, G_h0, G_f0 = W.clone(), G_h.clone(), G_f.clone()
    G_2 = torch.randn(n, generator=g)

    ss = sumsq(G_h, backend=backend)
    norm = normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, EPS, backend=backend)
    G_h.add_(G_2)  # autograd accumulates into the zeroed buffer
    restore_combine_(W, B, G_h, G_f, LAMB, backend=backend)

    tag = f"step[{backend}, n={n}]"
    assert torch.equal(W, W0), f"{tag}: W after restore differs from the original W"
    assert_close(norm, sumsq_ref(G_h0).sqrt(), f"{tag} norm", SUMSQ_TOLERANCES)
    # G_f = G_f + lamb * G_h(w) - lamb * G_h(w~)
    assert_close(G_f, G_f0.double() + LAMB * G_h0.double() - LAMB * G_2.double(), f"{tag} G_f")


# ---------------------------------------------------------------------------------------------------------
# torch-path op counts (the step's bookkeeping has a budget of 15 dispatched ops, 18 with the non-finite guard)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto on CPU tensors = the torch path
def test_torch_path_op_counts(backend):
    n = 1025
    W, B, G_h, G_f = _buffers(n, _gen("ops", backend))
    out, norm_out = torch.empty(()), torch.empty(())

    counts = {}
    for name, fn in [
        ("sumsq", lambda: sumsq(G_h, backend=backend)),
        ("sumsq(out=)", lambda: sumsq(G_h, out=out, backend=backend)),
        ("normalize_perturb_", lambda: normalize_perturb_(W, B, G_h, G_f, out, ALPHA, LAMB, backend=backend)),
        ("normalize_perturb_(out=)",
         lambda: normalize_perturb_(W, B, G_h, G_f, out, ALPHA, LAMB, out=norm_out, backend=backend)),
        ("restore_combine_", lambda: restore_combine_(W, B, G_h, G_f, LAMB, backend=backend)),
    ]:
        with OpCounter() as c:
            fn()
        counts[name] = c.ops
    assert len(counts["sumsq"]) == 1, counts["sumsq"]
    assert len(counts["sumsq(out=)"]) == 1, counts["sumsq(out=)"]
    assert len(counts["normalize_perturb_"]) <= 6, counts["normalize_perturb_"]
    assert len(counts["normalize_perturb_(out=)"]) <= 6, counts["normalize_perturb_(out=)"]
    assert len(counts["restore_combine_"]) <= 2, counts["restore_combine_"]
    assert not any("item" in op or "_local_scalar_dense" in op for ops in counts.values() for op in ops), counts


def test_triton_backend_does_not_fall_back_to_torch():
    """backend="triton" must run the kernel: no torch compute op may be dispatched. (Under TRITON_INTERPRET=1
    the interpreter itself dispatches allocations and a copy_ per argument; on CUDA only the allocations.)"""
    n = 2 * BLOCK + 3
    W, B, G_h, G_f = _buffers(n, _gen("no-fallback"))
    with OpCounter() as c:
        ss = sumsq(G_h, backend="triton")
        normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, backend="triton")
        restore_combine_(W, B, G_h, G_f, LAMB, backend="triton")
    allowed = ("aten.empty", "aten.new_empty", "aten.set_", "aten.copy_")
    compute = [op for op in c.ops if not op.startswith(allowed)]
    assert not compute, f"torch compute ops on the triton path: {compute}"


def test_op_counts_see_the_triton_launches():
    """Triton launches bypass torch's dispatcher: booster_fast.opcount counts them through kernels/launches.py,
    by name when they are bookkeeping (outside a model pass), and the model's fused kernels inside the passes."""
    from booster_fast.kernels.model_kernels import rms_norm
    from booster_fast.opcount import count_ops

    n = 2 * BLOCK + 3
    W, B, G_h, G_f = _buffers(n, _gen("launch-count"))

    def bookkeeping(backend):
        ss = sumsq(G_h, backend=backend)  # Triton: partial sums, then the finish
        normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, backend=backend)
        restore_combine_(W, B, G_h, G_f, LAMB, backend=backend)

    ops = count_ops(bookkeeping, "triton")
    assert ops["triton_launches"] == 4
    assert {k: v for k, v in ops["bookkeeping_ops"].items() if k.startswith("triton.")} == {
        "triton._sumsq_partial_kernel": 1, "triton._sumsq_finish_kernel": 1,
        "triton._normalize_perturb_kernel": 1, "triton._restore_combine_kernel": 1}
    assert ops["launches"] >= 4
    assert count_ops(bookkeeping, "torch")["triton_launches"] == 0

    x = torch.randn(3, 5, 40, generator=_gen("launch-count-norm"), requires_grad=True)
    weight = torch.randn(40, generator=_gen("launch-count-weight"))
    ops = count_ops(lambda: rms_norm(x, weight, 1e-6).square().sum().backward())
    assert ops["triton_launches"] == 2  # forward and backward


# ---------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------
def _bad_cases():
    n = 37
    f = lambda: torch.randn(n)  # noqa: E731
    ss = torch.tensor(1.0)
    W, B, G_h, G_f = f(), f(), f(), f()
    cases = {
        "sumsq float64": lambda: sumsq(torch.randn(n, dtype=torch.float64)),
        "sumsq bfloat16": lambda: sumsq(torch.randn(n).bfloat16()),
        "sumsq 2-D": lambda: sumsq(torch.randn(4, 8)),
        "sumsq non-contiguous": lambda: sumsq(torch.randn(2 * n)[::2]),
        "sumsq empty": lambda: sumsq(torch.empty(0)),
        "sumsq out 1-D": lambda: sumsq(W, out=torch.empty(1)),
        "sumsq out float64": lambda: sumsq(W, out=torch.empty((), dtype=torch.float64)),
        "sumsq out other device": lambda: sumsq(W, out=torch.empty((), device="meta")),
        "sumsq bad backend": lambda: sumsq(W, backend="cuda"),
        "sumsq not a tensor": lambda: sumsq([1.0, 2.0]),
        "normalize length mismatch": lambda: normalize_perturb_(W, B, torch.randn(n + 1), G_f, ss, ALPHA, LAMB),
        "normalize device mismatch": lambda: normalize_perturb_(W, torch.empty(n, device="meta"), G_h, G_f, ss,
                                                                ALPHA, LAMB),
        "normalize dtype": lambda: normalize_perturb_(W, B, G_h, G_f.double(), ss, ALPHA, LAMB),
        "normalize non-contiguous": lambda: normalize_perturb_(W, B, torch.randn(2 * n)[::2], G_f, ss, ALPHA, LAMB),
        "normalize ss 1-D": lambda: normalize_perturb_(W, B, G_h, G_f, torch.ones(1), ALPHA, LAMB),
        "normalize ss float64": lambda: normalize_perturb_(W, B, G_h, G_f, torch.tensor(1.0, dtype=torch.float64),
                                                           ALPHA, LAMB),
        "normalize aliased W/B": lambda: normalize_perturb_(W, W, G_h, G_f, ss, ALPHA, LAMB),
        "normalize overlapping views": lambda: (lambda buf: normalize_perturb_(W, B, buf[:n], buf[1:n + 1], ss,
                                                                               ALPHA, LAMB))(torch.randn(n + 1)),
        "normalize views sharing their last element": lambda: (lambda buf: normalize_perturb_(
            W, B, buf[:n], buf[n - 1:], ss, ALPHA, LAMB))(torch.randn(2 * n - 1)),
        "normalize bad backend": lambda: normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, backend="numpy"),
        "restore 2-D": lambda: restore_combine_(W.view(1, n), B.view(1, n), G_h.view(1, n), G_f.view(1, n), LAMB),
        "restore length mismatch": lambda: restore_combine_(W, B[:-1], G_h, G_f, LAMB),
        "restore aliased G_h/G_f": lambda: restore_combine_(W, B, G_h, G_h, LAMB),
        "restore dtype": lambda: restore_combine_(W.half(), B, G_h, G_f, LAMB),
    }
    return cases, (W, B, G_h, G_f)


_CASES, _ = _bad_cases()


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bad_inputs_raise_value_error(case):
    cases, buffers = _bad_cases()
    before = [t.clone() for t in buffers]
    with pytest.raises(ValueError):
        cases[case]()
    # validation happens before any write
    assert all(torch.equal(a, b) for a, b in zip(buffers, before)), f"{case}: buffers changed before the error"


def test_measure_bandwidth_refuses_cpu(monkeypatch):
    with pytest.raises(RuntimeError, match="CUDA"):
        measure_bandwidth(n=1024, device="cpu")
    with pytest.raises(RuntimeError, match="measure_launch_constants needs a CUDA device"):
        measure_launch_constants(1024, 4, n=1024, device="cpu")
    # either condition alone refuses: a CPU device on a machine with CUDA, a CUDA device where none is usable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="measure_bandwidth needs a CUDA device"):
        measure_bandwidth(n=1024, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="measure_launch_constants needs a CUDA device"):
        measure_launch_constants(1024, 4, n=1024, device="cuda")


@pytest.mark.parametrize("block, warps", [(128, 4), (256, 2), (8192, 16)])
def test_kernels_compute_the_same_at_other_launch_constants(block, warps):
    """The GPU suite's sweep runs the kernels at other (BLOCK, num_warps) pairs (launch_constants): each pair
    computes the float64 reference's results (here under the interpreter; 128: many programs, and sumsq's second
    stage folding many partials), and the module's pair is back afterwards, after an error too."""
    from booster_fast.kernels import booster_kernels as bk

    default = bk.BLOCK, bk.NUM_WARPS
    n = 5 * 1024 + 37
    W, B, G_h, G_f = _buffers(n, _gen("launch constants", block, warps))
    W0, G_h0, G_f0 = W.clone(), G_h.clone(), G_f.clone()
    with launch_constants(block, warps):
        assert (bk.BLOCK, bk.NUM_WARPS) == (block, warps)
        ss = sumsq(G_h, backend="triton")
        normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, EPS, backend="triton")
        perturbed, folded = W.clone(), G_f.clone()
        G_h.copy_(G_h0 * 0.5)  # (the perturbed pass's gradient)
        restore_combine_(W, B, G_h, G_f, LAMB, backend="triton")
    assert (bk.BLOCK, bk.NUM_WARPS) == default
    assert_close(ss, sumsq_ref(G_h0), f"sumsq at {block}/{warps}", SUMSQ_TOLERANCES)
    ref = normalize_perturb_ref(W0, G_h0, G_f0, sumsq_ref(G_h0).to(torch.float32), ALPHA, LAMB, EPS)
    assert_close(perturbed, ref["W"], f"perturbed W at {block}/{warps}")
    assert_close(folded, ref["G_f"], f"G_f at {block}/{warps}")
    assert torch.equal(W, W0), "restore is not bit-exact"
    assert_close(G_f, restore_combine_ref(ref["B"], G_h0 * 0.5, ref["G_f"], LAMB)["G_f"], "combined G_f")
    with pytest.raises(KeyError), launch_constants(block, warps):
        raise KeyError("inside")
    assert (bk.BLOCK, bk.NUM_WARPS) == default
    for bad in ((1000, 4), (8, 4), (1024, 3), (1024, 64)):
        with pytest.raises(ValueError, match="must be a power of two"), launch_constants(*bad):
            pass
    assert (bk.BLOCK, bk.NUM_WARPS) == default


def test_the_byte_counts_are_each_kernels_reads_and_writes():
    """The GB/s figures divide these bytes by the time: every fp32 (booster kernels) or bf16 (model kernels)
    element each kernel must read or write once, as listed above the kernels."""
    from booster_fast.kernels.bandwidth import BYTES_PER_ELEM, MODEL_BYTES_PER_ELEM

    assert BYTES_PER_ELEM == {"copy": 8, "sumsq": 4, "normalize_perturb_": 28, "restore_combine_": 20}
    assert MODEL_BYTES_PER_ELEM == {"rms_norm": (4, 6), "silu_mul": (6, 10), "rope": (4, 4), "cross_entropy": (6,)}


def test_bandwidth_arithmetic():
    """GB/s are 1e9 bytes per second, and a copy moves each element twice (read and write): the copy baselines
    the kernels' fractions are taken against, bf16 for the model kernels and fp32 for the flat buffers."""
    from booster_fast.kernels.bandwidth import BYTES_PER_ELEM, copy_bytes, gb_per_s

    assert gb_per_s(6e9, 1500.0) == pytest.approx(4.0, rel=1e-12)
    assert copy_bytes(torch.empty(7, 3, dtype=torch.bfloat16)) == 84
    assert copy_bytes(torch.empty(5)) == 5 * BYTES_PER_ELEM["copy"] == 40


def test_kernel_errors_compare_every_output_with_the_torch_path(monkeypatch):
    """The bandwidth part's correctness check (here the kernels under the interpreter): fp32 rounding only; a
    kernel given λ 1 % off is caught in the output it writes wrongly (G_f), by ~1e-2."""
    import booster_fast.kernels.bandwidth as bw

    n = 3 * BLOCK + 17  # a partial last block
    errors = kernel_errors(n=n, device="cpu")
    assert set(errors) == {"sumsq", "normalize_perturb_", "restore_combine_"}
    assert all(0 <= e < 1e-6 for e in errors.values()), errors
    real = bw.restore_combine_
    monkeypatch.setattr(bw, "restore_combine_", lambda W, B, G_h, G_f, lamb, backend: real(
        W, B, G_h, G_f, lamb * 1.01 if backend == "triton" else lamb, backend=backend))
    assert kernel_errors(n=n, device="cpu")["restore_combine_"] > 5e-3


def test_model_kernel_errors_compare_fused_ops_with_the_eager_formulas():
    """The bandwidth part's check of the fused model ops (here under the interpreter, fp32, irregular sizes):
    forward and backward agree with transformers' formulas to rounding; an op that drifts by 1 % is caught."""
    from booster_fast.kernels.bandwidth import _fused_errors, model_cases

    g = torch.Generator().manual_seed(5)
    cases = model_cases(tokens=37, hidden=96, intermediate=200, heads=3, head_dim=32, g=g, dtype=torch.float32)
    for op, (inputs, fused, eager) in cases.items():
        errors = _fused_errors(inputs, fused, eager, g)
        assert set(errors) == {"fwd", "bwd"} and all(0 <= e < 1e-5 for e in errors.values()), (op, errors)
    inputs, fused, eager = cases["silu_mul"]
    errors = _fused_errors(inputs, lambda: fused() * 1.01, eager, g)
    assert errors["fwd"] > 5e-3 and errors["bwd"] > 5e-3, errors


# ---------------------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1025, BIG, 2**24 + 3])
def test_backends_agree_on_cuda(n):
    g = _gen("cuda", n)
    W, B, G_h, G_f = _buffers(n, g, device="cuda")
    G_2 = torch.randn(n, generator=g).cuda()
    ref_ss = sumsq_ref(G_h)
    ref_np = normalize_perturb_ref(W, G_h, G_f, ref_ss.float(), ALPHA, LAMB, EPS)
    results = {}
    for backend in BACKENDS:
        w, b, gh, gf = W.clone(), B.clone(), G_h.clone(), G_f.clone()
        ss = sumsq(gh, backend=backend)
        assert torch.equal(ss, sumsq(gh, backend=backend)), f"sumsq[{backend}] not deterministic on CUDA"
        assert_close(ss, ref_ss, f"cuda sumsq[{backend}, n={n}]", SUMSQ_TOLERANCES)
        norm = normalize_perturb_(w, b, gh, gf, ref_ss.float().cuda(), ALPHA, LAMB, EPS, backend=backend)
        assert torch.equal(norm, ref_ss.float().sqrt()), f"cuda norm[{backend}] != sqrt(ss)"
        assert torch.equal(b, W) and not bool(gh.any())
        assert_close(w, ref_np["W"], f"cuda W[{backend}, n={n}]")
        assert_close(gf, ref_np["G_f"], f"cuda G_f[{backend}, n={n}]")
        gh.copy_(G_2)
        restore_combine_(w, b, gh, gf, LAMB, backend=backend)
        assert torch.equal(w, W), f"cuda restore[{backend}] not bit-exact"
        assert_close(gf, restore_combine_ref(b, G_2, ref_np["G_f"], LAMB)["G_f"], f"cuda G_f after restore[{backend}]")
        results[backend] = gf
    assert_close(results["triton"], results["torch"].double(), f"cuda triton vs torch G_f (n={n})")


@pytest.mark.gpu
def test_kernels_capture_in_cuda_graph():
    n = 3 * BLOCK + 5
    W, B, G_h, G_f = _buffers(n, _gen("graph"), device="cuda")
    ss, norm = torch.empty((), device="cuda"), torch.empty((), device="cuda")

    def step():
        sumsq(G_h, out=ss)
        normalize_perturb_(W, B, G_h, G_f, ss, ALPHA, LAMB, out=norm)
        restore_combine_(W, B, G_h, G_f, LAMB)

    W0, G_h0, G_f0 = W.clone(), G_h.clone(), G_f.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for buf, start in ((W, W0), (G_h, G_h0), (G_f, G_f0)):  # capture recorded, it did not run: reset anyway
        buf.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(W, W0)
    assert_close(norm, sumsq_ref(G_h0).sqrt(), "graph norm", SUMSQ_TOLERANCES)
    assert_close(G_f, G_f0.double() + LAMB * G_h0.double(), "graph G_f")  # G_h was zero at restore


@pytest.mark.gpu
def test_measure_model_kernels_on_cuda():
    """Every fused model op timed both ways and checked against the eager formula (bf16 rounding: ~1e-2)."""
    from booster_fast.kernels import measure_cross_entropy, measure_model_kernels

    res = measure_model_kernels(tokens=1024, iters=3, warmup=1)
    for op in ("rms_norm", "silu_mul", "rope"):
        for d in ("fwd", "bwd"):
            r = res[f"{op}_{d}"]
            assert r["GBps"] > 0 and r["eager_ms"] > 0 and r["max_rel_err"] < 2e-2, (op, d, r)
    ce = measure_cross_entropy(res["copy_GBps"], rows=256, iters=3, warmup=1)  # the head's, against its torch ops
    assert ce["GBps"] > 0 and ce["eager_ms"] > 0 and ce["max_rel_err"] < 1e-2, ce


def test_the_cross_entropy_measurement_runs_on_the_cpu(monkeypatch):
    """measure_model_kernels' cross-entropy row, its timer stood in for (CUDA events need a GPU), under Triton's
    interpreter: a Python slip shows here, not on the lent GPU; the kernel agrees with its torch twin."""
    from booster_fast.kernels import bandwidth
    from booster_fast.kernels.model_kernels import available

    if not available("cpu"):
        pytest.skip("the Triton kernels run on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)")
    calls = []
    monkeypatch.setattr(bandwidth, "_time_ms", lambda fn, iters, warmup: (fn(), calls.append(fn), 2.0)[2])
    r = bandwidth.measure_cross_entropy(1000.0, iters=1, warmup=0, rows=37, vocab=301,
                                        g=torch.Generator().manual_seed(0))
    assert len(calls) == 2 and r["ms"] == r["eager_ms"] == 2.0 and r["speedup"] == 1.0
    assert r["GBps"] == pytest.approx(6 * 37 * 301 / 2e-3 / 1e9) and r["fraction_of_copy"] == r["GBps"] / 1000
    assert 0 <= r["max_rel_err"] < 1e-2, r


@pytest.mark.gpu
def test_measure_launch_constants_on_cuda():
    """One row of the GPU suite's sweep, compiled for real at a pair other than the module's: GB/s for the copy
    and each kernel, the kernels' error against the torch path at that pair, the module's pair back after."""
    from booster_fast.kernels import booster_kernels as bk

    default = bk.BLOCK, bk.NUM_WARPS
    row = measure_launch_constants(1024, 4, n=2**22, iters=5, warmup=2)
    assert (row["BLOCK"], row["num_warps"]) == (1024, 4) and (bk.BLOCK, bk.NUM_WARPS) == default
    assert all(row[f"{op}_GBps"] > 0 for op in ("copy", "sumsq", "normalize_perturb_", "restore_combine_")), row
    assert 0 <= row["max_rel_err"] < 1e-5, row


@pytest.mark.gpu
def test_measure_bandwidth_on_cuda():
    res = measure_bandwidth(n=2**22, iters=5, warmup=2)
    for op in ("copy", "sumsq", "normalize_perturb_", "restore_combine_"):
        assert res[f"{op}_GBps"] > 0 and res[f"{op}_ms"] > 0, res
    for op in ("sumsq", "normalize_perturb_", "restore_combine_"):
        assert res[f"{op}_max_rel_err"] < 1e-5, res  # the compiled kernels against the torch path
    print(res)


# ---------------------------------------------------------------------------------------------------------
# a Triton that cannot launch (no C compiler for its launcher, a GPU it does not know): the torch paths
# ---------------------------------------------------------------------------------------------------------
def test_the_launch_check_passes_where_triton_runs_and_names_what_failed(monkeypatch, caplog):
    """_launch_error launches each flat-buffer kernel once per device: None where they run and compute what they
    should on ones (here the interpreter on the CPU), the first line of the error, or the wrong sums, where not,
    logged once."""
    import logging

    from booster_fast.kernels import booster_kernels as bk

    if not isinstance(bk._sumsq_partial_kernel, InterpretedFunction):
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without CUDA)")
    bk._launch_error.cache_clear()
    try:
        assert bk._launch_error(torch.device("cpu")) is None
        assert bk.triton_unusable("cpu") is None, "the check is for CUDA devices only"

        def broken(x, *, out=None, backend="auto"):
            raise RuntimeError("Failed to compile the launcher: gcc: command not found\ncompilation terminated")

        monkeypatch.setattr(bk, "sumsq", broken)
        bk._launch_error.cache_clear()
        with caplog.at_level(logging.WARNING, logger="booster_fast"):
            for _ in range(2):
                why = bk._launch_error(torch.device("cpu"))
                assert why == "RuntimeError: Failed to compile the launcher: gcc: command not found"
        assert caplog.text.count("Triton kernels cannot launch on cpu") == 1
        assert "run as torch ops" in caplog.text

        monkeypatch.undo()
        for name, wrong in (("sumsq", lambda x, *, out=None, backend="auto": x.sum() + 1),
                            ("restore_combine_", lambda W, B, G_h, G_f, lamb, *, backend="auto": W.copy_(B)),
                            ("normalize_perturb_", lambda W, B, G_h, G_f, ss, alpha, lamb, *, backend="auto":
                             (B.copy_(W), ss.sqrt())[1])):  # a restore that forgets the combine; no perturb
            with monkeypatch.context() as m:  # a kernel that runs but computes something else: named too
                m.setattr(bk, name, wrong)
                bk._launch_error.cache_clear()
                why = bk._launch_error(torch.device("cpu"))
            assert why.startswith("Triton kernels gave wrong results on ones: sumsq, norm², perturbed, zeroed, "
                                  "restored, combined sums [")
        # every kernel launches, the second sumsq stage too (past one block)
        from booster_fast.kernels.launches import observed

        launched = []
        bk._launch_error.cache_clear()
        with observed(launched.append):
            assert bk._launch_error(torch.device("cpu")) is None
        assert sorted(set(launched)) == sorted(["_sumsq_partial_kernel", "_sumsq_finish_kernel",
                                                "_normalize_perturb_kernel", "_restore_combine_kernel"]), launched
    finally:
        bk._launch_error.cache_clear()


def test_auto_runs_the_torch_paths_and_no_fused_ops_where_triton_cannot_launch(monkeypatch):
    """On a CUDA device whose launch check failed, "auto" picks the torch path, the fused model ops are not
    available, and pinning them on is refused with the reason."""
    from booster_fast import fused_ops
    from booster_fast.cli import UsageError
    from booster_fast.kernels import booster_kernels as bk, model_kernels as mk
    from booster_fast.run_args import check_device_flags

    cuda = torch.device("cuda", 0)
    reason = "RuntimeError: Failed to compile the launcher"
    monkeypatch.setattr(bk, "_launch_error", lambda device: reason)
    assert bk.triton_unusable(cuda) == reason
    assert not bk._use_triton("auto", cuda)
    assert not mk.available(cuda)
    monkeypatch.setattr(bk, "_launch_error", lambda device: None)
    assert bk._use_triton("auto", cuda) and mk.available(cuda)

    monkeypatch.setattr(bk, "_launch_error", lambda device: reason)

    class OnCuda:  # install reads the model's device from its first parameter
        def parameters(self):
            return iter([SimpleNamespace(device=cuda)])

    with pytest.raises(ValueError, match="fused ops need Triton, which cannot launch on cuda:0: RuntimeError: Fail"):
        fused_ops.install(OnCuda())
    with pytest.raises(UsageError, match="--fused-ops on needs Triton, which cannot launch on cuda:0: RuntimeError"):
        check_device_flags(SimpleNamespace(graphs="auto", fused_ops="on"), cuda)
    check_device_flags(SimpleNamespace(graphs="auto", fused_ops="auto"), cuda)  # auto: the torch paths, no error


def test_auto_leaves_the_fused_model_ops_off_where_triton_cannot_launch(monkeypatch):
    """The fast engine's default ('auto') skips the fused model ops on a device where the kernels are not
    available (a CUDA device whose launch check failed), where pinning them on raises."""
    import booster_fast as bf
    from booster_fast import fast, fused_ops

    model, _ = bf.load_model("tiny", device="cpu", num_hidden_layers=1)
    booster = bf.Booster(bf.add_lora(model), bf.BoosterConfig(fused_ops=False, graphs="off"))
    monkeypatch.setattr(fast, "default_fused_ops", lambda device: True)  # as on CUDA
    monkeypatch.setattr(fast, "available", lambda device: False)
    monkeypatch.setattr(fused_ops, "available", lambda device: False)
    assert booster.engine._fused_ops_for(None) is False
    with pytest.raises(ValueError, match="fused ops need"):
        booster.engine._fused_ops_for(True)
