"""Reference int4 (W4A16) linear: the exact math of the fast int4 decoder, in plain PyTorch. Formulas in
pixtral_rt/int4.py:

    W = q * s       dequantised in fp32 (exact: q in [-8, 7], s holds bf16 values)
    y = x @ W.T     in fp32, then rounded to x's dtype; prefill and decode alike (activations unquantised)

    install_int4_linears(model, state_dict)   before model.load_state_dict(sd, assign=True): every decoder
                                              linear whose `<name>.weight_packed` is in sd becomes an Int4Linear
"""
from __future__ import annotations

import torch
from torch import nn

from ..int4 import PACK, dequantize, packed_key, scale_key


class Int4Linear(nn.Module):
    """weight_packed (N, K / 8) int32 (checkpoint packing) and weight_scale (N, K / G) fp32, no bias; output
    in the input's dtype. The weight is dequantised at each call (no fp32 copy kept: the reference runs
    full-size models on the GPU too)."""

    def __init__(self, in_features: int, out_features: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.weight_packed = nn.Parameter(torch.empty(out_features, in_features // PACK, dtype=torch.int32),
                                          requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, in_features // group_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.weight_packed, self.weight_scale, self.group_size)     # (N, K) fp32, exact
        y = x.reshape(-1, x.shape[-1]).float() @ w.T
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def install_int4_linears(model: nn.Module, state_dict: dict) -> int:
    """Replace each nn.Linear whose `<name>.weight_packed` is in state_dict by an Int4Linear (on the meta
    device, for load_state_dict(assign=True)). Returns how many were replaced."""
    n = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        packed = state_dict.get(packed_key(name + ".weight"))
        if packed is None:
            continue
        scale = state_dict.get(scale_key(name + ".weight"))
        if scale is None:
            raise ValueError(f"{name}.weight_packed is int4 but {name}.weight_scale is missing")
        if tuple(packed.shape) != (mod.out_features, mod.in_features // PACK) or scale.dim() != 2 \
                or scale.shape[0] != mod.out_features or mod.in_features % scale.shape[1]:
            raise ValueError(f"{name}: int4 weight_packed {tuple(packed.shape)} / weight_scale {tuple(scale.shape)} "
                             f"do not fit a ({mod.out_features}, {mod.in_features}) linear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            setattr(parent, child, Int4Linear(mod.in_features, mod.out_features,
                                              mod.in_features // scale.shape[1]))
        n += 1
    return n
