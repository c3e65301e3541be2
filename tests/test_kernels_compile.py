"""The Triton kernels compiled for real, for the H100/H200 (sm_90), on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, set by conftest.py here) checks the kernels' maths, but neither that the
compiler accepts them nor the code it makes. Triton compiles ahead of time for a named target without a device,
so each kernel goes through the whole pipeline to a cubin here, and the PTX of the memory-bound kernels is
checked for what lets them stream at copy speed: with a length divisible by 16 (FlatLoRA pads its buffers to a
multiple of 64) and 16-byte aligned buffers (as torch allocates them), every access to a flat buffer is a
128-bit vector load or store. Only the 0-dim scalars (ss in, the norm or a partial sum out) are 32-bit. The
model kernels (model_kernels.py) are compiled as the 7B shape runs them: bf16 tensors, rows of 4096, the
rounding to bf16 on (off for Gemma's norm, which rounds once), both gate activations, the rotary kernel in the
attention's layout (strides multiples of the head size) both ways, the cross entropy at Llama-2's vocabulary with
and without softcapping; their only scalar accesses are the norm's one rstd per row and the cross entropy's
target, target logit and loss per row.

The compiler runs in a child process without TRITON_INTERPRET: Triton reads the variable at import time and
while compiling, and a process that imported it in interpreter mode cannot compile for real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# kernel -> (scalar loads, scalar stores) of its PTX; None: only compiled. The sumsq finish kernel reads the
# n/BLOCK partials, whose count need not be divisible by anything (a rounding error of the step's traffic).
KERNELS = {
    "_sumsq_partial_kernel": (0, 1),
    "_sumsq_finish_kernel": None,
    "_normalize_perturb_kernel": (1, 1),
    "_restore_combine_kernel": (0, 0),
    "_rms_norm_fwd_kernel": (0, 1),
    "_rms_norm_fwd_kernel_unit_offset": (0, 1),
    "_rms_norm_bwd_kernel": (1, 0),
    "_gated_fwd_kernel_silu": (0, 0),
    "_gated_bwd_kernel_silu": (0, 0),
    "_gated_fwd_kernel_gelu_tanh": (0, 0),
    "_gated_bwd_kernel_gelu_tanh": (0, 0),
    "_rope_kernel": (0, 0),
    "_rope_kernel_transposed": (0, 0),
    "_cross_entropy_grad_kernel": (2, 1),  # a row's target and its logit in, its loss out
    "_cross_entropy_grad_kernel_softcap": (2, 1),
}

COMPILE = r"""
import json, re, sys
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from booster_fast.kernels import booster_kernels as bk, model_kernels as mk

# the launch configuration of each kernel variant, as the launchers use it:
# (module, kernel, constexprs, num_warps, tensor type)
rows = {"BLOCK_N": 4096}  # the 7B shape's hidden size: _row_settings gives 16 warps
row_warps = mk._row_settings(4096)[1]
launch = {"_sumsq_partial_kernel": (bk, None, {"BLOCK": bk.BLOCK}, bk.NUM_WARPS, "*fp32"),
          "_sumsq_finish_kernel": (bk, None, {"BLOCK_R": bk.BLOCK_R}, bk.NUM_WARPS, "*fp32"),
          "_normalize_perturb_kernel": (bk, None, {"BLOCK": bk.BLOCK}, bk.NUM_WARPS, "*fp32"),
          "_restore_combine_kernel": (bk, None, {"BLOCK": bk.BLOCK}, bk.NUM_WARPS, "*fp32"),
          "_rms_norm_fwd_kernel": (mk, None, {"ROUND": True, **rows}, row_warps, "*bf16"),
          "_rms_norm_fwd_kernel_unit_offset": (mk, "_rms_norm_fwd_kernel", {"ROUND": False, **rows}, row_warps,
                                               "*bf16"),
          "_rms_norm_bwd_kernel": (mk, None, rows, row_warps, "*bf16")}
for act, code in (("silu", mk.SILU), ("gelu_tanh", mk.GELU_TANH)):
    for way in ("fwd", "bwd"):
        launch[f"_gated_{way}_kernel_{act}"] = (mk, f"_gated_{way}_kernel", {"ACT": code, "ROUND": True,
                                                "BLOCK": mk.BLOCK}, mk.NUM_WARPS, "*bf16")
block_t, block_h, block_d, rope_warps = mk._rope_settings(32, 128)  # the 7B shape's heads
for name, transposed in (("_rope_kernel", False), ("_rope_kernel_transposed", True)):
    launch[name] = (mk, "_rope_kernel", {"TRANSPOSED": transposed, "ROUND": True, "BLOCK_T": block_t,
                                         "BLOCK_H": block_h, "BLOCK_D": block_d}, rope_warps, "*bf16")
for name, softcap in (("_cross_entropy_grad_kernel", False), ("_cross_entropy_grad_kernel_softcap", True)):
    launch[name] = (mk, "_cross_entropy_grad_kernel", {"SOFTCAP": softcap, "BLOCK_V": mk.CE_BLOCK}, 16, "*bf16")
out = {}
for name in sys.argv[1:]:
    module, kernel, constexprs, num_warps, tensor = launch[name]
    jit = getattr(module, kernel or name)
    signature, attrs = {}, {}
    for i, arg in enumerate(jit.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):  # torch allocations: 16-byte aligned (G_f = G[1]: 256-byte, by the padding)
            kind = {"rstd_ptr": "*fp32", "loss_ptr": "*fp32", "t_ptr": "*i64"}.get(arg, tensor)
            signature[arg], attrs[(i,)] = kind, [["tt.divisibility", 16]]
        elif arg in ("n", "half", "V") or arg.startswith(("sx_", "sy_", "sc_")):
            # the flat buffers' length (padded to a multiple of 64), a row length, a half head (64), the rotary
            # kernel's strides (multiples of the 7B shape's head size, 128) and Llama-2's vocabulary (32,000):
            # Triton marks them divisible
            signature[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32" if arg in ("num_partials", "T", "heads", "ignore_index") else "fp32"
    k = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    acc = Counter(f"{op}{vec}" for op, vec in re.findall(r"\b(ld|st)\.global((?:\.v\d)?)\.\w+", k.asm["ptx"]))
    out[name] = {"cubin_bytes": len(k.asm.get("cubin") or b""), "accesses": dict(acc)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE, *KERNELS], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode and "ImportError" in proc.stderr and "triton" in proc.stderr:
        pytest.skip("this Triton has no ahead-of-time compile API in the form used here: "
                    + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"compiling the kernels failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_for_hopper_with_128_bit_accesses(compiled, name):
    result = compiled[name]
    assert result["cubin_bytes"] > 0, f"{name}: no cubin"
    if KERNELS[name] is None:
        return
    scalar_loads, scalar_stores = KERNELS[name]
    acc = result["accesses"]
    assert acc.get("ld.v4", 0) > 0, f"{name}: no 128-bit loads: {acc}"
    assert acc.get("ld", 0) == scalar_loads and acc.get("st", 0) == scalar_stores, \
        f"{name}: 32-bit accesses beyond its scalars: {acc}"
    assert not acc.get("ld.v2") and not acc.get("st.v2"), f"{name}: 64-bit accesses: {acc}"
