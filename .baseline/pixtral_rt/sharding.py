"""Tensor-parallel sharding rule of the text decoder (Megatron style), in this runtime's (Mistral) key names.

  column-parallel (dim 0, output rows split):   layers.{i}.attention.wq / wk / wv, layers.{i}.feed_forward.w1 / w3
                                                (`.weight`, and an FP8 `.weight_scale` (N, 1): its rows follow)
  row-parallel    (dim 1, input columns split): layers.{i}.attention.wo, layers.{i}.feed_forward.w2 (`.weight`;
                                                an FP8 `.weight_scale` is per output channel: replicated)
  vocab-parallel (the default; PIXTRAL_RT_TP_LM_HEAD=vocab): output.weight (the lm_head) split by rows
                                                (vocab / world rows per rank); each rank computes its slice of
                                                the logits, one all-gather joins them (FastDecoder(vocab_parallel=
                                                True), or the reference model's gather hook)
  replicated:                                   everything else (embeddings, norms, vision encoder, adapter,
                                                patch merger), and output with PIXTRAL_RT_TP_LM_HEAD=replicated

Why vocab-parallel by default (benchmarks/bench_tp_shard.py, H200, 2026-12-02): rank 0's decode step of
Pixtral-12B at TP=2 takes 3.64 ms with vocab / 2 lm_head rows against 3.78 ms with the whole lm_head (0.15 ms
saved at batch 1; TP=1 takes 6.29 ms, so replicated caps TP=2 at 1.66x even with free communication). The
price is one all-gather of (batch, vocab / world) fp32 logits per step, 256 KB at batch 1, not yet measured
between GPUs (benchmarks/bench_allreduce.py measures it on the multi-GPU machine).

Rank r of `world` holds the r-th of `world` contiguous equal blocks along the shard dim. wq / wk rows are
head-major (each head's head_dim rows contiguous; HF's rotary permutation stays inside each head), so a block
of rows is whole heads: rank r holds query heads [r * H / world, (r + 1) * H / world) and the KV heads of the
same groups (GQA groups stay whole because n_heads / world and n_kv_heads / world are both integers). Each
rank's wo / w2 output is a partial sum over its heads / FFN columns; one all-reduce adds them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import torch

from .config import PixtralArgs, TransformerArgs

_COLUMN = re.compile(r"layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight(_scale)?")
_ROW = re.compile(r"layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight")


LM_HEAD_MODES = ("replicated", "vocab")


def lm_head_mode() -> str:
    """How the lm_head is split under tensor parallelism: "vocab" (the default: rows split across ranks,
    logits all-gathered) or "replicated" (every rank holds it whole; rank 0's logits are used).
    PIXTRAL_RT_TP_LM_HEAD, read in every rank (spawned followers and torchrun ranks inherit the environment)."""
    mode = os.environ.get("PIXTRAL_RT_TP_LM_HEAD", "vocab")
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"PIXTRAL_RT_TP_LM_HEAD={mode!r}: choose one of {', '.join(LM_HEAD_MODES)}")
    return mode


def shard_rule(key: str) -> int | None:
    """0: column-parallel (split dim 0), 1: row-parallel (split dim 1), None: replicated. Our key names
    (the vision encoder's `vision_encoder.transformer.layers...` linears are replicated)."""
    if _COLUMN.fullmatch(key) or (key == "output.weight" and lm_head_mode() == "vocab"):
        return 0
    if _ROW.fullmatch(key):
        return 1
    return None


def _text(args: PixtralArgs | TransformerArgs) -> TransformerArgs:
    return args.text if isinstance(args, PixtralArgs) else args


def _check_world(world: int) -> None:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {world!r}")


def valid_sizes(args: PixtralArgs | TransformerArgs) -> list[int]:
    """Every tensor-parallel size the decoder can be split into (the divisors of gcd(heads, KV heads, FFN))."""
    t = _text(args)
    g = math.gcd(t.n_heads, t.n_kv_heads, t.hidden_dim)
    return [d for d in range(1, g + 1) if g % d == 0]


def check_divisible(args: PixtralArgs | TransformerArgs, world: int) -> None:
    """ValueError unless the attention heads, the KV heads and the FFN width all split evenly over `world`."""
    _check_world(world)
    t = _text(args)
    if t.n_heads % world or t.n_kv_heads % world or t.hidden_dim % world:
        sizes = ", ".join(map(str, valid_sizes(t)))
        raise ValueError(f"--tensor-parallel {world}: {t.n_heads} attention heads, {t.n_kv_heads} KV heads and "
                         f"FFN width {t.hidden_dim} must divide evenly; valid sizes: {sizes}")
    if lm_head_mode() == "vocab" and t.vocab_size % world:
        raise ValueError(f"--tensor-parallel {world} with PIXTRAL_RT_TP_LM_HEAD=vocab: the vocabulary "
                         f"({t.vocab_size}) must divide evenly; use PIXTRAL_RT_TP_LM_HEAD=replicated")


def sharded_args(args: TransformerArgs, world: int) -> TransformerArgs:
    """The per-rank decoder shapes: n_heads, n_kv_heads and hidden_dim divided by `world` (dim, head_dim,
    vocab and everything else unchanged). A PixtralArgs gives a PixtralArgs with its text part sharded."""
    if isinstance(args, PixtralArgs):
        return dataclasses.replace(args, text=sharded_args(args.text, world))
    check_divisible(args, world)
    return dataclasses.replace(args, n_heads=args.n_heads // world, n_kv_heads=args.n_kv_heads // world,
                               hidden_dim=args.hidden_dim // world)


def shard_range(key: str, shape, rank: int, world: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of rank `rank`'s contiguous block of a tensor of `shape`, None if replicated."""
    _check_world(world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    dim = shard_rule(key)
    if dim is None:
        return None
    shape = tuple(shape)
    if len(shape) <= dim:
        raise ValueError(f"{key}: shape {list(shape)} has no dim {dim} to split")
    size = shape[dim]
    if size % world:
        raise ValueError(f"{key}: dim {dim} of shape {list(shape)} does not split into {world} equal parts")
    step = size // world
    return dim, rank * step, (rank + 1) * step


def shard_tensor(t: torch.Tensor, key: str, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s slice of an in-memory full tensor (a contiguous copy, so the full one can be freed);
    a replicated tensor is returned as is."""
    r = shard_range(key, t.shape, rank, world)
    if r is None:
        return t
    dim, start, stop = r
    if world == 1:
        return t
    return t.narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)
