"""Reference FP8 linear: the exact math of the fast FP8 decoder, in plain PyTorch (fp32 on the CPU, upcast
on the GPU). Formulas in pixtral_rt/fp8.py:

    quantised input (quantize_input=True)     y = (e4m3(x / s_x) @ W8.T) * s_x * s_w.T     s_x per token, dynamic
    bf16 input      (quantize_input=False)    y = (x @ W8.T) * s_w.T                       x as it is

Prompt forwards always quantise. Decode steps follow the runtime's fp8_decode (pixtral_rt/options.py): under
`decode_mode(model, "w8a16")` (the default) they keep x unquantised; "w8a8" quantises as prefill does.

    install_fp8_linears(model, state_dict)   before model.load_state_dict(sd, assign=True): every decoder
                                             linear whose weight in sd is float8_e4m3fn becomes an Fp8Linear
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..fp8 import FP8_DTYPE, quantize_activations, scale_key


class Fp8Linear(nn.Module):
    """weight (N, K) float8_e4m3fn and weight_scale (N, 1) fp32, no bias; output in the input's dtype."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1), requires_grad=False)
        self.quantize_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()                                   # (N, K), exact
        if self.quantize_input:
            x8, sx = quantize_activations(x.reshape(-1, x.shape[-1]))
            y = (x8.float() @ w.T) * sx * self.weight_scale.float().T
        else:
            y = (x.reshape(-1, x.shape[-1]).float() @ w.T) * self.weight_scale.float().T
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def install_fp8_linears(model: nn.Module, state_dict: dict) -> int:
    """Replace each nn.Linear whose `<name>.weight` in state_dict is FP8 by an Fp8Linear (on the meta device,
    for load_state_dict(assign=True)). Returns how many were replaced."""
    n = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        w = state_dict.get(name + ".weight")
        if w is None or w.dtype != FP8_DTYPE:
            continue
        if scale_key(name + ".weight") not in state_dict:
            raise ValueError(f"{name}.weight is FP8 but {name}.weight_scale is missing")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            setattr(parent, child, Fp8Linear(mod.in_features, mod.out_features))
        n += 1
    return n


@contextlib.contextmanager
def decode_mode(model: nn.Module, fp8_decode: str = "w8a16"):
    """Inside, with fp8_decode "w8a16": Fp8Linear modules keep their input unquantised (that decode math).
    No-op for "w8a8" and for a bf16 model. ("auto" is resolved by the caller: options.fp8_decode_for.)"""
    if fp8_decode not in ("w8a16", "w8a8"):
        raise ValueError(f"decode_mode: fp8_decode must be 'w8a16' or 'w8a8' (resolve 'auto' by the batch's rows "
                         f"with options.fp8_decode_for), got {fp8_decode!r}")
    mods = [m for m in model.modules() if isinstance(m, Fp8Linear)] if fp8_decode == "w8a16" else []
    for m in mods:
        m.quantize_input = False
    try:
        yield
    finally:
        for m in mods:
            m.quantize_input = True
