"""Runtime options that select between measured alternatives: one dataclass, given to LLMEngine.load (and
Engine.load), carried to every tensor-parallel rank in the launch arguments, set from the CLI and server flags.
No torch import: the CLIs build it at argument-parsing time."""
from __future__ import annotations

from dataclasses import asdict, dataclass

LM_HEAD_MODES = ("vocab", "replicated")
ALLREDUCE_IMPLS = ("nccl", "symm")
FP8_DECODE_MODES = ("w8a16", "w8a8")


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
    # kernels/fp8_gemv.py; measured, the default) or "w8a8" (activations quantised per token as in prefill, the
    # FP8 tensor-core "skinny" kernel of kernels/fp8_gemm.py; not yet faster, docs/NOTES.md FP8 decoder).
    # Prefill is W8A8 either way. The reference model runs the same math (reference/fp8_linear.py).
    fp8_decode: str = "w8a16"

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
