"""What a Triton kernel compiles to on Hopper, without a GPU: SASS instructions per weight in its main loop.

    python -m benchmarks.kernel_sass                       # every case below, sm_90, the installed Triton
    python -m benchmarks.kernel_sass --cases int4_gemv_w13 --dump /tmp/sass   # + the SASS of each case

Why: a decode GEMV must stream its weights at HBM speed (3.35 TB/s on an H100 SXM). An SM sub-partition issues
one warp instruction a cycle, and Hopper's integer pipe (LOP3, SHF, IADD3, PRMT, ...) has 16 lanes a
sub-partition, so a kernel that spends too many instructions per weight is bound by issue, not by memory.
Each case calls the kernel's own Python wrapper on CPU tensors of the real shapes; the launch is intercepted
(JITFunction.run), the kernel compiled for sm_90 exactly as the JIT would specialise it on the GPU (16-byte
alignment and divisibility hints from the real arguments; the int4 kernels' inline PTX, which they take on a
CUDA device only, is switched on), and the cubin disassembled (nvdisasm, shipped with
Triton). The main loop is the loop with the most instructions (its back edge is the `BRA` to its label).

Per case it prints: instructions in the loop body by pipe, weights a warp streams per loop iteration, and two
ceilings on the weight bytes a second the loop can stream on a 132-SM H100 at CLOCK_HZ (issue: one
instruction a cycle a sub-partition; integer pipe: two cycles an instruction). These are static counts and
ceilings, not timings: they say which kernels cannot reach the HBM floor however they are scheduled; the GPU
benchmarks (bench_int4.py, bench_fp8_linear.py) say how fast they are.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)        # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

N_SM = 132                # H100 SXM
SUBPARTITIONS = 4         # warp schedulers per SM
CLOCK_HZ = 1.755e9        # H100 SXM sustained clock under load
HBM_BPS = 3.35e12         # H100 SXM HBM3 peak

# opcodes that go down the integer (ALU) pipe: 16 lanes per sub-partition on sm_90, so 2 cycles a warp instruction
INT_PIPE = {"LOP3", "SHF", "IADD3", "PRMT", "SGXT", "ISETP", "LEA", "SEL", "IABS", "BMSK", "FLO", "POPC", "BREV",
            "VIADD", "VIMNMX", "IMNMX", "LOP", "SHL", "SHR", "PLOP3", "P2R", "R2P", "FSEL", "FSETP", "FMNMX", "MOV"}
FMA_PIPE = {"FFMA", "FMUL", "FADD", "IMAD", "HFMA2", "HMUL2", "HADD2", "FFMA2", "FMUL2", "FADD2", "IDP", "IDP4A"}
MEM = {"LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS", "LDSM", "UBLKCP", "UTMALDG", "SYNCS", "BAR"}


@dataclass
class Compiled:
    name: str
    cubin: bytes
    ttgir: str
    num_warps: int
    shared: int


@contextlib.contextmanager
def capture_launches(arch: int = 90):
    """Inside: every Triton launch compiles for sm_`arch` (as the JIT would on that GPU) and is not run.
    Yields the list the Compiled kernels are appended to."""
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    out: list[Compiled] = []
    orig = triton_jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        binder = triton_jit.create_function_from_signature(self.signature, self.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, options)
        src = triton.compiler.ASTSource(self, signature, constexprs, attrs)
        k = triton.compile(src, target=target, options=options.__dict__)
        out.append(Compiled(self.__name__, k.asm["cubin"], k.asm["ttgir"], options.num_warps, k.metadata.shared))
        return None

    # the int4 kernels take inline PTX where they run on a CUDA device (their _use_asm): here too
    from pixtral_rt.kernels import int4_gemm, int4_gemv
    orig_asm = int4_gemv._use_asm
    triton_jit.JITFunction.run = run
    int4_gemv._use_asm = int4_gemm._use_asm = lambda x: True
    try:
        yield out
    finally:
        triton_jit.JITFunction.run = orig
        int4_gemv._use_asm = int4_gemm._use_asm = orig_asm


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def disassemble(cubin: bytes) -> tuple[str, int]:
    """(SASS text, registers per thread)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", res)
    return sass, int(m.group(1)) if m else -1


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")


def main_loop(sass: str) -> list[tuple[str, str]]:
    """(opcode, modifiers) of the instructions of the longest loop: the span from a label to the branch back to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best: tuple[int, int] = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)\)?", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    body = []
    for line in lines[best[0]:best[1] + 1]:
        m = _INSTR.search(line)
        if m:
            body.append((m.group(1), m.group(2)))
    return body


@dataclass
class Report:
    case: str
    kernel: str
    num_warps: int
    regs: int
    shared: int
    body: int
    by_op: Counter
    int_pipe: int
    fma_pipe: int
    weights_per_warp_iter: float
    bytes_per_weight: float

    @property
    def instr_per_weight(self) -> float:
        """Instructions one thread issues per weight it streams."""
        return self.body * 32 / self.weights_per_warp_iter

    def ceilings(self) -> tuple[float, float]:
        """(issue-bound, integer-pipe-bound) weight bytes a second over the whole GPU."""
        per_cycle = N_SM * SUBPARTITIONS * CLOCK_HZ * self.weights_per_warp_iter * self.bytes_per_weight
        return per_cycle / self.body, per_cycle / max(1, 2 * self.int_pipe)


def report(case: str, c: Compiled, weights_per_cta_iter: int, bytes_per_weight: float) -> Report:
    sass, regs = disassemble(c.cubin)
    body = main_loop(sass)
    ops = Counter(op for op, _ in body)
    wide = Counter(op + mods for op, mods in body if op in MEM)
    return Report(case, c.name, c.num_warps, regs, c.shared, len(body), Counter(dict(ops, **{"mem:" + k: v for k, v in wide.items()})),
                  sum(v for k, v in ops.items() if k in INT_PIPE), sum(v for k, v in ops.items() if k in FMA_PIPE),
                  weights_per_cta_iter / c.num_warps, bytes_per_weight)


# ---------------------------------------------------------------------------------------------------- cases
LINEARS = {"wqkv": (6144, 5120), "wo": (5120, 4096), "w13": (28672, 5120), "w2": (5120, 14336)}


# the 2-D plane GEMV (vec=0) at its own best tiles of the 2b96a60 sweep (results/int4.jsonl): the decoder's
# INT4_GEMV_CONFIGS are the 3-D kernel's since e47ae14, and the old kernel at those tiles is another kernel
PLANE_GEMV_TILES = {(6144, 5120): dict(block_n=16, num_warps=8, num_stages=3),
                    (5120, 4096): dict(block_n=8, num_warps=8, num_stages=3),
                    (28672, 5120): dict(block_n=16, num_warps=8, num_stages=3),
                    (5120, 14336): dict(block_n=8, num_warps=8, num_stages=4)}


def _int4_gemv(N, K, cfg):
    """The 2-D plane kernel (vec=0) at its measured tiles."""
    return _gemv_case(N, K, {"vec": 0, **PLANE_GEMV_TILES.get((N, K), {}), **cfg})


def _int4_gemv_v(N, K, cfg):
    """The 3-D kernel at the decoder's tiles (INT4_GEMV_CONFIGS), else one warp of 4 rows (vec=4)."""
    from pixtral_rt.decoder import INT4_GEMV_CONFIGS
    tiles = INT4_GEMV_CONFIGS.get((N, K), {})
    return _gemv_case(N, K, {**(tiles if tiles.get("vec") else {"vec": 4, "block_n": 4, "num_warps": 1}), **cfg})


def _gemv_case(N, K, cfg):
    from pixtral_rt.int4 import Int4Weight, pack, quantize_weight
    from pixtral_rt.kernels.int4_gemv import int4_gemv
    q, s = quantize_weight(torch.randn(N, K) * 0.02)
    w = Int4Weight.from_checkpoint(pack(q), s.to(torch.bfloat16), "cpu", torch.bfloat16)
    with capture_launches() as ks:
        int4_gemv(torch.randn(1, K, dtype=torch.bfloat16), w, **cfg)
    bn = cfg.get("block_n", 16)
    return ks[-1], bn * 8 * w.plane, 0.5 + 2 / w.group_size


def _int4_gemm(M):
    def case(N, K, cfg):
        from pixtral_rt.decoder import INT4_SKINNY_CONFIGS
        from pixtral_rt.int4 import Int4Weight, pack, quantize_weight
        from pixtral_rt.kernels.int4_gemm import SKINNY_DEFAULT, int4_gemm
        q, s = quantize_weight(torch.randn(N, K) * 0.02)
        w = Int4Weight.from_checkpoint(pack(q), s.to(torch.bfloat16), "cpu", torch.bfloat16)
        from pixtral_rt.kernels.int4_gemm import PREFILL_DEFAULT
        bm = min(64, max(16, 1 << (M - 1).bit_length()))
        cfg = {**(INT4_SKINNY_CONFIGS.get((N, K), {}).get(bm, {}) if M <= 64 else {}), **cfg}
        with capture_launches() as ks:
            int4_gemm(torch.randn(M, K, dtype=torch.bfloat16), w, **cfg)
        tiles = SKINNY_DEFAULT if M <= 64 else PREFILL_DEFAULT
        step = min(cfg.get("block_p") or w.plane, w.plane)          # word columns a loop iteration
        return ks[-1], cfg.get("block_n", tiles["block_n"]) * 8 * step, 0.5 + 2 / w.group_size
    return case


def _fp8_gemv(N, K, cfg):
    from pixtral_rt.decoder import FP8_GEMV_CONFIGS
    from pixtral_rt.kernels.fp8_gemv import GEMV_DEFAULT, fp8_gemv
    cfg = {**GEMV_DEFAULT, **FP8_GEMV_CONFIGS.get((N, K), {}), **cfg}
    w = torch.randn(N, K).to(torch.float8_e4m3fn)
    with capture_launches() as ks:
        fp8_gemv(torch.randn(1, K, dtype=torch.bfloat16), w, torch.rand(N), **cfg)
    return ks[-1], cfg["block_n"] * cfg["block_k"], 1.0


def _bf16_gemv(N, K, cfg):
    from pixtral_rt.decoder import GEMV_CONFIGS
    from pixtral_rt.kernels.gemv import gemv
    cfg = {**GEMV_CONFIGS.get((N, K), {}), **cfg}
    with capture_launches() as ks:
        gemv(torch.randn(1, K, dtype=torch.bfloat16), torch.randn(N, K, dtype=torch.bfloat16), **cfg)
    return ks[-1], cfg["block_n"] * cfg["block_k"], 2.0


KINDS = {"int4_gemv": _int4_gemv, "int4_gemv_v": _int4_gemv_v, "int4_gemm16": _int4_gemm(16),
         "int4_gemm64": _int4_gemm(64), "int4_gemm512": _int4_gemm(512), "fp8_gemv": _fp8_gemv, "bf16_gemv": _bf16_gemv}
CASES = [f"{k}_{lin}" for k in KINDS for lin in LINEARS]


def run_case(case: str, cfg: dict | None = None) -> Report:
    kind, lin = case.rsplit("_", 1)
    c, per_iter, bpw = KINDS[kind](*LINEARS[lin], cfg or {})
    return report(case, c, per_iter, bpw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--cfg", default="", help="tile overrides for every case, e.g. block_n=16,num_warps=8")
    p.add_argument("--dump", default=None, help="folder to write each case's SASS to")
    a = p.parse_args(argv)
    cfg = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (kv.split("=") for kv in a.cfg.split(",") if kv)}
    print(f"triton {triton.__version__}, sm_90; ceilings for {N_SM} SMs at {CLOCK_HZ / 1e9:.3f} GHz, HBM "
          f"{HBM_BPS / 1e12:.2f} TB/s")
    print("loop: instructions in the main loop; int / fma: of them on the integer / FMA pipe; w/warp-it: weights a "
          "warp streams per iteration;\ninstr/w: instructions a thread issues per weight; issue / int: the ceilings "
          "on weight bytes a second (see the docstring)")
    print(f"{'case':<18} {'regs':>4} {'loop':>5} {'int':>4} {'fma':>4} {'w/warp-it':>9} {'instr/w':>7} "
          f"{'issue TB/s':>10} {'int TB/s':>8}  loads")
    for case in a.cases.split(","):
        r = run_case(case, cfg)
        issue, intp = r.ceilings()
        loads = " ".join(f"{k[4:]}x{v}" for k, v in sorted(r.by_op.items()) if k.startswith("mem:"))
        print(f"{case:<18} {r.regs:>4} {r.body:>5} {r.int_pipe:>4} {r.fma_pipe:>4} {r.weights_per_warp_iter:>9.0f} "
              f"{r.instr_per_weight:>7.2f} {issue / 1e12:>10.2f} {intp / 1e12:>8.2f}  {loads}")
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            c, _, _ = KINDS[case.rsplit("_", 1)[0]](*LINEARS[case.rsplit("_", 1)[1]], cfg)
            with open(os.path.join(a.dump, case + ".sass"), "w") as f:
                f.write(disassemble(c.cubin)[0])
            with open(os.path.join(a.dump, case + ".ttgir"), "w") as f:
                f.write(c.ttgir)


if __name__ == "__main__":
    main()
