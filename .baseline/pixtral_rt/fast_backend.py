"""The GPU backend of the engine: Triton kernels, with the vision encoder and every decode step replayed
from CUDA graphs.

Request path (one slot, batch 1), all enqueued on one stream with no host synchronisation until the first
token is read:
    patches (pinned host -> device, non-blocking) -> vision graph of the patch-count bucket
    -> token embeddings with image features scattered into the [IMG] rows -> chunked prefill
    -> sample the first token into the decode graph's token buffer
Each decode step is one graph replay: embedding lookup, all layers, final norm, output projection and
sampling; the graph writes the next token into its own input buffer and advances the position, so the
host only launches replays and reads tokens back for streaming.

Vision: every graph bucket of pixtral_rt/vision_buckets.py (<= 12% padding rows, up to one full-size image) is
captured at load and the attention kernel tuned for every size a request can reach; larger packs run the
encoder eagerly on their real rows (nothing is compiled, tuned or captured at request time).
"""
from __future__ import annotations

import sys

import torch

from . import compile_events
from .config import PixtralArgs
from .decoder import FastDecoder
from .engine import kv_bytes_per_token
from .sampling import SamplingParams, SamplingState, sample
from .vision import FastVisionEncoder, pack_patches

_TEXT_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.")
GIB = 1 << 30


@torch.inference_mode()
def request_patches(req, patch_size: int, device) -> torch.Tensor:
    """The request's images as packed patches (n_patches, 3*p*p) fp32 on the device: preprocessed on the
    GPU straight into the packed buffer (raw uint8 pixels), or uploaded if already normalised."""
    from .preprocess import preprocess_cuda
    p = patch_size
    if not req.images_are_raw:
        packed = pack_patches(req.images, p, dtype=torch.float32)
        return packed.pin_memory().to(device, non_blocking=True)
    packed = torch.empty(req.n_patches, 3 * p * p, device=device, dtype=torch.float32)
    for pixels, hw, a, b in zip(req.images, req.image_out_hw, req.cu_seqlens[:-1], req.cu_seqlens[1:]):
        preprocess_cuda(pixels, hw, device=device, out=packed[a:b], layout="patches", patch_size=p)
    return packed


@torch.inference_mode()
def image_features(vision: FastVisionEncoder, req, patch_size: int, device, max_images: int,
                   use_graphs: bool) -> torch.Tensor:
    """Images of a request -> (n_image_tokens, text dim) on the device: the vision graph of its patch bucket
    (all captured at load by FastVisionEncoder.prepare_steps) or the eager encoder above the graph range. The
    result may be a view of the graphs' output buffer: use it before the next call."""
    patches = request_patches(req, patch_size, device)
    return vision.run(patches, req.patch_grids, max_images, use_graphs)


class FastBackend:
    name = "fast"

    def __init__(self, sd: dict[str, torch.Tensor], args: PixtralArgs, device, dtype, max_context: int | None,
                 max_images: int = 12, progress: bool = True, use_graphs: bool = True,
                 reserve_bytes: int = 6 * GIB):
        from tqdm import tqdm

        self.args, self.device, self.dtype = args, torch.device(device), dtype
        self.max_images = max(1, max_images)
        self.use_graphs = use_graphs
        vision_sd = {k: sd.pop(k) for k in list(sd) if not k.startswith(_TEXT_PREFIXES)}
        self.vision = FastVisionEncoder.from_state_dict(vision_sd, args, dtype, self.device)
        del vision_sd
        # KV cache size: what the caller asked for, capped by the model and by free memory (after the
        # one-layer transient the decoder makes when it fuses wqkv / w13, and a reserve for activations)
        t = args.text
        free, _ = torch.cuda.mem_get_info(self.device)
        fused = t.dim * ((t.n_heads + 2 * t.n_kv_heads) * t.head_dim + 2 * t.hidden_dim) * 2
        fit = max(0, free - fused - reserve_bytes) // kv_bytes_per_token(args)
        want = min(max_context or t.max_seq_len, t.max_seq_len)
        if fit < min(want, 4096):
            raise RuntimeError(f"not enough GPU memory for a KV cache: {free / GIB:.1f} GiB free after the weights, "
                               f"room for {fit} tokens")
        self.max_context = int(min(want, fit) // 256 * 256) or int(min(want, fit))
        if self.max_context < want:
            print(f"pixtral_rt: KV cache capped at {self.max_context} tokens by GPU memory (asked {want})",
                  file=sys.stderr)
        self.decoder = FastDecoder(t, sd, max_batch=1, max_seq=self.max_context, device=self.device, dtype=dtype,
                                   consume=True)  # frees each unfused weight as it is fused
        sd.clear()
        torch.cuda.empty_cache()
        self.sampling = SamplingState(1, self.device)
        self.tok = torch.zeros(1, dtype=torch.long, device=self.device)      # decode graph input/output
        self.pos = torch.zeros(1, dtype=torch.int32, device=self.device)     # position of self.tok
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        steps = [("autotune decoder", lambda: self.decoder.warmup(batch_sizes=(1,), prefill_lens=(1, 97, 2048)))]
        if use_graphs:
            steps += [(f"decode graph ({'greedy' if g else 'sampling'})", lambda g=g: self._capture_decode(greedy=g))
                      for g in (True, False)]
        steps += self.vision.prepare_steps(self.max_context, self.max_images, use_graphs)
        with tqdm(steps, desc="warm-up + graph capture", disable=not progress, file=sys.stderr, leave=False) as bar:
            for what, fn in bar:
                bar.set_postfix_str(what)
                fn()
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------ graphs
    def _decode_body(self, greedy: bool) -> None:
        logits = self.decoder.decode_step(self.tok, self.pos)
        nxt = sample(logits, self.sampling, greedy_only=greedy)
        self.tok.copy_(nxt)
        self.pos += 1

    def _capture_decode(self, greedy: bool) -> None:
        saved = self.sampling.step.clone()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._decode_body(greedy)  # allocator warm-up outside the capture
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._decode_body(greedy)
        compile_events.captured()
        self._graphs[greedy] = g
        self.sampling.step.copy_(saved)

    # ------------------------------------------------------------------------------ request
    raw_pixels = True  # the engine hands over decoded uint8 pixels; resize + normalise run on the GPU

    def patches(self, req) -> torch.Tensor:
        return request_patches(req, self.args.vision.patch_size, self.device)

    def image_features(self, req) -> torch.Tensor:
        return image_features(self.vision, req, self.args.vision.patch_size, self.device, self.max_images,
                              self.use_graphs)

    @torch.inference_mode()
    def start(self, req, params: SamplingParams) -> tuple[torch.Tensor, dict]:
        if req.prompt_tokens + params.max_tokens > self.max_context:
            raise ValueError(f"request needs {req.prompt_tokens} + {params.max_tokens} tokens, over the KV cache of "
                             f"{self.max_context}")
        self.sampling.set(0, params)
        self.greedy = params.greedy
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        toks = torch.tensor(req.tokens, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        h = self.decoder.embed(toks)
        if req.images:
            feats = self.image_features(req)
            slots = torch.tensor(req.image_token_positions, dtype=torch.long).pin_memory().to(self.device,
                                                                                              non_blocking=True)
            h.index_copy_(0, slots, feats.to(h.dtype))
        ev[1].record()
        logits = self.decoder.prefill(h, 0, 0)
        first = sample(logits[None], self.sampling, greedy_only=self.greedy)
        self.tok.copy_(first)
        self.pos.fill_(req.prompt_tokens)
        ev[2].record()
        ev[2].synchronize()
        # vision: patches -> features scattered into the prompt; prefill: the decoder over the prompt + sampling
        return self.tok, {"vision_ms": ev[0].elapsed_time(ev[1]), "prefill_ms": ev[1].elapsed_time(ev[2])}

    @torch.inference_mode()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Advance one token. `tok` must be the tensor start()/step() returned (the graph's own buffer)."""
        if tok is not self.tok:
            self.tok.copy_(tok)
        if self.use_graphs:
            self._graphs[self.greedy].replay()
        else:
            self._decode_body(self.greedy)
        return self.tok
