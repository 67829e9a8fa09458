"""Runtime options that select between measured alternatives: one dataclass, given to LLMEngine.load (and
Engine.load), carried to every tensor-parallel rank in the launch arguments, set from the CLI and server flags.
No torch import: the CLIs build it at argument-parsing time."""
from __future__ import annotations

from dataclasses import asdict, dataclass

LM_HEAD_MODES = ("vocab", "replicated")
ALLREDUCE_IMPLS = ("nccl", "symm")
FP8_DECODE_MODES = ("auto", "w8a16", "w8a8")
# fp8_decode "auto": decode steps of at least this many rows (the padded graph batch) run "w8a8", fewer "w8a16".
# Measured on an H100 (benchmarks/results/fp8_linear.jsonl, commit ba687e7, per layer's four linears): at 1 row
# the W8A16 GEMV wins (107 against 108 us, plus the quantisation of the wo / w2 inputs: 9 us), at 64 rows
# W8A8 takes half the time (142 against 266 us); at 2, 4, 8 and 16 rows W8A8 wins on every shape (w2 at 2 rows:
# 35.2 with its quantiser against 50.0 us; commit c8d98e9): both pad 2..16 rows to one 16-row tile
FP8_W8A8_MIN_ROWS = 2


def fp8_decode_for(mode: str, rows: int) -> str:
    """The FP8 decode math ("w8a16" or "w8a8") of a decode step of `rows` rows under fp8_decode `mode`."""
    if mode == "auto":
        return "w8a8" if rows >= FP8_W8A8_MIN_ROWS else "w8a16"
    return mode


@dataclass(frozen=True)
class RuntimeOptions:
    # tensor parallel: the lm_head split by vocabulary rows with the logits all-gathered ("vocab", measured
    # faster: pixtral_rt/sharding.py), or whole on every rank ("replicated")
    tp_lm_head: str = "vocab"
    # tensor parallel on GPUs: the decode step's all-reduces by NCCL ("nccl") or by torch symmetric memory's
    # one-shot kernel for decode-sized sums ("symm"; NCCL for prefill). FastDecoder(tp_allreduce=)
    tp_allreduce: str = "nccl"
    # host image preprocessing: "auto" (the native C++ op when built, else NumPy) or "numpy" (the fallback,
    # forced; pixtral_rt/preprocess.py). Applies to the process that encodes requests.
    preprocess: str = "auto"
    # FP8 decoder linears in decode steps: "w8a16" (bf16 activations, FP8 weights dequantised in registers by
    # kernels/fp8_gemv.py; faster at 1 row), "w8a8" (activations quantised per token as in prefill, the FP8
    # tensor-core "skinny" kernel of kernels/fp8_gemm.py; faster for batches), or "auto" (the default: each
    # decode batch size the faster of the two, fp8_decode_for). Prefill is W8A8 either way. The reference
    # model runs the same math (reference/fp8_linear.py decode_mode).
    fp8_decode: str = "auto"

    def __post_init__(self):
        if self.tp_lm_head not in LM_HEAD_MODES:
            raise ValueError(f"tp_lm_head {self.tp_lm_head!r}: choose one of {', '.join(LM_HEAD_MODES)}")
        if self.tp_allreduce not in ALLREDUCE_IMPLS:
            raise ValueError(f"tp_allreduce {self.tp_allreduce!r}: choose one of {', '.join(ALLREDUCE_IMPLS)}")
        if self.fp8_decode not in FP8_DECODE_MODES:
            raise ValueError(f"fp8_decode {self.fp8_decode!r}: choose one of {', '.join(FP8_DECODE_MODES)}")
        if self.preprocess not in ("auto", "numpy"):
            raise ValueError(f"preprocess {self.preprocess!r}: choose auto or numpy")

    def to_dict(self) -> dict:
        """Plain values for the launch arguments of the tensor-parallel followers (pickled to spawned ranks)."""
        return asdict(self)
