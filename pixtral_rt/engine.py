"""The synchronous Python API (batch-1 backends until they are removed)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from .chat import EncodedRequest, encode_request
from .config import PixtralArgs
from .loading import (ModelSource, decoder_weight_bytes, default_random_model, kv_bytes_per_token,  # noqa: F401
                      load_reference_model, resolve_device, resolve_model, resolve_source)
from .sampling import SamplingParams, SamplingState, sample
from .serving.detokenize import IncrementalText, find_stop, stop_prefix_len
from .serving.outputs import GenerationResult


class ReferenceBackend:
    """The plain PyTorch reference model behind the engine interface (batch 1)."""

    name = "reference"

    def __init__(self, model, args: PixtralArgs, device, dtype, max_context: int):
        from .reference.transformer import KVCache
        self.model, self.args, self.device, self.dtype = model, args, device, dtype
        self.max_context = max_context
        self._kv_cls = KVCache
        self.sampling = SamplingState(1, device)

    def start(self, req: EncodedRequest, params: SamplingParams) -> tuple[torch.Tensor, dict]:
        """Vision + prefill for one request -> first token (1,) on the device, and timings."""
        self.sampling.set(0, params)
        self.cache = self._kv_cls.empty(self.args.text, req.prompt_tokens + params.max_tokens, self.device, self.dtype)
        self.greedy = params.greedy
        t0 = _now(self.device)
        with torch.inference_mode():
            images = [im.to(self.device) for im in req.images]
            feats = self.model.image_features(images) if images else None
            t1 = _now(self.device)
            toks = torch.tensor(req.tokens, device=self.device)
            h = self.model.tok_embeddings(toks)
            if feats is not None:
                h = h.clone()
                h[torch.tensor(req.image_token_positions, device=self.device)] = feats.to(h.dtype)
            logits = self.model(h, 0, self.cache)[-1:]
            tok = sample(logits, self.sampling, greedy_only=self.greedy)
        t2 = _now(self.device)
        return tok, {"vision_ms": (t1 - t0) * 1e3, "prefill_ms": (t2 - t1) * 1e3}

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        from .reference.fp8_linear import decode_mode
        with torch.inference_mode(), decode_mode(self.model):
            h = self.model.tok_embeddings(tok)
            logits = self.model(h, self.cache.length, self.cache)
            return sample(logits, self.sampling, greedy_only=self.greedy)


def _now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Engine:
    def __init__(self, args: PixtralArgs, tokenizer, backend, info: dict, max_context: int, max_images: int = 12):
        self.args, self.tokenizer, self.backend, self.info = args, tokenizer, backend, info
        self.max_context, self.max_images = max_context, max_images
        self.last: GenerationResult | None = None

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | Path | None = None, *, device: str | None = None, dtype: str | None = None,
             max_context: int | None = None, max_images: int = 12, backend: str = "auto",
             fmt: str | None = None, progress: bool = True, use_graphs: bool = True,
             quantization: str | None = None, random_weights: str | None = None,
             tensor_parallel: int | None = None) -> "Engine":
        """quantization "fp8": FP8 decoder linears (an FP8 checkpoint is FP8 anyway); random_weights PRESET:
        seeded random weights generated on the device instead of a checkpoint (see resolve_model);
        tensor_parallel N: the decoder sharded over N processes (pixtral_rt/tensor_parallel.py; serving
        backend only)."""
        if (tensor_parallel or 1) > 1 and backend not in ("auto", "serving"):
            raise ValueError(f"--tensor-parallel needs the serving backend (--backend auto), not {backend!r}")
        src = resolve_model(model, device, dtype, fmt, quantization, random_weights)
        dev, tdtype, args, tokenizer, t0 = src.device, src.dtype, src.args, src.tokenizer, src.t0
        random_default = src.random_default
        ctx = min(max_context or args.text.max_seq_len, args.text.max_seq_len)
        if backend not in ("auto", "serving", "fast", "reference"):
            raise ValueError(f"backend must be auto, serving, fast or reference, got {backend!r}")
        if backend in ("auto", "serving"):
            # the continuous-batching engine (paged KV cache, prefix cache across chat turns), one request
            # at a time here; the CLI and this class are a thin layer over it
            from .serving.llm_engine import LLMEngine
            llm = LLMEngine.load(src, max_context=max_context, max_images=max_images, max_batch=1,
                                 tensor_parallel=tensor_parallel,
                                 progress=progress, use_graphs=use_graphs)
            return cls(args, tokenizer, llm, llm.info, llm.max_context, max_images)
        use_fast = backend == "fast"
        if use_fast:
            if dev.type != "cuda":
                raise RuntimeError("the fast backend needs a CUDA GPU; use --backend reference on CPU")
            from .fast_backend import FastBackend
            sd = src.load_weights(progress)
            load_s = time.perf_counter() - t0
            be = FastBackend(sd, args, dev, tdtype, max_context, max_images=max_images, progress=progress,
                             use_graphs=use_graphs)
            ctx = be.max_context
        else:
            m = load_reference_model(src, progress)
            load_s = time.perf_counter() - t0
            be = ReferenceBackend(m, args, dev, tdtype, ctx)
        from .preprocess import backend_info
        pre = "GPU (CUDA op, raw pixels uploaded)" if getattr(be, "raw_pixels", False) else backend_info()
        print(f"pixtral_rt: {be.name} backend on {dev}, {src.precision()}, context {ctx} tokens; "
              f"image preprocessing: {pre}", file=sys.stderr)
        info = {"model": src.name, "format": src.format, "quantization": src.quantization,
                "precision": src.precision(),
                "random_weights": random_default, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                else "cpu", "dtype": str(tdtype).replace("torch.", ""), "backend": be.name, "load_s": load_s,
                "max_context": ctx}
        return cls(args, tokenizer, be, info, ctx, max_images)

    # ------------------------------------------------------------------------------ requests
    def encode(self, messages, params: SamplingParams, raw_pixels: bool | None = None) -> EncodedRequest:
        """Plan + tokenise on the host. raw_pixels (default: what the backend wants) leaves resize and
        normalisation to the backend (the fast backend does them on the GPU)."""
        if raw_pixels is None:
            raw_pixels = getattr(self.backend, "raw_pixels", False)
        return encode_request(messages, self.tokenizer, self.args, max_images=self.max_images,
                              max_context=self.max_context, max_tokens=params.max_tokens, raw_pixels=raw_pixels)

    def _eos(self) -> int:
        return self.tokenizer.instruct_tokenizer.tokenizer.eos_id

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def stream(self, messages, params: SamplingParams | None = None, req: EncodedRequest | None = None
               ) -> Iterator[str]:
        """Yield text pieces as tokens are produced. `self.last` holds the result (also on Ctrl-C)."""
        params = params or SamplingParams()
        if hasattr(self.backend, "submit"):          # the serving engine
            res = GenerationResult()
            self.last = res
            yield from self.backend.stream(messages, params, req=req, result=res)
            tps = res.timings.get("decode_tok_s", 0.0)
            ctx = res.prompt_tokens + len(res.token_ids) / 2  # mean KV length read per step
            res.timings["decode_tok_s"] = tps
            res.timings["decode_GBps"] = tps * (decoder_weight_bytes(self.args)
                                                + kv_bytes_per_token(self.args) * ctx) / 1e9
            return
        t_start = time.perf_counter()
        req = req or self.encode(messages, params)
        t_enc = time.perf_counter()
        res = GenerationResult(prompt_tokens=req.prompt_tokens, image_patches=req.n_patches, n_images=req.n_images)
        self.last = res
        eos = self._eos()
        det = IncrementalText(self._decode)
        parts: list[str] = []   # yielded text
        pending = ""            # decoded, held back (may be the start of a stop string)
        dev = getattr(self.backend, "device", torch.device("cpu"))
        try:
            t0 = _now(dev)
            tok, tinfo = self.backend.start(req, params)
            nxt = int(tok.item())
            t_first = time.perf_counter()
            res.timings.update(encode_ms=(t_enc - t_start) * 1e3, queue_ms=0.0, **tinfo,
                               ttft_ms=(t_first - t_start) * 1e3)
            while True:
                if nxt == eos:
                    res.finish_reason = "stop"
                    pending += det.flush()
                else:
                    res.token_ids.append(nxt)
                    last = len(res.token_ids) >= params.max_tokens
                    if not last:
                        tok = self.backend.step(tok)  # enqueue the next step before any host work
                    pending += det.add(nxt)
                    if last:
                        res.finish_reason = "length"
                        pending += det.flush()
                stop_at = find_stop(pending, params.stop)
                if stop_at is not None:
                    pending, res.finish_reason = pending[:stop_at], "stop"
                # a stop string can only begin in `pending`: never yield what may be its first characters
                keep = 0 if res.finish_reason else stop_prefix_len(pending, params.stop)
                out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                if out:
                    parts.append(out)
                    yield out
                if res.finish_reason:
                    break
                nxt = int(tok.item())
            res.text = "".join(parts)
            t_end = _now(dev)
            n_dec = len(res.token_ids) - 1
            if n_dec > 0:
                tps = n_dec / (t_end - t_first)
                res.timings["decode_tok_s"] = tps
                ctx = req.prompt_tokens + len(res.token_ids) / 2  # mean KV length read per step
                res.timings["decode_GBps"] = tps * (decoder_weight_bytes(self.args)
                                                    + kv_bytes_per_token(self.args) * ctx) / 1e9
        except KeyboardInterrupt:
            res.finish_reason = "interrupted"
            res.text = self._decode(res.token_ids)
            raise
        finally:
            res.timings.setdefault("decode_tok_s", 0.0)
            res.timings.setdefault("decode_GBps", 0.0)

    def generate(self, messages, params: SamplingParams | None = None) -> GenerationResult:
        for _ in self.stream(messages, params):
            pass
        return self.last
