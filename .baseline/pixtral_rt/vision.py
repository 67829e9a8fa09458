"""Fast Pixtral vision encoder: same weights (Mistral names) as reference.vision_encoder, on kernels.

Per request the host plans once (`plan_vision`: packed offsets, (row, col) positions, attention tiles,
patch-merger gather index), copies the plan to the GPU in one go, then the forward is pure device work:

    x   = patches @ patch_w.T                    one GEMM over all images' unfolded patches (N, C*p*p)
    x   = rms_norm(x, ln_pre)
    per layer:
        h, x = rms_norm(f_prev, attention_norm, residual=x)     residual add fused into the norm (fp32 math)
        qkv  = h @ wqkv.T                         fused wq|wk|wv
        rope_2d_qk_(qkv)                          q and k rotated in place, ONE launch (rope="separate", default:
        o    = vision_attention(qkv...)          measured faster), or RoPE fused in the attention kernel
                                                  (rope="fused": cos/sin recomputed per key tile)
        h, x = rms_norm(o @ wo.T, ffn_norm, residual=x)
        f    = silu_mul(h @ w13.T) @ w2.T         fused w1|w3 GEMM, SiLU gate in one pass
    [Mistral3] rms_norm(pre_mm_projector_norm); patch merger = gather 2x2 blocks + GEMM (weight columns
               permuted at load so the gathered (M, 4, d) rows need no transpose)
    adapter: w_out(gelu(w_in x + b_in)) + b_out

Graphs: `enc.capture(bucket_tokens, max_images)` returns a `VisionGraph`; `graph(patches, plan)` copies
the inputs into static buffers, replays, and returns the real rows. Padding tokens form their own attention
segment and are never read by real tokens, so they cannot change real outputs (tests check this).

    enc = FastVisionEncoder.from_reference(ref_pixtral_model_or_vision_encoder)    # or from_state_dict
    plan = enc.plan(grids)                        # grids: [(rows, cols)] in patches, per image
    feats = enc(pack_patches(images, p), plan)    # (n_tokens or n_merged, text_dim)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import compile_events
from .config import PixtralArgs, VisionEncoderArgs
from .kernels.rms_norm import rms_norm
from .kernels.rope_2d import rope_2d_qk_
from .kernels.silu_mul import silu_mul
from .kernels.vision_attention import (attention_tokens_key, default_block_m, max_tiles_for, plan_tiles,
                                       rope_pair_freqs, vision_attention, VisionAttentionPlan,
                                       warmup_vision_attention)


# ------------------------------------------------------------------------------------------- host side
def pack_patches(images: list[torch.Tensor], patch_size: int, dtype=None) -> torch.Tensor:
    """images (C, H, W) each (H, W multiples of patch_size) -> (N, C*p*p), rows row-major per image, columns
    in Conv2d weight order (c, kh, kw)."""
    p = patch_size
    out = []
    for img in images:
        C, H, W = img.shape
        if H % p or W % p:
            raise ValueError(f"image of size {H}x{W}: sides must be multiples of patch_size {p}")
        r, c = H // p, W // p
        out.append(img.reshape(C, r, p, c, p).permute(1, 3, 0, 2, 4).reshape(r * c, C * p * p))
    x = torch.cat(out)
    return x.to(dtype) if dtype is not None else x


@dataclass
class VisionPlan:
    """Everything shape-dependent, on the device. n_tokens / n_merged are the real rows of the output."""
    grids: list
    cu_seqlens: torch.Tensor      # (n_segments + 1,) int32
    positions: torch.Tensor       # (n_rows, 2) int32
    attn: VisionAttentionPlan
    merge_index: torch.Tensor | None  # (n_merged_rows * m*m,) int64 gather rows for the patch merger
    n_tokens: int
    n_merged: int
    n_rows: int                   # = bucket if padded, else n_tokens

    def copy_(self, other: "VisionPlan") -> None:
        """Overwrite this plan's device tensors with another plan of the same bucket (graph inputs)."""
        for name in ("cu_seqlens", "positions"):
            getattr(self, name).copy_(getattr(other, name))
        self.attn.tiles.copy_(other.attn.tiles)
        if self.merge_index is not None:
            self.merge_index.copy_(other.merge_index)


def plan_vision(grids: list[tuple[int, int]], merge: int = 1, bucket: int | None = None,
                max_images: int | None = None, block_m: int = 128, device=None) -> VisionPlan:
    """Plan a pack of images given their patch grids (rows, cols). With bucket/max_images the plan has fixed
    shapes for that bucket (padding rows form one extra segment; unused entries are empty/idle)."""
    lens = [r * c for r, c in grids]
    n = sum(lens)
    for r, c in grids:
        if merge > 1 and (r % merge or c % merge):
            raise ValueError(f"patch grid {r}x{c} is not a multiple of spatial_merge_size {merge}")
    rows = n if bucket is None else bucket
    if n > rows:
        raise ValueError(f"{n} patches do not fit the bucket of {bucket}")
    n_img_slots = len(grids) if max_images is None else max_images
    if len(grids) > n_img_slots:
        raise ValueError(f"{len(grids)} images > max_images={max_images}")
    seg_lens = lens + [rows - n] + [0] * (n_img_slots - len(grids))
    cu = [0]
    for s in seg_lens:
        cu.append(cu[-1] + s)
    pos = torch.zeros(rows, 2, dtype=torch.int32)
    off = 0
    for r, c in grids:
        pos[off:off + r * c, 0] = torch.arange(r, dtype=torch.int32).repeat_interleave(c)
        pos[off:off + r * c, 1] = torch.arange(c, dtype=torch.int32).repeat(r)
        off += r * c
    # the padding segment gets no query tiles: its rows are never attended (its attention output rows are
    # left unwritten, and every later op is row-wise, so they cannot reach a real row)
    tiled = lens + [0] * (len(seg_lens) - len(lens))
    tiles = torch.tensor(plan_tiles(tiled, block_m, max_tiles_for(rows, n_img_slots + 1, block_m)),
                         dtype=torch.int32)
    merge_index, n_merged = None, n
    if merge > 1:
        idx, off = [], 0
        for r, c in grids:
            g = torch.arange(r * c).view(r // merge, merge, c // merge, merge).permute(0, 2, 1, 3)
            idx.append(g.reshape(-1) + off)  # per block: (kh, kw) row-major
            off += r * c
        merge_index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        n_merged = merge_index.numel() // (merge * merge)
        pad_rows = rows // (merge * merge) - n_merged
        merge_index = torch.cat([merge_index, torch.zeros(pad_rows * merge * merge, dtype=torch.int64)])
    # one host->device copy per tensor
    to = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    return VisionPlan(grids=list(grids), cu_seqlens=to(torch.tensor(cu, dtype=torch.int32)), positions=to(pos),
                      attn=VisionAttentionPlan(to(tiles), block_m),
                      merge_index=None if merge_index is None else to(merge_index),
                      n_tokens=n, n_merged=n_merged if merge == 1 else n_merged, n_rows=rows)


# ------------------------------------------------------------------------------------------- the model
class FastVisionEncoder(torch.nn.Module):
    """Pixtral-ViT (+ optional Mistral3 norm/merger, + adapter) on fused kernels. rope="separate" (default)
    runs kernels/rope_2d.py on q and k, then attention without rotation; rope="fused" rotates q/k inside the
    attention kernel (wq/wk rows permuted to rotate-half order). Measured on an H200 (benchmarks/results/
    vision_encoder.jsonl, 2026-11-22): separate 13.7 ms vs fused 19.6 ms for one 1024^2 image, because the
    fused kernel recomputes cos/sin for every key tile of every query tile. The separate kernel now turns
    q and k of the fused qkv buffer in one fully parallel launch (kernels/rope_2d.py).
    block_m: query rows per attention tile (default: kernels.vision_attention.default_block_m, 64 on Hopper
    for head_dim 64, else 128). attn_config: optional fixed attention config ({"BLOCK_N", "num_warps",
    "num_stages"}, for that block_m) instead of the autotuner (tests; saves compile time)."""

    def __init__(self, args: VisionEncoderArgs, weights: dict[str, torch.Tensor], text_dim: int | None = None,
                 rope: str = "separate", block_m: int | None = None, attn_config: dict | None = None):
        super().__init__()
        if rope not in ("fused", "separate"):
            raise ValueError(f"rope: 'fused' or 'separate', got {rope!r}")
        self.args, self.rope_mode, self.attn_config = args, rope, attn_config
        self.text_dim = text_dim
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.eps = args.norm_eps
        self.merge = args.spatial_merge_size
        self.w = weights
        dev = weights["patch_w"].device
        self.block_m = block_m if block_m is not None else default_block_m(dev, self.head_dim)
        self.rope_freqs = rope_pair_freqs(self.head_dim, args.rope_theta, dev)
        self._graphs: dict = {}
        self.buckets: list[int] = []          # graph buckets (prepare_steps); none: run() is eager
        self._pool = None                     # the graphs' shared memory pool
        self._out_buf: torch.Tensor | None = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], args: PixtralArgs | VisionEncoderArgs,
                        dtype=torch.bfloat16, device=None, rope: str = "separate", block_m: int | None = None,
                        attn_config: dict | None = None):
        """sd: Mistral names, either a full Pixtral state dict (`vision_encoder.*`, `vision_language_adapter.*`,
        `patch_merger.*`, `pre_mm_projector_norm.*`) or a bare VisionEncoder's (`patch_conv.weight`, ...)."""
        v = args.vision if isinstance(args, PixtralArgs) else args
        text_dim = args.text.dim if isinstance(args, PixtralArgs) else None
        pre = "vision_encoder." if "vision_encoder.patch_conv.weight" in sd else ""
        if pre + "patch_conv.weight" not in sd:
            raise KeyError("state dict has no 'vision_encoder.patch_conv.weight' nor 'patch_conv.weight'")
        dev = device if device is not None else sd[pre + "patch_conv.weight"].device

        def get(name):
            if name not in sd:
                raise KeyError(f"state dict is missing {name!r}")
            return sd[name].to(device=dev, dtype=dtype).contiguous()

        H, D = v.num_attention_heads, v.head_dim
        w = {"patch_w": get(pre + "patch_conv.weight").reshape(v.hidden_size, -1).contiguous(),
             "ln_pre": get(pre + "ln_pre.weight"), "layers": []}
        for i in range(v.num_hidden_layers):
            p = f"{pre}transformer.layers.{i}."
            wq, wk, wv = (get(p + f"attention.{n}.weight") for n in ("wq", "wk", "wv"))
            if rope == "fused":  # rotate-half row order per head: evens then odds (contiguous pair halves)
                wq, wk = (t.view(H, D // 2, 2, -1).transpose(1, 2).reshape(H * D, -1) for t in (wq, wk))
            w["layers"].append({
                "wqkv": torch.cat([wq, wk, wv]).contiguous(), "wo": get(p + "attention.wo.weight"),
                "attention_norm": get(p + "attention_norm.weight"), "ffn_norm": get(p + "ffn_norm.weight"),
                "w13": torch.cat([get(p + "feed_forward.w1.weight"), get(p + "feed_forward.w3.weight")]).contiguous(),
                "w2": get(p + "feed_forward.w2.weight")})
        if "pre_mm_projector_norm.weight" in sd:
            w["pre_mm_norm"] = get("pre_mm_projector_norm.weight")
        if "patch_merger.merging_layer.weight" in sd:
            m2 = v.spatial_merge_size ** 2
            mw = get("patch_merger.merging_layer.weight")  # (d, d*m2), column = dd*m2 + k
            w["merge_w"] = mw.view(mw.shape[0], v.hidden_size, m2).transpose(1, 2).reshape(mw.shape[0], -1).contiguous()
        if "vision_language_adapter.w_in.weight" in sd:
            w["w_in"] = get("vision_language_adapter.w_in.weight")
            w["w_out"] = get("vision_language_adapter.w_out.weight")
            w["b_in"] = get("vision_language_adapter.w_in.bias") if "vision_language_adapter.w_in.bias" in sd else None
            w["b_out"] = get("vision_language_adapter.w_out.bias") if "vision_language_adapter.w_out.bias" in sd else None
            text_dim = w["w_in"].shape[0]
        return cls(v, w, text_dim=text_dim, rope=rope, block_m=block_m, attn_config=attn_config)

    @classmethod
    def from_reference(cls, ref: torch.nn.Module, dtype=torch.bfloat16, device=None, rope: str = "separate",
                       block_m: int | None = None, attn_config: dict | None = None):
        """ref: reference PixtralModel (vision + adapter [+ merger]) or a bare reference VisionEncoder."""
        sd = ref.state_dict()
        if hasattr(ref, "pixtral_args"):
            sd = {k: t for k, t in sd.items() if not k.startswith(("layers.", "tok_embeddings", "norm.", "output"))}
            return cls.from_state_dict(sd, ref.pixtral_args, dtype, device, rope, block_m, attn_config)
        return cls.from_state_dict(sd, ref.args, dtype, device, rope, block_m, attn_config)

    # ---------------------------------------------------------------- planning
    def plan(self, grids: list[tuple[int, int]], bucket: int | None = None, max_images: int | None = None
             ) -> VisionPlan:
        return plan_vision(grids, self.merge if "merge_w" in self.w else 1, bucket, max_images, self.block_m,
                           self.w["patch_w"].device)

    # ---------------------------------------------------------------- forward
    def encode(self, patches: torch.Tensor, plan: VisionPlan) -> torch.Tensor:
        """patches (n_rows, C*p*p) -> (n_rows, hidden) ViT output (no norm/merger/adapter)."""
        w = self.w
        if patches.shape != (plan.n_rows, w["patch_w"].shape[1]):
            raise ValueError(f"patches: expected ({plan.n_rows}, {w['patch_w'].shape[1]}), got {tuple(patches.shape)}")
        N, H, D = plan.n_rows, self.n_heads, self.head_dim
        x = patches.to(w["patch_w"].dtype) @ w["patch_w"].t()
        x = rms_norm(x, w["ln_pre"], self.eps)
        f = None
        fused = self.rope_mode == "fused"
        attn_out = torch.empty(N, H, D, device=x.device, dtype=x.dtype)
        for L in w["layers"]:
            if f is None:
                h = rms_norm(x, L["attention_norm"], self.eps)
            else:
                h, x = rms_norm(f, L["attention_norm"], self.eps, residual=x, residual_out=x)
            qkv = (h @ L["wqkv"].t()).view(N, 3, H, D)
            if not fused:
                rope_2d_qk_(qkv, plan.positions, self.rope_freqs, H)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            vision_attention(q, k, v, plan.cu_seqlens, plan.attn, plan.positions, self.rope_freqs, rope=fused,
                             layout="half" if fused else "interleaved", out=attn_out, config=self.attn_config)
            h, x = rms_norm(attn_out.view(N, H * D) @ L["wo"].t(), L["ffn_norm"], self.eps, residual=x,
                            residual_out=x)
            f = silu_mul(h @ L["w13"].t()) @ L["w2"].t()
        return x + f if f is not None else x

    def forward(self, patches: torch.Tensor, plan: VisionPlan, out: torch.Tensor | None = None) -> torch.Tensor:
        """patches (n_rows, C*p*p) -> image features (n_rows or n_rows/m^2, text_dim or hidden). Real rows are
        the first plan.n_merged. out: optional buffer of at least that many rows (the result is its head)."""
        w = self.w
        x = self.encode(patches, plan)
        if "pre_mm_norm" in w:
            x = rms_norm(x, w["pre_mm_norm"], self.eps)
        if "merge_w" in w:
            m2 = self.merge ** 2
            x = x.index_select(0, plan.merge_index).view(-1, m2 * x.shape[1]) @ w["merge_w"].t()
        if "w_in" in w:
            x = F.gelu(F.linear(x, w["w_in"], w["b_in"]))
            if out is not None:
                o = out[:x.shape[0]]
                if w["b_out"] is not None:
                    return torch.addmm(w["b_out"], x, w["w_out"].t(), out=o)
                return torch.mm(x, w["w_out"].t(), out=o)
            x = F.linear(x, w["w_out"], w["b_out"])
        if out is not None:
            return out[:x.shape[0]].copy_(x)
        return x

    def out_dim(self) -> int:
        w = self.w
        return w["w_out"].shape[0] if "w_in" in w else (w["merge_w"].shape[0] if "merge_w" in w else
                                                         w["patch_w"].shape[0])

    # ---------------------------------------------------------------- request path
    def prepare(self, max_context: int, max_images: int, use_graphs: bool = True) -> None:
        """Everything a request can need, done now (issue 12): see prepare_steps."""
        for _label, step in self.prepare_steps(max_context, max_images, use_graphs):
            step()

    def prepare_steps(self, max_context: int, max_images: int, use_graphs: bool = True) -> list:
        """[(label, fn)] to run in order at load (a progress bar shows the labels), for requests of up to
        max_images full-size images within max_context tokens: the attention kernel tuned for every token key
        such a request can reach (packs of full-size images, as requests bring them), the graph of every
        bucket in vision_buckets.graph_buckets captured (one shared memory pool, one output buffer), and the
        eager path above them run once."""
        from .vision_buckets import eager_rows, full_image_patches, graph_buckets
        full = full_image_patches(self.args)
        max_rows = min(max_images * full, max_context)
        m2 = self.merge ** 2 if "merge_w" in self.w else 1
        self.buckets = graph_buckets(self.args, min(full, max_rows)) if use_graphs else []
        top = self.buckets[-1] if self.buckets else 0
        keys = {attention_tokens_key(b) for b in self.buckets}
        if max_rows > top:
            keys |= {attention_tokens_key(eager_rows(max_rows)), attention_tokens_key(eager_rows(top + 1))}
        steps = [(f"tune vision attention {k}", lambda k=k: self.warmup([k], segment=full)) for k in sorted(keys)]
        if self.buckets:
            steps.append(("vision output buffer", lambda: self.graph_output(top // m2)))   # sized once, for all
        steps += [(f"vision graph {b}", lambda b=b: self.capture(b, max_images)) for b in self.buckets]
        if max_rows > top:
            n = eager_rows(min(max_rows, top + 1))     # a multiple of 16: whole merge blocks in 2 rows
            grid = (self.merge, n // self.merge) if m2 > 1 else (1, n)

            def eager():
                with torch.inference_mode():
                    self.run(torch.randn(n, self.w["patch_w"].shape[1], device=self.w["patch_w"].device), [grid],
                             max_images, use_graphs)
            steps.append(("vision eager path", eager))
        return steps

    def run(self, patches: torch.Tensor, grids: list[tuple[int, int]], max_images: int,
            use_graphs: bool = True) -> torch.Tensor:
        """The request path: patches (n, C*p*p) of these images -> (n or n/m^2, out_dim) features. Replays the
        graph of the smallest bucket >= n (prepare() captured them all), or runs eagerly on n rounded up to
        ROW_ALIGN rows above the graph range. The result may be a view of a shared buffer: use it before
        the next call."""
        from .vision_buckets import bucket_for, eager_rows
        n = patches.shape[0]
        b = bucket_for(n, self.buckets) if use_graphs else None
        if b is not None:
            return self.capture(b, max_images)(patches, self.plan(grids, bucket=b, max_images=max_images))
        rows = eager_rows(n) if use_graphs else n
        plan = self.plan(grids, bucket=rows, max_images=max_images) if use_graphs else self.plan(grids)
        if rows != n:
            patches = torch.cat([patches, patches.new_zeros(rows - n, patches.shape[1])])
        return self(patches, plan)[:plan.n_merged]

    # ---------------------------------------------------------------- CUDA graphs
    def warmup(self, token_counts: list[int], segment: int | None = None) -> None:
        """Autotune the attention kernel for these bucket sizes (call before capture); segment: the longest
        image in the packs it tunes on (default: one image of each count)."""
        if self.attn_config is not None:
            return
        warmup_vision_attention(self.n_heads, self.head_dim, token_counts, dtype=self.w["patch_w"].dtype,
                                max_segment=segment,
                                block_m=self.block_m, rope=self.rope_mode == "fused",
                                layout="half" if self.rope_mode == "fused" else "interleaved",
                                device=self.w["patch_w"].device)

    def graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def graph_output(self, rows: int) -> torch.Tensor:
        """The graphs' shared feature buffer, (>= rows, out_dim); grown (a new buffer) if too small."""
        buf = self._out_buf
        if buf is None or buf.shape[0] < rows:
            self._out_buf = torch.empty(rows, self.out_dim(), device=self.w["patch_w"].device,
                                        dtype=self.w["patch_w"].dtype)
        return self._out_buf

    def capture(self, bucket: int, max_images: int, encode_only: bool = False) -> "VisionGraph":
        key = (bucket, max_images, encode_only)
        if key not in self._graphs:
            self._graphs[key] = VisionGraph(self, bucket, max_images, encode_only)
        return self._graphs[key]


class VisionGraph:
    """One CUDA graph of the encoder for a fixed (bucket, max_images). Call with unpadded patches."""

    def __init__(self, enc: FastVisionEncoder, bucket: int, max_images: int, encode_only: bool = False):
        self.enc, self.bucket, self.max_images, self.encode_only = enc, bucket, max_images, encode_only
        dev = enc.w["patch_w"].device
        merge = enc.merge if "merge_w" in enc.w else 1
        # captured with a placeholder plan (one merge x merge image + a padding segment); every call copies
        # its own plan's device tensors into these same buffers before replaying
        grids = [(merge, merge)]
        self.plan = plan_vision(grids, merge, bucket, max_images, enc.block_m, dev)
        self.patches = torch.randn(bucket, enc.w["patch_w"].shape[1], device=dev, dtype=enc.w["patch_w"].dtype)
        # every graph of the encoder shares one memory pool (their scratch memory overlaps: they never run
        # concurrently) and writes its features into one output buffer held outside the pool
        out_buf = None if encode_only else enc.graph_output(bucket // merge ** 2)
        fn = (lambda p, pl: enc.encode(p, pl)) if encode_only else (lambda p, pl: enc.forward(p, pl, out=out_buf))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # autotune + cuBLAS handles, outside the capture
                fn(self.patches, self.plan)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=enc.graph_pool()):
            self.out = fn(self.patches, self.plan)
        compile_events.captured()

    def __call__(self, patches: torch.Tensor, plan: VisionPlan) -> torch.Tensor:
        """patches (n_tokens, C*p*p) of a plan made with (bucket, max_images) -> the real output rows."""
        if plan.n_rows != self.bucket or plan.cu_seqlens.numel() != self.plan.cu_seqlens.numel():
            raise ValueError(f"plan was made for {plan.n_rows} rows / {plan.cu_seqlens.numel() - 2} images; this "
                             f"graph needs enc.plan(grids, bucket={self.bucket}, max_images={self.max_images})")
        n = patches.shape[0]
        self.patches[:n].copy_(patches)
        self.plan.copy_(plan)
        self.graph.replay()
        rows = plan.n_tokens if self.encode_only or self.plan.merge_index is None else plan.n_merged
        return self.out[:rows]
