"""Reference Mistral text decoder: GQA attention with 1D RoPE (interleaved, fp32 angles), SwiGLU FFN,
RMSNorm, untied output matrix, and a simple KV cache for incremental decoding (one sequence).

Module names equal the Mistral checkpoint keys: tok_embeddings, layers.{i}.attention.{wq,wk,wv,wo},
layers.{i}.{attention_norm,ffn_norm}, layers.{i}.feed_forward.{w1,w2,w3}, norm, output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import TransformerArgs
from .attention import causal_attention
from .layers import AttentionWeights, FeedForward, RMSNorm
from .rope import apply_rope, text_rope_angles


@dataclass
class KVCache:
    """Per layer k, v of shape (max_len, n_kv_heads, head_dim); `length` tokens are filled."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, args: TransformerArgs, max_len: int, device=None, dtype=torch.float32) -> "KVCache":
        shape = (max_len, args.n_kv_heads, args.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)])


class TransformerBlock(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.attention = AttentionWeights(args.dim, args.n_heads, args.n_kv_heads, args.head_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, angles, start_pos: int, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None):
        # x (T, dim); angles (T, D/2) for positions start_pos .. start_pos + T - 1
        T = x.shape[0]
        q, k, v = self.attention.qkv(self.attention_norm(x))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if k_cache is not None:
            k_cache[start_pos:start_pos + T] = k
            v_cache[start_pos:start_pos + T] = v
            k, v = k_cache[:start_pos + T], v_cache[:start_pos + T]
        elif start_pos != 0:
            raise ValueError("start_pos > 0 needs a KV cache")
        o = causal_attention(q, k, v)  # (T, Hq, D)
        h = x + self.attention.wo(o.reshape(T, -1))
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """h (T, dim) input embeddings at positions start_pos .. start_pos+T-1 -> logits (T, vocab) fp32.
        With a cache, appends this chunk's K/V and advances cache.length."""
        T = h.shape[0]
        if cache is not None and cache.length != start_pos:
            raise ValueError(f"cache holds {cache.length} tokens but start_pos is {start_pos}")
        pos = torch.arange(start_pos, start_pos + T, device=h.device)
        angles = text_rope_angles(pos, self.args.head_dim, self.args.rope_theta)
        for i, layer in enumerate(self.layers):
            kc = cache.k[i] if cache is not None else None
            vc = cache.v[i] if cache is not None else None
            h = layer(h, angles, start_pos, kc, vc)
        if cache is not None:
            cache.length = start_pos + T
        return self.output(self.norm(h)).float()
