"""The `input_precision` of tl.dot for a kernel's operand dtype.

Triton's tl.dot defaults to TF32 for fp32 operands on GPUs (a 10-bit mantissa: ~5e-4 relative error per
product), while the interpreter and PyTorch's default matmul compute fp32 exactly. fp32 kernels here are
reference-grade paths (the CPU/GPU fp32 checks of the decoder), so they ask for IEEE fp32; bf16 / fp16
operands ignore the setting.
"""
from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 operands (exact fp32 products), 'tf32' otherwise (unused by 16-bit dots)."""
    return "ieee" if dtype == torch.float32 else "tf32"
