"""Runtime options that select between measured alternatives: one dataclass, given to LLMEngine.load (and
Engine.load), carried to every tensor-parallel rank in the launch arguments, set from the CLI and server flags.
No torch import: the CLIs build it at argument-parsing time."""
from __future__ import annotations

from dataclasses import asdict, dataclass

LM_HEAD_MODES = ("vocab", "replicated")
ALLREDUCE_IMPLS = ("nccl", "symm")


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

    def __post_init__(self):
        if self.tp_lm_head not in LM_HEAD_MODES:
            raise ValueError(f"tp_lm_head {self.tp_lm_head!r}: choose one of {', '.join(LM_HEAD_MODES)}")
        if self.tp_allreduce not in ALLREDUCE_IMPLS:
            raise ValueError(f"tp_allreduce {self.tp_allreduce!r}: choose one of {', '.join(ALLREDUCE_IMPLS)}")
        if self.preprocess not in ("auto", "numpy"):
            raise ValueError(f"preprocess {self.preprocess!r}: choose auto or numpy")

    def to_dict(self) -> dict:
        """Plain values for the launch arguments of the tensor-parallel followers (pickled to spawned ranks)."""
        return asdict(self)
