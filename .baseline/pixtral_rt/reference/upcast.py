"""Run a low-precision reference model in fp32 without holding an fp32 copy of it.

    with fp32_compute(model):           # model's weights stay bf16 in memory
        logits = model.forward_tokens(tokens, images)     # every layer computed in fp32

The oracle of the GPU tests is "the checkpoint's bf16 weights, upcast to fp32, in plain PyTorch", but a
full fp32 copy of Pixtral-12B (50 GB) does not fit beside the engine under test on an 80 GB GPU. Instead,
each module that owns parameters upcasts them just before its forward (and its floating-point inputs) and
puts the original dtype back just after: at most one module's weights are held in fp32 at a time. The
bf16 -> fp32 -> bf16 round trip is exact, so the model is unchanged afterwards. TF32 is turned off inside
(cuDNN convolutions use it by default; so would matmuls where a user enabled it): fp32 means fp32.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _floats_to_fp32(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_floats_to_fp32(v) for v in x)
    return x


@contextlib.contextmanager
def fp32_compute(model: nn.Module):
    """Inside: every module of `model` with parameters of its own computes in fp32 (see the module doc)."""
    saved: dict[int, dict[str, torch.dtype]] = {}

    def pre(mod, args):
        saved[id(mod)] = {n: p.dtype for n, p in mod._parameters.items() if p is not None}
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.data.float()
        return _floats_to_fp32(args)

    def post(mod, args, out):
        for n, dt in saved.pop(id(mod)).items():
            p = mod._parameters[n]
            p.data = p.data.to(dt)

    handles = []
    for mod in model.modules():
        if any(p is not None for p in mod._parameters.values()):
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for mod in model.modules():              # a forward that raised: put back what it upcast
            for n, dt in saved.pop(id(mod), {}).items():
                mod._parameters[n].data = mod._parameters[n].data.to(dt)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
