"""The model behind the serving engine, over a paged KV cache. Two implementations, one interface:

    ReferencePagedModel   the plain PyTorch reference model (pixtral_rt/reference), attention by gathering
                          each sequence's pages: the CPU path of the engine and the oracle of the fast one
    FastPagedModel        Triton kernels (pixtral_rt/decoder.py FastDecoder paged methods, kernels/paged_*),
                          the fast vision encoder; decode steps captured in CUDA graphs by the model runner

Interface (shapes; every index tensor on the model's device):
    alloc(n_pages, page_size)                         allocate the K/V pages of every layer
    embed(tokens (T,) int64) -> (T, dim)
    image_features(req) -> (n_img_tokens, dim)        one request's images (EncodedRequest)
    prefill(h, positions, pages, offsets, block_table, cu_q, start_pos, max_q_len, rows) -> (R, vocab) fp32
        prompt chunks of S sequences packed in h (T, dim); see FastDecoder.prefill_paged
    decode(tokens (B,), positions (B,) int32, block_table (>=B, max_pages) int32, lens (B,) int32)
        -> (B, vocab) fp32; lens[b] = positions[b] + 1, or 0 for an idle row (its output is garbage, unused)
"""
from __future__ import annotations

import torch

from ..config import PixtralArgs
from ..reference.attention import causal_attention
from ..reference.rope import apply_rope, text_rope_angles


class ReferencePagedModel:
    raw_pixels = False      # the engine preprocesses images on the host

    def __init__(self, model, args: PixtralArgs, device, dtype, fp8_decode: str = "auto"):
        """fp8_decode (FP8 linears in decode steps, pixtral_rt/options.py): "w8a16" unquantised activations,
        "w8a8" quantised per token as in prefill, "auto" by the step's row count (fp8_decode_for)."""
        self.model, self.args, self.device, self.dtype = model, args, torch.device(device), dtype
        self.fp8_decode = fp8_decode
        self.k = self.v = None
        self.page_size = 0

    def alloc(self, n_pages: int, page_size: int) -> None:
        t = self.args.text
        shape = (t.n_layers, n_pages, t.n_kv_heads, page_size, t.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.page_size = page_size

    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(tokens)

    def vision_prepare_steps(self, max_context: int) -> list:
        return []                                   # no graphs, no tuning: nothing to prepare

    @torch.inference_mode()
    def image_features(self, req) -> torch.Tensor:
        return self.model.image_features([im.to(self.device, self.dtype) for im in req.images])

    def prefill(self, h, positions, pages, offsets, block_table, cu_q, start_pos, max_q_len, rows):
        cu, sp = cu_q.tolist(), start_pos.tolist()
        segs = [(cu[s], cu[s + 1], sp[s] + cu[s + 1] - cu[s], block_table[s]) for s in range(len(sp))]
        return self._forward(h, positions, pages, offsets, segs, rows)

    def decode(self, tokens, positions, block_table, lens):
        from ..options import fp8_decode_for
        from ..reference.fp8_linear import decode_mode
        P = self.page_size
        pages = block_table[:len(tokens)].gather(1, (positions // P).long()[:, None])[:, 0]
        pages = torch.where(lens > 0, pages, 0)           # idle rows write the trash page, never a real one
        segs = [(b, b + 1, n, block_table[b]) for b, n in enumerate(lens.tolist())]
        # FP8 "w8a16": decode keeps activations unquantised; "auto" decides by the rows, as the fast decoder
        with decode_mode(self.model, fp8_decode_for(self.fp8_decode, len(tokens))):
            return self._forward(self.embed(tokens), positions, pages, positions % P, segs, None)

    @torch.inference_mode()
    def _forward(self, h, positions, pages, offsets, segs, rows):
        """h (T, dim); segs: (first row, end row, keys seen by the last row, block-table row) per sequence."""
        t, m, P = self.args.text, self.model, self.page_size
        angles = text_rope_angles(positions.long(), t.head_dim, t.rope_theta)
        pages, offsets = pages.long(), offsets.long()
        for i, layer in enumerate(m.layers):
            q, k, v = layer.attention.qkv(layer.attention_norm(h))
            q, k = apply_rope(q, angles), apply_rope(k, angles)
            self.k[i][pages, :, offsets] = k          # (T, Hkv, D) into (page, :, row)
            self.v[i][pages, :, offsets] = v
            o = torch.zeros_like(q)
            for a, b, n_keys, table in segs:
                if n_keys == 0 or a == b:
                    continue
                npg = -(-n_keys // P)
                kk = self.k[i][table[:npg].long()].transpose(1, 2).reshape(npg * P, t.n_kv_heads, t.head_dim)
                vv = self.v[i][table[:npg].long()].transpose(1, 2).reshape(npg * P, t.n_kv_heads, t.head_dim)
                o[a:b] = causal_attention(q[a:b], kk[:n_keys], vv[:n_keys])
            h = h + layer.attention.wo(o.reshape(h.shape[0], -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        if rows is not None:
            h = h[rows]
        return m.output(m.norm(h)).float()


class FastPagedModel:
    raw_pixels = True       # decoded uint8 pixels go to the GPU; resize + normalise run there

    def __init__(self, decoder, vision, args: PixtralArgs, device, max_images: int, use_graphs: bool = True):
        self.decoder, self.vision, self.args = decoder, vision, args
        self.device, self.dtype = torch.device(device), decoder.dtype
        self.max_images, self.use_graphs = max_images, use_graphs

    @property
    def page_size(self) -> int:
        return self.decoder.page_size

    def alloc(self, n_pages: int, page_size: int) -> None:
        self.decoder.alloc_pages(n_pages, page_size)

    def embed(self, tokens):
        return self.decoder.embed(tokens)

    def vision_prepare_steps(self, max_context: int) -> list:
        """[(label, fn)]: attention tuning, every vision graph bucket, the eager path (FastVisionEncoder.
        prepare_steps)."""
        return self.vision.prepare_steps(max_context, self.max_images, self.use_graphs)

    def image_features(self, req):
        from ..vision import image_features
        return image_features(self.vision, req, self.args.vision.patch_size, self.device, self.max_images,
                              self.use_graphs)

    def prefill(self, h, positions, pages, offsets, block_table, cu_q, start_pos, max_q_len, rows):
        return self.decoder.prefill_paged(h, positions, pages, offsets, block_table, cu_q, start_pos, max_q_len,
                                          rows)

    def decode(self, tokens, positions, block_table, lens):
        return self.decoder.decode_step_paged(tokens, positions, block_table, lens)
