"""Fast text decoder (Mistral / Pixtral): Triton kernels + cuBLAS GEMMs over a static KV cache.

Weights come in Mistral checkpoint names (tok_embeddings, layers.{i}.attention.{wq,wk,wv,wo},
layers.{i}.{attention_norm,ffn_norm}, layers.{i}.feed_forward.{w1,w2,w3}, norm, output), from a state dict
or from the reference `pixtral_rt.reference.transformer.Transformer`. At load, wq|wk|wv -> wqkv and
w1|w3 -> w13 (one GEMM each); other weights are used as given (no copy when device/dtype already match).

Static KV cache: k_cache, v_cache (n_layers, max_batch, n_kv_heads, max_seq, head_dim); slot b = row b of a
decode batch. K is stored RoPE-rotated. Valid length of a slot is whatever the caller says it is
(start_pos / positions): nothing on the host tracks it.

API
    dec = FastDecoder(args, state_dict, max_batch=8, max_seq=8192)      # or FastDecoder.from_reference(m)
    dec.warmup(batch_sizes=(1, 8))      # compile every kernel, init cuBLAS: call before CUDA-graph capture
    h = dec.embed(tokens)               # (T,) int -> (T, dim)
    logits = dec.prefill(h, slot, start_pos)       # h (T, dim) at positions start_pos..start_pos+T-1 of
                                                   # cache slot `slot` -> (vocab,) fp32 logits of the last token
    logits = dec.decode_step(tokens, positions)    # tokens (B,), positions (B,) int device tensors, B <= max_batch:
                                                   # token b sits at positions[b] of slot b and attends to
                                                   # [0, positions[b]] -> (B, vocab) fp32. Static shapes, no host
                                                   # sync: capturable in a CUDA graph.
    graph = dec.capture_decode(B)       # convenience: CUDA graph of decode_step with static input buffers;
    logits = graph(tokens, positions)   # copies inputs in, replays, returns the static logits buffer
Per layer: rms_norm(+residual) -> wqkv GEMM -> rope_store_kv (q in place, k/v into the cache) ->
prefill_attention_cached | decode_attention -> wo GEMM -> rms_norm(+residual) -> w13 GEMM -> silu_mul ->
w2 GEMM (cuBLAS; 1-row GEMMs go to kernels/gemv.py when gemv_backend="triton", the default on CUDA:
+7% decode tok/s on an H200; gemv_backend="cublas" to turn it off). Prefill runs in chunks of `prefill_chunk` tokens (chunked prefill over the cache).

Batch-1 decode with the Triton GEMV and decode_fusion "fused" or "pdl" (kernels/gemv.py: gemv_fused) runs
7 launches per layer instead of 10; the residual stream r lives in the GEMV outputs:
    qkv = wqkv @ rmsnorm(r)            (norm in the GEMV's input load)
    rope_store_kv; decode_attention (split + reduce)
    r = r + wo @ a                     (residual add in the GEMV epilogue)
    x13 = w13 @ rmsnorm(r)
    r = r + w2 @ silu_mul(x13)         (SiLU-mul in the input load, residual add in the epilogue)
    logits = output @ rmsnorm(r)       (final norm fused, fp32 logits written directly)
"pdl" also launches every kernel of that chain as a programmatic dependent launch (sm90+): each lets the
next launch early; a GEMV loads its first weight tile before waiting on its producer.

decode_fusion "none+pdl" / "fused2" / "fused2+pdl" (batch 1, Triton GEMV; `_decode_chain`): the 'none' kernel
sequence, with
    +pdl    every launch programmatic-dependent (sm90+). Each kernel waits on its producer (griddepcontrol.wait)
            and only THEN lets its consumer launch, so at most one grid waits behind a running one (the old
            'pdl' triggered first, letting a whole chain of waiting grids launch early); a GEMV loads its
            first weight tile before the wait, so weight streaming starts while the tiny kernels run.
            Same results as 'none', bit for bit.
    fused2  SiLU-mul folded into the w13 GEMV (each program computes its gate AND up rows, then
            silu(g) * u: no redundant work, unlike 'fused''s SiLU prologue), fp32 logits written by the
            output GEMV: 8 launches per layer instead of 10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from . import compile_events
from .config import TransformerArgs
from .fp8 import FP8_DTYPE, Fp8Weight, is_quantized_weight, scale_key
from .tensor_parallel import ALLREDUCE_IMPLS, gather_vocab
from pixtral_rt.kernels.fp8_gemm import fp8_gemm
from pixtral_rt.kernels.fp8_gemv import fp8_gemv
from pixtral_rt.kernels.fp8_quant import fp8_quant
from pixtral_rt.kernels.gemv import gemv, gemv_fused, pdl_supported
from pixtral_rt.kernels.decode_attention import decode_attention, default_num_splits
from pixtral_rt.kernels.paged_decode_attention import paged_decode_attention
from pixtral_rt.kernels.paged_prefill_attention import paged_prefill_attention
from pixtral_rt.kernels.prefill_attention import prefill_attention_cached, rope_store_kv, rope_table
from pixtral_rt.kernels.rms_norm import rms_norm, rms_norm_pdl
from pixtral_rt.kernels.silu_mul import silu_mul, silu_mul_pdl


# Triton GEMV tiles per weight shape (N, K), best of a sweep on an H200 (benchmarks/results/decode_step.jsonl,
# 2026-11-22): with them, batch-1 decode reached 146 tok/s vs 136 with cuBLAS. Other shapes: gemv() defaults.
GEMV_CONFIGS = {
    (6144, 5120): dict(block_n=8, block_k=512, num_warps=4, num_stages=4),     # wqkv
    (5120, 4096): dict(block_n=16, block_k=512, num_warps=4, num_stages=4),    # wo
    (28672, 5120): dict(block_n=16, block_k=256, num_warps=4, num_stages=6),   # w13
    (5120, 14336): dict(block_n=8, block_k=512, num_warps=4, num_stages=4),    # w2
    (131072, 5120): dict(block_n=8, block_k=1024, num_warps=8, num_stages=3),  # output
}


# batch-1 decode path when the Triton GEMV serves it (see the module docstring). Measured on an H200,
# 2026-11-22, one run (benchmarks/results/decode_step.jsonl): graph-replayed at 1k context 'none' 152.7 tok/s,
# 'fused' 143.4, 'pdl' 141.3 (4k: 150.4 vs pdl 137.5): the fused GEMVs lose more in the K loop than the 3
# removed launches save. Next run, same process (copy 4.24 TB/s, floor 183.2 tok/s): 1k 'none' 154.55 and
# 154.57 (timed twice), 'none+pdl' 161.12 (+4.2%), 'fused2' 156.02 (+0.9%), 'fused2+pdl' 161.41 (+4.4%);
# 4k 'none' 152.33, 'none+pdl' 158.14 (+3.8%), 'fused2' 153.64, 'fused2+pdl' 151.14 (-0.8%, unexplained,
# one sample). 'none+pdl' wins at both contexts, is bit-identical to 'none' (GPU test) -> the default.
DEFAULT_DECODE_FUSION = "none+pdl"
DECODE_FUSIONS = ("none", "fused", "pdl", "none+pdl", "fused2", "fused2+pdl")
# tiles of the w13 GEMV with the SiLU-mul epilogue (decode_fusion 'fused2*'): each program reads block_n gate
# rows and the block_n matching up rows, i.e. the same 16-row footprint as the plain w13 tile
GLU_CONFIG = dict(block_n=8, block_k=256, num_warps=4, num_stages=6)

# FP8 decoder (pixtral_rt/fp8.py): tiles of kernels/fp8_gemv.py per weight shape (N, K): for 1 row (GEMV), and
# for 2..64 rows per padded row-tile block_m in (16, 32, 64) (skinny GEMM). Shapes not listed take the
# kernel's defaults. Chosen by benchmarks/bench_fp8_linear.py (CUDA-graph timed sweeps).
# Sweep of 2026-12-02 on an H200 (benchmarks/results/fp8_linear.jsonl, commit a5e6170): M=1 reads W at 2.3 (wo) to
# 3.5 (w13) TB/s, 0.61-0.66x the bf16 GEMV's time.
FP8_GEMV_CONFIGS: dict[tuple[int, int], dict] = {
    (6144, 5120): dict(block_n=8, block_k=512, num_warps=8, num_stages=4),     # wqkv
    (5120, 4096): dict(block_n=8, block_k=512, num_warps=8, num_stages=4),     # wo
    (28672, 5120): dict(block_n=8, block_k=512, num_warps=4, num_stages=4),    # w13
    (5120, 14336): dict(block_n=8, block_k=512, num_warps=8, num_stages=4),    # w2
}
FP8_SKINNY_CONFIGS: dict[tuple[int, int], dict[int, dict]] = {
    (6144, 5120): {16: dict(block_n=32, block_k=256, num_warps=4, num_stages=4),
                   32: dict(block_n=64, block_k=128, num_warps=4, num_stages=4),
                   64: dict(block_n=32, block_k=128, num_warps=4, num_stages=5)},
    (5120, 4096): {16: dict(block_n=32, block_k=256, num_warps=4, num_stages=3),
                   32: dict(block_n=64, block_k=128, num_warps=4, num_stages=5),
                   64: dict(block_n=32, block_k=128, num_warps=4, num_stages=5)},
    (28672, 5120): {16: dict(block_n=32, block_k=256, num_warps=4, num_stages=3),
                    32: dict(block_n=64, block_k=128, num_warps=4, num_stages=3),
                    64: dict(block_n=128, block_k=128, num_warps=4, num_stages=3)},
    (5120, 14336): {16: dict(block_n=32, block_k=256, num_warps=4, num_stages=3),
                    32: dict(block_n=64, block_k=128, num_warps=4, num_stages=5),
                    64: dict(block_n=32, block_k=128, num_warps=4, num_stages=5)},
}
# prefill FP8 GEMM (kernels/fp8_gemm.py): "scaled_mm" (cuBLASLt, sm89+) or "triton"
DEFAULT_FP8_GEMM_BACKEND = "scaled_mm"


Linear = torch.Tensor | Fp8Weight    # a bf16 (N, K) weight, or FP8 weight + per-channel scale


@dataclass
class _Layer:
    wqkv: Linear                # ((Hq + 2 Hkv) * D, dim)
    wo: Linear                  # (dim, Hq * D)
    w13: Linear                 # (2 * hidden, dim): w1 (gate) rows then w3 (up) rows
    w2: Linear                  # (dim, hidden)
    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor


class FastDecoder:
    def __init__(self, args: TransformerArgs, weights: Mapping[str, torch.Tensor], max_batch: int = 1,
                 max_seq: int | None = None, device=None, dtype: torch.dtype | None = None,
                 prefill_chunk: int = 8192, decode_config: dict | None = None, gemv_backend: str | None = None,
                 gemv_configs: dict | None = None, decode_fusion: str | None = None, consume: bool = False,
                 static_cache: bool = True, fp8_gemm_backend: str | None = None, tp_group=None,
                 vocab_parallel: bool = False, tp_allreduce: str = "nccl"):
        """consume=True pops each weight from `weights` (a dict) as it is placed, so unfused copies are freed
        layer by layer while wqkv / w13 are built: the load-time transient is one layer, not all of them.
        static_cache=False: no per-slot cache (the serving engine calls alloc_pages and the *_paged methods).
        FP8: a decoder linear given as float8_e4m3fn `<name>.weight` + fp32 `<name>.weight_scale` (N, 1) (the
        contract of pixtral_rt/fp8.py) is kept in FP8: decode runs kernels/fp8_gemv.py on bf16 activations,
        prefill quantises activations per token (kernels/fp8_quant.py) and runs the FP8 GEMM
        (kernels/fp8_gemm.py, fp8_gemm_backend "scaled_mm" or "triton").
        tp_group (a torch.distributed group, or "world"): tensor parallel. `args` and `weights` are this rank's
        shard (pixtral_rt/sharding.py: heads, KV heads and the FFN width divided by the world size); the
        partial outputs of wo and w2 are summed across ranks by one all-reduce each, before the residual add.
        vocab_parallel (with tp_group): `output.weight` is this rank's (vocab / world, dim) block of rows; each
        rank computes its slice of the logits and one all-gather returns the full (rows, vocab) on every rank.
        Otherwise the lm_head is whole on every rank.
        tp_allreduce "nccl" (torch.distributed.all_reduce) or "symm": decode-sized sums (<= max_batch rows) by
        torch symmetric memory's one-shot all-reduce (each GPU reads its peers' buffers over NVLink; no
        multicast), larger ones (prefill) by NCCL. Which is faster is measured (benchmarks/bench_allreduce.py)."""
        self.args = args
        emb = weights["tok_embeddings.weight"]
        self.device = torch.device(device) if device is not None else emb.device
        self.dtype = dtype or emb.dtype
        self.max_batch = max_batch
        self.max_seq = max_seq or args.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.decode_config = dict(block_n=64, num_warps=4, num_stages=4, **(decode_config or {}))
        gemv_backend = gemv_backend or ("triton" if self.device.type == "cuda" else "cublas")
        if gemv_backend not in ("cublas", "triton"):
            raise ValueError(f"gemv_backend must be 'cublas' or 'triton', got {gemv_backend!r}")
        self.gemv_backend = gemv_backend      # 'triton': kernels/gemv.py for 1-row GEMMs (decode at batch 1)
        # (N, K) -> dict(block_n, block_k, num_warps, num_stages)
        self.gemv_configs = dict(GEMV_CONFIGS if gemv_configs is None else gemv_configs)
        self.fused_gemv_configs = dict(self.gemv_configs)    # tiles of gemv_fused, same keys
        # batch-1 decode with the Triton GEMV: 'none' (separate norm / silu / add kernels), 'fused'
        # (gemv_fused prologues/epilogues), 'pdl' (fused + programmatic dependent launches, sm90+)
        decode_fusion = decode_fusion or DEFAULT_DECODE_FUSION
        if decode_fusion not in DECODE_FUSIONS:
            raise ValueError(f"decode_fusion must be one of {DECODE_FUSIONS}, got {decode_fusion!r}")
        if decode_fusion == "pdl" and not pdl_supported(self.device):
            decode_fusion = "fused"
        self.glu_config = dict(GLU_CONFIG)
        self.decode_fusion = decode_fusion
        self.attn_workspace: dict = {}     # decode attention partials, allocated once per shape
        D, Hq, Hkv = args.head_dim, args.n_heads, args.n_kv_heads

        def get(name, shape):
            if name not in weights:
                raise KeyError(f"FastDecoder: weight {name!r} missing from the state dict")
            w = weights.pop(name) if consume else weights[name]
            if tuple(w.shape) != tuple(shape):
                raise ValueError(f"FastDecoder: {name} has shape {tuple(w.shape)}, config expects {tuple(shape)}")
            if w.dtype == FP8_DTYPE:
                s = weights.pop(scale_key(name)) if consume else weights.get(scale_key(name))
                if not is_quantized_weight(name) or s is None or s.numel() != shape[0]:
                    raise ValueError(f"FastDecoder: {name} is float8_e4m3fn but "
                                     + ("only decoder linears may be FP8" if not is_quantized_weight(name) else
                                        f"its {scale_key(name)} is missing or not ({shape[0]}, 1)"))
                return Fp8Weight(w.to(self.device), s.to(self.device, torch.float32).reshape(-1).contiguous())
            return w.to(device=self.device, dtype=self.dtype)

        def cat(name, parts):
            if all(isinstance(p, Fp8Weight) for p in parts):
                return Fp8Weight.cat(parts)
            if any(isinstance(p, Fp8Weight) for p in parts):
                raise ValueError(f"FastDecoder: {name} mixes FP8 and unquantised weights; the fused GEMM needs "
                                 f"one precision (quantise all of them or none)")
            return torch.cat(parts)

        self.tok_embeddings = get("tok_embeddings.weight", (args.vocab_size, args.dim))
        self.layers: list[_Layer] = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            wqkv = cat(p + "attention.wq/wk/wv", [get(p + "attention.wq.weight", (Hq * D, args.dim)),
                                                   get(p + "attention.wk.weight", (Hkv * D, args.dim)),
                                                   get(p + "attention.wv.weight", (Hkv * D, args.dim))])
            w13 = cat(p + "feed_forward.w1/w3", [get(p + "feed_forward.w1.weight", (args.hidden_dim, args.dim)),
                                                  get(p + "feed_forward.w3.weight", (args.hidden_dim, args.dim))])
            self.layers.append(_Layer(
                wqkv=wqkv, wo=get(p + "attention.wo.weight", (args.dim, Hq * D)), w13=w13,
                w2=get(p + "feed_forward.w2.weight", (args.dim, args.hidden_dim)),
                attention_norm=get(p + "attention_norm.weight", (args.dim,)),
                ffn_norm=get(p + "ffn_norm.weight", (args.dim,))))
        self.tp_group = None if tp_group is None else (torch.distributed.group.WORLD if tp_group == "world"
                                                       else tp_group)
        if vocab_parallel and self.tp_group is None:
            raise ValueError("FastDecoder: vocab_parallel needs a tp_group")
        if tp_allreduce not in ALLREDUCE_IMPLS:
            raise ValueError(f"FastDecoder: tp_allreduce must be 'nccl' or 'symm', got {tp_allreduce!r}")
        self._symm = None          # (symmetric buffer (max_batch * dim,), group name) for tp_allreduce "symm"
        if tp_allreduce == "symm" and self.tp_group is not None:
            if self.device.type != "cuda" or torch.distributed.get_backend(self.tp_group) != "nccl":
                raise ValueError("FastDecoder: tp_allreduce 'symm' needs CUDA GPUs and an NCCL group")
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(max_batch * args.dim, dtype=self.dtype, device=self.device)
            symm_mem.rendezvous(buf, self.tp_group.group_name)      # collective: every rank builds its decoder
            self._symm = (buf, self.tp_group.group_name)
        self.vocab_parallel = vocab_parallel
        tp_world = torch.distributed.get_world_size(self.tp_group) if vocab_parallel else 1
        if args.vocab_size % tp_world:
            raise ValueError(f"FastDecoder: vocab {args.vocab_size} does not split over {tp_world} ranks")
        self.norm = get("norm.weight", (args.dim,))
        self.output = get("output.weight", (args.vocab_size // tp_world, args.dim))
        if isinstance(self.output, Fp8Weight) or isinstance(self.tok_embeddings, Fp8Weight):
            raise ValueError("FastDecoder: lm_head and the embedding table stay bf16")
        if self.tp_group is not None and self.decode_fusion not in ("none", "none+pdl"):
            raise ValueError(f"FastDecoder: decode_fusion {self.decode_fusion!r} adds the residual inside the GEMV; "
                             f"tensor parallelism needs the all-reduce first: use 'none' or 'none+pdl'")
        self.fp8 = any(isinstance(w, Fp8Weight) for L in self.layers for w in (L.wqkv, L.wo, L.w13, L.w2))
        if self.fp8 and self.decode_fusion not in ("none", "none+pdl"):
            raise ValueError(f"FastDecoder: decode_fusion {self.decode_fusion!r} has no FP8 kernels; use 'none' "
                             f"or 'none+pdl' with FP8 weights")
        self.fp8_gemm_backend = fp8_gemm_backend or (
            DEFAULT_FP8_GEMM_BACKEND if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)
            >= (8, 9) else "triton")
        self.fp8_gemv_configs = dict(FP8_GEMV_CONFIGS)
        self.fp8_skinny_configs = dict(FP8_SKINNY_CONFIGS)
        cache_shape = (args.n_layers, max_batch if static_cache else 0, Hkv, self.max_seq, D)
        self.k_cache = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.k_pages = self.v_pages = None     # paged cache (alloc_pages)
        self.page_size = 0
        self.cos_sin = rope_table(self.max_seq, D, args.rope_theta, self.device)
        self.slot_ids = torch.arange(max_batch, device=self.device, dtype=torch.int32)

    @classmethod
    def from_reference(cls, model, **kw) -> "FastDecoder":
        """From `pixtral_rt.reference.transformer.Transformer` (shares its unfused weights, no copy)."""
        return cls(model.args, dict(model.state_dict()), **kw)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a batch-1 decode step must read (all but the embedding table)."""
        def nbytes(t):
            return t.nbytes() if isinstance(t, Fp8Weight) else t.numel() * t.element_size()

        n = nbytes(self.output) + nbytes(self.norm)
        for L in self.layers:
            n += sum(nbytes(t) for t in (L.wqkv, L.wo, L.w13, L.w2, L.attention_norm, L.ffn_norm))
        return n

    # ------------------------------------------------------------------ forward pieces
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (T,) int -> (T, dim) in the model dtype."""
        return F.embedding(tokens, self.tok_embeddings)

    def _linear(self, x: torch.Tensor, w: Linear, act_quant: bool = False) -> torch.Tensor:
        """x (T, K) @ w.T. FP8 w: act_quant (prefill) quantises x per token and runs the FP8 GEMM; otherwise
        (decode) the FP8-weight GEMV / skinny GEMM on x as it is."""
        if isinstance(w, Fp8Weight):
            if act_quant:
                x8, sx = fp8_quant(x)
                return fp8_gemm(x8, sx, w.weight, w.scale, out_dtype=x.dtype, backend=self.fp8_gemm_backend)
            M = x.shape[0]
            if M == 1:
                return fp8_gemv(x, w.weight, w.scale, **self.fp8_gemv_configs.get(tuple(w.shape), {}))
            bm = min(64, max(16, 1 << (M - 1).bit_length()))
            return fp8_gemv(x, w.weight, w.scale, **self.fp8_skinny_configs.get(tuple(w.shape), {}).get(bm, {}))
        if self.gemv_backend == "triton" and x.shape[0] == 1:
            return gemv(x, w, **self.gemv_configs.get(tuple(w.shape), {}))
        return F.linear(x, w)

    def _gather_vocab(self, part: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lm_head: this rank's (R, vocab / world) logits -> (R, vocab) (tensor_parallel.
        gather_vocab). Identity otherwise."""
        if not self.vocab_parallel:
            return part
        return gather_vocab(part, self.tp_group)

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: sum the row-parallel partial outputs (wo, w2) across ranks, in place."""
        if self.tp_group is None:
            return y
        if self._symm is not None and y.numel() <= self._symm[0].numel():
            buf = self._symm[0][:y.numel()].view_as(y)
            buf.copy_(y)                         # the peers read this rank's partial sum from `buf`
            return torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self._symm[1], y)
        torch.distributed.all_reduce(y, group=self.tp_group)
        return y

    def _layers(self, x: torch.Tensor, attend, last_only: bool, rows: torch.Tensor | None = None,
                act_quant: bool = False) -> torch.Tensor:
        """x (T, dim) -> final-normed hidden (T, 1 or len(rows), dim). attend(i, qkv) -> (T, Hq, D).
        rows: (R,) int64 device indices of the rows to keep for the final norm (the logits rows).
        act_quant: FP8 linears quantise their input per token (prefill); decode passes False."""
        eps = self.args.norm_eps
        T = x.shape[0]
        res, y = x, None
        for i, L in enumerate(self.layers):
            if y is None:
                h = rms_norm(x, L.attention_norm, eps)
            else:
                h, res = rms_norm(y, L.attention_norm, eps, residual=res)
            a = attend(i, self._linear(h, L.wqkv, act_quant))         # (T, Hq, D)
            y = self._reduce(self._linear(a.view(T, -1), L.wo, act_quant))
            h, res = rms_norm(y, L.ffn_norm, eps, residual=res)
            y = self._reduce(self._linear(silu_mul(self._linear(h, L.w13, act_quant)), L.w2, act_quant))
        if last_only:
            y, res = y[-1:], res[-1:]
        elif rows is not None:
            y, res = y.index_select(0, rows), res.index_select(0, rows)
        h, _ = rms_norm(y, self.norm, eps, residual=res)
        return h

    @torch.inference_mode()
    def prefill(self, h: torch.Tensor, slot: int, start_pos: int) -> torch.Tensor:
        """h (T, dim) embeddings of positions start_pos.. of cache slot `slot` -> (vocab,) fp32 last logits."""
        T = h.shape[0]
        if h.dim() != 2 or h.shape[1] != self.args.dim or T == 0:
            raise ValueError(f"prefill: h must be (T >= 1, {self.args.dim}), got {tuple(h.shape)}")
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"prefill: slot {slot} outside 0..{self.max_batch - 1} (max_batch)")
        if start_pos < 0 or start_pos + T > self.max_seq:
            raise ValueError(f"prefill: positions {start_pos}..{start_pos + T} exceed max_seq {self.max_seq}; "
                             f"build the decoder with a larger max_seq")
        h = h.to(device=self.device, dtype=self.dtype)
        args = self.args
        out = None
        for c0 in range(0, T, self.prefill_chunk):
            x = h[c0:c0 + self.prefill_chunk]
            n, pos0 = x.shape[0], start_pos + c0
            positions = torch.arange(pos0, pos0 + n, device=self.device, dtype=torch.int32)
            slots = torch.full((n,), slot, device=self.device, dtype=torch.int32)

            def attend(i, qkv, n=n, pos0=pos0, positions=positions, slots=slots):
                rope_store_kv(qkv, positions, slots, self.k_cache[i], self.v_cache[i], self.cos_sin,
                              args.n_heads, args.n_kv_heads)
                q = qkv[:, :args.n_heads * args.head_dim].view(n, args.n_heads, args.head_dim)
                return prefill_attention_cached(q, self.k_cache[i], self.v_cache[i], slot, pos0)

            out = self._layers(x, attend, last_only=True, act_quant=True)
        return self._gather_vocab(self._linear(out, self.output).float())[0]

    def _decode_mode(self, B: int) -> tuple[bool, bool, bool]:
        """(fused, chain, pdl) for a batch of B rows (the batch-1 Triton GEMV paths, see the docstring)."""
        fusion = self.decode_fusion
        fused = B == 1 and self.gemv_backend == "triton" and fusion in ("fused", "pdl")
        chain = B == 1 and self.gemv_backend == "triton" and fusion in ("none+pdl", "fused2", "fused2+pdl")
        pdl = (fused and fusion == "pdl") or (chain and fusion.endswith("+pdl") and pdl_supported(self.device))
        return fused, chain, pdl

    def _decode(self, tokens: torch.Tensor, attend, fused: bool, chain: bool, pdl: bool) -> torch.Tensor:
        if fused:
            logits = self._decode_fused(self.embed(tokens), attend, pdl)
        elif chain:
            logits = self._decode_chain(self.embed(tokens), attend, glu=self.decode_fusion.startswith("fused2"),
                                        pdl=pdl)
        else:
            logits = self._linear(self._layers(self.embed(tokens), attend, last_only=False), self.output).float()
        return self._gather_vocab(logits)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B,), positions (B,) int device tensors -> logits (B, vocab) fp32. Row b uses cache slot b."""
        B = tokens.shape[0]
        if tokens.shape != (B,) or positions.shape != (B,) or not 1 <= B <= self.max_batch:
            raise ValueError(f"decode_step: tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} "
                             f"must both be (B,) with 1 <= B <= max_batch={self.max_batch}")
        args = self.args
        fused, chain, pdl = self._decode_mode(B)
        with torch.inference_mode():
            slots = self.slot_ids[:B]
            lens = (positions + 1).to(torch.int32)
            ns = default_num_splits(B, args.n_kv_heads, self.device)

            def attend(i, qkv):
                rope_store_kv(qkv, positions, slots, self.k_cache[i], self.v_cache[i], self.cos_sin,
                              args.n_heads, args.n_kv_heads, pdl=pdl)
                q = qkv[:, :args.n_heads * args.head_dim].view(B, args.n_heads, args.head_dim)
                return decode_attention(q, self.k_cache[i], self.v_cache[i], lens, num_splits=ns, pdl=pdl,
                                        workspace=self.attn_workspace, **self.decode_config)

            return self._decode(tokens, attend, fused, chain, pdl)

    # ------------------------------------------------------------------ paged KV cache (serving)
    def alloc_pages(self, n_pages: int, page_size: int) -> None:
        """Paged cache: k_pages, v_pages (n_layers, n_pages, Hkv, page_size, D); a sequence's position p lives
        in page block_table[p // page_size], row p % page_size (pixtral_rt/serving/kv_pages.py)."""
        a = self.args
        shape = (a.n_layers, n_pages, a.n_kv_heads, page_size, a.head_dim)
        self.k_pages = self.v_pages = None
        self.k_pages = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_pages = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.page_size = page_size

    def decode_step_paged(self, tokens: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor,
                          lens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) int64, positions (B,) int32, block_table (>= B, max_pages) int32, lens (B,) int32 (keys
        each row attends to: positions + 1, or 0 for an idle row) -> logits (B, vocab) fp32. Writes each
        token's K/V at its position through the block table. No host sync: capturable."""
        B, args, P = tokens.shape[0], self.args, self.page_size
        fused, chain, pdl = self._decode_mode(B)
        with torch.inference_mode():
            pages = block_table[:B].gather(1, (positions // P).long()[:, None])[:, 0]
            pages = torch.where(lens > 0, pages, 0)      # idle rows write the trash page, never a real one
            offs = positions % P
            ns = default_num_splits(B, args.n_kv_heads, self.device)

            def attend(i, qkv):
                rope_store_kv(qkv, positions, pages, self.k_pages[i], self.v_pages[i], self.cos_sin,
                              args.n_heads, args.n_kv_heads, pdl=pdl, cache_pos=offs)
                q = qkv[:, :args.n_heads * args.head_dim].view(B, args.n_heads, args.head_dim)
                return paged_decode_attention(q, self.k_pages[i], self.v_pages[i], block_table, lens, num_splits=ns,
                                              pdl=pdl, workspace=self.attn_workspace, **self.decode_config)

            return self._decode(tokens, attend, fused, chain, pdl)

    @torch.inference_mode()
    def prefill_paged(self, h: torch.Tensor, positions: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor,
                      block_table: torch.Tensor, cu_q: torch.Tensor, start_pos: torch.Tensor, max_q_len: int,
                      rows: torch.Tensor) -> torch.Tensor:
        """Prompt chunks of S sequences packed in h (T, dim): sequence s owns rows cu_q[s]..cu_q[s+1]-1 at
        positions start_pos[s].., written through block_table[s]. positions / pages / offsets (T,) int32 per
        row (position, its page, row in the page). rows (R,) int64: rows whose logits are wanted
        -> (R, vocab) fp32."""
        args, T = self.args, h.shape[0]

        def attend(i, qkv):
            rope_store_kv(qkv, positions, pages, self.k_pages[i], self.v_pages[i], self.cos_sin,
                          args.n_heads, args.n_kv_heads, cache_pos=offsets)
            q = qkv[:, :args.n_heads * args.head_dim].view(T, args.n_heads, args.head_dim)
            return paged_prefill_attention(q, self.k_pages[i], self.v_pages[i], block_table, cu_q, start_pos,
                                           max_q_len)

        out = self._layers(h.to(self.dtype), attend, last_only=False, rows=rows, act_quant=True)
        return self._gather_vocab(self._linear(out, self.output).float())

    def _decode_fused(self, r: torch.Tensor, attend, pdl: bool) -> torch.Tensor:
        """Batch-1 decode body with gemv_fused: r (1, dim) embedding -> (1, vocab) fp32 logits."""
        eps = self.args.norm_eps
        cfg = self.fused_gemv_configs

        def lin(x, w, **kw):
            return gemv_fused(x, w, eps=eps, pdl=pdl, **kw, **cfg.get(tuple(w.shape), {}))

        for i, L in enumerate(self.layers):
            a = attend(i, lin(r, L.wqkv, norm_weight=L.attention_norm))
            r = lin(a.view(1, -1), L.wo, residual=r)
            r = lin(lin(r, L.w13, norm_weight=L.ffn_norm), L.w2, silu=True, residual=r)
        return lin(r, self.output, norm_weight=self.norm, out_dtype=torch.float32)

    def _decode_chain(self, x: torch.Tensor, attend, glu: bool, pdl: bool) -> torch.Tensor:
        """Batch-1 decode body of 'none+pdl' / 'fused2' / 'fused2+pdl': the 'none' kernels (rms_norm with the
        residual add, plain GEMVs), optionally (glu) with SiLU-mul in the w13 GEMV's epilogue (no separate
        silu_mul launch; no redundant work: each program computes its own gate and up rows) and fp32 logits
        written by the output GEMV directly, optionally (pdl) every launch programmatic-dependent.
        'none+pdl' computes exactly what 'none' computes."""
        eps = self.args.norm_eps
        cfg = self.gemv_configs

        def lin(h, w, **kw):
            if isinstance(w, Fp8Weight):      # FP8 decode (glu is refused at construction)
                return fp8_gemv(h, w.weight, w.scale, pdl=pdl, **self.fp8_gemv_configs.get(tuple(w.shape), {}))
            return gemv(h, w, pdl=pdl, **kw, **cfg.get(tuple(w.shape), {}))

        res, y = x, None
        for i, L in enumerate(self.layers):
            if y is None:
                h = rms_norm_pdl(x, L.attention_norm, eps, pdl=pdl)
            else:
                h, res = rms_norm_pdl(y, L.attention_norm, eps, residual=res, pdl=pdl)
            a = attend(i, lin(h, L.wqkv))
            y = self._reduce(lin(a.view(1, -1), L.wo))
            h, res = rms_norm_pdl(y, L.ffn_norm, eps, residual=res, pdl=pdl)
            if glu:
                g = gemv(h, L.w13, glu=True, pdl=pdl, **self.glu_config)
            else:
                g = silu_mul_pdl(lin(h, L.w13), pdl=pdl)
            y = self._reduce(lin(g, L.w2))
        h, _ = rms_norm_pdl(y, self.norm, eps, residual=res, pdl=pdl)
        if not glu:
            return lin(h, self.output).float()
        logits = torch.empty(1, self.output.shape[0], device=h.device, dtype=torch.float32)
        return lin(h, self.output, out=logits)

    # ------------------------------------------------------------------ graphs
    def warmup(self, batch_sizes=(1,), prefill_lens=(1, 97)) -> None:
        """Compile every Triton kernel and initialise cuBLAS for these shapes. Writes garbage K/V at
        positions 0.. of slots 0..max(batch_sizes)-1: call it before serving (or re-prefill after)."""
        for T in prefill_lens:
            T = min(T, self.max_seq)
            self.prefill(torch.zeros(T, self.args.dim, device=self.device, dtype=self.dtype), 0, 0)
        for B in batch_sizes:
            tok = torch.zeros(B, dtype=torch.long, device=self.device)
            self.decode_step(tok, torch.zeros(B, dtype=torch.int32, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def capture_decode(self, batch: int) -> "DecodeGraph":
        return DecodeGraph(self, batch)


class DecodeGraph:
    """decode_step for a fixed batch captured in a CUDA graph; call with (tokens, positions) device tensors."""

    def __init__(self, decoder: FastDecoder, batch: int):
        self.decoder = decoder
        dev = decoder.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.int32, device=dev)
        decoder.warmup(batch_sizes=(batch,), prefill_lens=())
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):  # warm the allocator on the side stream, as torch's docs advise
            decoder.decode_step(self.tokens, self.positions)
        torch.cuda.current_stream(dev).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.decode_step(self.tokens, self.positions)
        compile_events.captured()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.logits
