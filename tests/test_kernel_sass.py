"""benchmarks/kernel_sass.py: the offline sm_90 compile + SASS count works on this machine (no GPU), and the 3-D
int4 GEMV's inline PTX (one lop3 per nibble) takes effect: its main loop issues fewer instructions per weight
than the 2-D plane kernel's. Run in a subprocess: the kernels must be compiled, not interpreted, and this
session's conftest sets TRITON_INTERPRET=1 before Triton is imported."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton build has no NVIDIA backend to compile sm_90 with")
def test_kernel_sass_counts_int4_gemv_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_sass", "--cases", "int4_gemv_w2,int4_gemv_v_w2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines() if ln.startswith("int4_gemv")}
    assert set(rows) == {"int4_gemv_w2", "int4_gemv_v_w2"}, out.stdout
    per_weight = {k: float(v[6]) for k, v in rows.items()}          # the instr/w column
    assert all(v > 1 for v in per_weight.values()), out.stdout       # a loop was found and counted
    assert per_weight["int4_gemv_v_w2"] < 0.7 * per_weight["int4_gemv_w2"], out.stdout
