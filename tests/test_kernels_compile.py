"""Kernels compile for a real GPU (sm_90 PTX), on a machine without one: Triton's CPU interpreter runs code
the compiler refuses (the first logits_process kernel passed every interpreter test and failed to compile on
the H100: a name assigned with two shapes in the branches of an `if`). Compilation needs no device; it runs
in a subprocess because the test session sets TRITON_INTERPRET=1 (conftest), which replaces every
@triton.jit function by an interpreted one at import."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, sys, importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod, kernel, types, constexprs = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(mod), kernel)
consts = {k: getattr(importlib.import_module(mod), v) if isinstance(v, str) else v for k, v in constexprs.items()}
sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
assert ".entry" in k.asm["ptx"], "no PTX entry"
print("ok")
"""

F32, I32, I64, BF16 = "*fp32", "*i32", "*i64", "*bf16"
CASES = {
    "logits_process": ("pixtral_rt.kernels.logits_process", "_logits_process_kernel",
                       {"logits_ptr": F32, "out_ptr": F32, "slots_ptr": I32, "ctl_ptr": I32, "step_ptr": I64,
                        "min_tokens_ptr": I64, "rep_ptr": F32, "freq_ptr": F32, "pres_ptr": F32,
                        "n_sparse_ptr": I32, "counts_ptr": I32, "prompt_bits_ptr": I32, "sparse_bits_ptr": I32,
                        "sparse_ids_ptr": I32, "sparse_bias_ptr": F32, "sparse_ban_ptr": I32},
                       {"BLOCK": "BLOCK", "LANES": "SPARSE_LANES"}),
    "token_bitmask": ("pixtral_rt.kernels.token_bitmask", "_token_bitmask_kernel",
                      {"logits_ptr": F32, "mask_ptr": I32, "flag_ptr": I32}, {"BLOCK": "BLOCK"}),
    # int4 (W4A16) kernels, bf16 as on the GPU (the interpreter cannot run bf16), the 12B's plane / group
    "int4_gemv": ("pixtral_rt.kernels.int4_gemv", "_int4_gemv_kernel",
                  {"x_ptr": BF16, "w_ptr": I32, "s_ptr": BF16, "y_ptr": BF16},
                  {"BLOCK_N": 16, "PLANE": 128, "GROUP": 128, "PEEL": True, "USE_PDL": True}),
    "int4_gemv_v": ("pixtral_rt.kernels.int4_gemv", "_int4_gemv_v_kernel",     # the inline-PTX nibbles (ASM)
                    {"x_ptr": BF16, "w_ptr": I32, "s_ptr": BF16, "y_ptr": BF16},
                    {"BLOCK_N": 4, "PLANE": 128, "GROUP": 128, "VEC": 4, "ASM": True, "PEEL": True, "USE_PDL": True}),
    "int4_gemm_skinny": ("pixtral_rt.kernels.int4_gemm", "_int4_gemm_kernel",
                         {"x_ptr": BF16, "w_ptr": I32, "s_ptr": BF16, "y_ptr": BF16},
                         {"BLOCK_M": 16, "BLOCK_N": 64, "PLANE": 128, "GROUP": 128, "GROUP_M": 1,
                          "PRECISION": "HALF_PRECISION", "ASM": True, "BLOCK_P": 0}),
    "int4_gemm_skinny_block_p": ("pixtral_rt.kernels.int4_gemm", "_int4_gemm_kernel",
                                 {"x_ptr": BF16, "w_ptr": I32, "s_ptr": BF16, "y_ptr": BF16},
                                 {"BLOCK_M": 64, "BLOCK_N": 128, "PLANE": 128, "GROUP": 128, "GROUP_M": 1,
                                  "PRECISION": "HALF_PRECISION", "ASM": True, "BLOCK_P": 64}),
    "int4_gemm_prefill": ("pixtral_rt.kernels.int4_gemm", "_int4_gemm_kernel",
                          {"x_ptr": BF16, "w_ptr": I32, "s_ptr": F32, "y_ptr": BF16},
                          {"BLOCK_M": 128, "BLOCK_N": 64, "PLANE": 128, "GROUP": 128, "GROUP_M": 8,
                           "PRECISION": "HALF_PRECISION", "ASM": False, "BLOCK_P": 0}),
    "int4_dequant": ("pixtral_rt.kernels.int4_dequant", "_int4_dequant_kernel",
                     {"w_ptr": I32, "s_ptr": BF16, "out_ptr": BF16}, {"BLOCK_N": 32, "PLANE": 128, "GROUP": 128}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_sm90(name):
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES[name])], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr.lower() and "not found" in r.stderr.lower():
        pytest.skip(f"no ptxas on this machine to build sm_90 code: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
