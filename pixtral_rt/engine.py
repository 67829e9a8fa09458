"""The synchronous Python API: one request at a time over the serving engine (serving/llm_engine.py).

    engine = Engine.load("/path/to/Pixtral-12B-2409")          # or Engine.load() for the random default
    for piece in engine.stream(messages, SamplingParams(max_tokens=64)):
        print(piece, end="", flush=True)
    engine.last                                                # GenerationResult: ids, text, timings
    engine.shutdown()

Nothing runs here: the request goes through LLMEngine (continuous batching over a paged KV cache, max batch
1 by default) as the server's requests do: on a GPU the fast model (Triton kernels, CUDA graphs), on CPU
the plain PyTorch reference model over the same pages (pixtral_rt/loading.py builds either). This class
adds what a one-request-at-a-time caller wants: `last` (the result of the latest request, also after
Ctrl-C) and the decode bandwidth of that request in its timings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .chat import EncodedRequest
from .loading import decoder_weight_bytes, kv_bytes_per_token
from .options import RuntimeOptions
from .sampling import SamplingParams
from .serving.outputs import GenerationResult


class Engine:
    def __init__(self, llm):
        self.llm = llm
        self.args, self.tokenizer, self.info = llm.args, llm.tokenizer, llm.info
        self.max_context, self.max_images = llm.max_context, llm.max_images
        self.last: GenerationResult | None = None

    @classmethod
    def load(cls, model: str | Path | None = None, *, device: str | None = None, dtype: str | None = None,
             max_context: int | None = None, max_images: int = 12, fmt: str | None = None, progress: bool = True,
             use_graphs: bool = True, quantization: str | None = None, random_weights: str | None = None,
             tensor_parallel: int | None = None, options: RuntimeOptions | None = None, max_batch: int = 1,
             **llm_kw) -> "Engine":
        """As LLMEngine.load (model folder, None for the embedded random default, or a ModelSource;
        quantization "fp8" or "int4"; random_weights PRESET; tensor_parallel N; options), with max_batch 1."""
        from .serving.llm_engine import LLMEngine
        return cls(LLMEngine.load(model, device=device, dtype=dtype, max_context=max_context, max_images=max_images,
                                  max_batch=max_batch, fmt=fmt, progress=progress, use_graphs=use_graphs,
                                  quantization=quantization, random_weights=random_weights,
                                  tensor_parallel=tensor_parallel, options=options, **llm_kw))

    def encode(self, messages, params: SamplingParams, raw_pixels: bool | None = None) -> EncodedRequest:
        """Plan + tokenise on the host (images fetched and decoded), as the engine will run it. raw_pixels
        False: images normalised on the host even where the engine would do it on the GPU (for a reference)."""
        if raw_pixels is None or raw_pixels == self.llm.raw_pixels:
            return self.llm.encode(messages, params.max_tokens)
        from .chat import encode_request
        return encode_request(messages, self.tokenizer, self.args, max_images=self.max_images,
                              max_context=self.max_context, max_tokens=params.max_tokens, raw_pixels=raw_pixels)

    def stream(self, messages, params: SamplingParams | None = None, req: EncodedRequest | None = None,
               logprobs: int | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are produced. `self.last` holds the result (also on Ctrl-C)."""
        params = params or SamplingParams()
        res = GenerationResult()
        self.last = res
        try:
            yield from self.llm.stream(messages, params, logprobs=logprobs, req=req, result=res)
        finally:
            tps = res.timings.setdefault("decode_tok_s", 0.0)
            ctx = res.prompt_tokens + len(res.token_ids) / 2  # mean KV length read per step
            res.timings["decode_GBps"] = tps * (decoder_weight_bytes(self.args)
                                                + kv_bytes_per_token(self.args) * ctx) / 1e9

    def generate(self, messages, params: SamplingParams | None = None, logprobs: int | None = None
                 ) -> GenerationResult:
        for _ in self.stream(messages, params, logprobs=logprobs):
            pass
        return self.last

    def compile_events(self) -> dict[str, int]:
        return self.llm.compile_events()

    def shutdown(self) -> None:
        self.llm.shutdown()
