"""The collectives the tensor-parallel decoder calls: the all-reduce after each row-parallel linear and the
vocab all-gather of the lm_head (FastDecoder on GPUs, forward hooks on the reference model on CPU). No
process code here: starting and steering the ranks is pixtral_rt/tensor_parallel.py's job."""
from __future__ import annotations

import torch
import torch.distributed as dist

def install_all_reduce(model: torch.nn.Module, group=None, vocab_parallel: bool = False) -> int:
    """Sum the partial outputs of every row-parallel linear (layers.*.attention.wo, layers.*.feed_forward.w2)
    across ranks, by a forward hook on each; vocab_parallel: all-gather the lm_head's (`output`) logit
    slices into the full vocabulary. Returns how many hooks were installed."""
    import re
    n = 0
    for name, mod in model.named_modules():
        # text decoder only: the vision encoder (replicated, rank 0 only) has modules of the same names
        if re.fullmatch(r"layers\.\d+\.(attention\.wo|feed_forward\.w2)", name):
            mod.register_forward_hook(lambda _m, _inp, out: _all_reduce(out, group))
            n += 1
    if vocab_parallel:
        model.output.register_forward_hook(lambda _m, _inp, out: gather_vocab(out, group))
        n += 1
    return n


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor    # renamed in torch 2.13


def gather_vocab(part: torch.Tensor, group) -> torch.Tensor:
    """Vocab-parallel lm_head: this rank's (..., vocab / world) logits -> (..., vocab) on every rank, by one
    all-gather (rank r's block is vocab columns [r V / w, (r + 1) V / w)). Capturable in a CUDA graph (NCCL);
    FastDecoder and the reference model's hook both use it."""
    world = dist.get_world_size(group)
    lead, Vp = part.shape[:-1], part.shape[-1]
    flat = part.reshape(-1, Vp).contiguous()
    buf = torch.empty(world * flat.shape[0], Vp, device=part.device, dtype=part.dtype)
    _gather_into(buf, flat, group=group)
    return buf.view(world, flat.shape[0], Vp).transpose(0, 1).reshape(*lead, world * Vp)
