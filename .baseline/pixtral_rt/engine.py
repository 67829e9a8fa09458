"""The request path: checkpoint -> model on the device -> (messages, sampling) -> streamed tokens.

    engine = Engine.load("/path/to/Pixtral-12B-2409")          # or Engine.load() for the random default
    for piece in engine.stream(messages, SamplingParams(max_tokens=64)):
        print(piece, end="", flush=True)
    engine.last                                                # GenerationResult: ids, text, timings

Per request the host plans once (chat.encode_request: tokens, images, patch grids, [IMG] positions), then
the backend runs: image patches -> vision encoder -> scatter into the prompt embeddings -> prefill ->
first token, and then one decode step per token. Two backends share this interface:
  ReferenceBackend  plain PyTorch reference model (CPU or GPU); the oracle, and the CPU path of the CLI
  FastBackend       Triton kernels; vision encoder and each decode step (all layers + sampling) replayed
                    from CUDA graphs (pixtral_rt/fast_backend.py)
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .chat import EncodedRequest, encode_request, load_tokenizer
from .config import PIXTRAL_12B, PixtralArgs, preset, tiny
from .errors import DeviceError
from .sampling import SamplingParams, SamplingState, sample
from .serving.detokenize import IncrementalText, find_stop, stop_prefix_len

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""          # "stop" (EOS or stop string), "length", "interrupted"
    prompt_tokens: int = 0
    image_patches: int = 0
    n_images: int = 0
    timings: dict = field(default_factory=dict)
    logprobs: list[float] = field(default_factory=list)   # of each output token, when asked for
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def default_random_model(device: torch.device) -> tuple[PixtralArgs, Path]:
    """The embedded default: seeded random weights of the real architecture (Pixtral-12B on a GPU, a tiny
    config on CPU), written once to a cache folder and then loaded through the real loader."""
    from .random_weights import write_random_checkpoint
    args = PIXTRAL_12B if device.type == "cuda" else tiny()
    root = Path(os.environ.get("PIXTRAL_RT_CACHE", Path.home() / ".cache" / "pixtral_rt"))
    folder = root / f"random-{args.name}-seed0"
    if not (folder / "params.json").is_file():
        print(f"pixtral_rt: writing random {args.name} weights to {folder} (once)", file=sys.stderr)
        tmp = folder.with_name(folder.name + ".partial")
        write_random_checkpoint(tmp, args, "mistral", seed=0, device=device, progress=True)
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        tmp.rename(folder)
    return args, folder


def decoder_weight_bytes(args: PixtralArgs, dtype_bytes: int = 2) -> int:
    """Bytes every decode step must read: all decoder matrices except the embedding table (one row only)."""
    t = args.text
    per_layer = (t.dim * (t.n_heads + 2 * t.n_kv_heads) * t.head_dim + t.n_heads * t.head_dim * t.dim
                 + 3 * t.dim * t.hidden_dim + 2 * t.dim)
    return (t.n_layers * per_layer + t.vocab_size * t.dim + t.dim) * dtype_bytes


def kv_bytes_per_token(args: PixtralArgs, dtype_bytes: int = 2) -> int:
    t = args.text
    return 2 * t.n_layers * t.n_kv_heads * t.head_dim * dtype_bytes


QUANTIZATIONS = ("fp8",)


@dataclass
class ModelSource:
    """What a load starts from: device, dtype, checkpoint plan, config and tokenizer (no weights yet)."""
    device: torch.device
    dtype: torch.dtype
    plan: object               # CheckpointPlan, or None for weights drawn on the device (random_preset)
    args: PixtralArgs
    folder: Path | None
    tokenizer: object
    random_default: bool       # no real weights (the embedded default or random_preset): text is meaningless
    t0: float
    name: str                  # for messages: the folder, or "random <preset>"
    quantization: str | None = None   # "fp8": decoder linears in FP8 (pixtral_rt/fp8.py)
    random_preset: str | None = None  # --random-weights PRESET: seeded weights generated on the device

    @property
    def format(self) -> str:
        return self.plan.format if self.plan is not None else "random (generated on the device)"

    def load_weights(self, progress: bool = True, shard: tuple[int, int] | None = None,
                     text_only: bool = False) -> dict[str, torch.Tensor]:
        """The weight dictionary the loader produces (our key names; FP8 linears as weight + weight_scale):
        from the checkpoint, or drawn on the device for random_preset (same per-name seeding as the writer).
        shard=(rank, world): this rank's slices only (pixtral_rt/sharding.py); text_only: the text decoder's
        tensors only (tensor-parallel followers)."""
        from .checkpoint import expected_shapes, load_state_dict
        from .fast_backend import _TEXT_PREFIXES
        keys = [k for k in expected_shapes(self.args) if k.startswith(_TEXT_PREFIXES)] if text_only else None
        if self.random_preset is not None:
            from .random_weights import random_state_dict_on_device
            return random_state_dict_on_device(self.args, seed=0, device=self.device, dtype=self.dtype,
                                               quantization=self.quantization, progress=progress, shard=shard,
                                               keys=keys)
        return load_state_dict(self.plan, device=self.device, dtype=self.dtype, progress=progress, keys=keys,
                               quantization=self.quantization, shard=shard)

    def precision(self) -> str:
        """For the load message and --json: which weights are in which precision."""
        dt = str(self.dtype).replace("torch.", "")
        if self.quantization != "fp8":
            return dt
        return (f"fp8 e4m3 decoder linears (wq wk wv wo w1 w2 w3: per-channel weight scales, per-token "
                f"dynamic activation scales in prefill); embeddings, lm_head, vision encoder, adapter {dt}")


def resolve_device(device: str | None) -> torch.device:
    """--device (cuda, cuda:N or cpu; None: cuda when a GPU is visible, else cpu) as a torch.device, checked
    before anything loads: DeviceError (exit 2 in the CLI and the server) for a device that is not there
    or not one this runtime runs on, rather than a RuntimeError from deep inside the first allocation."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise DeviceError(f"--device {device!r} is not a device this runtime runs on: use cuda, cuda:N (the "
                          "N-th visible GPU) or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else
               "this torch build has no CUDA" if torch.version.cuda is None else "no driver or GPU found")
        raise DeviceError(f"--device {device}: no CUDA GPU is visible ({why}); use --device cpu, or run where "
                          "a GPU is")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def resolve_model(model: str | Path | None, device: str | None, dtype: str | None, fmt: str | None,
                  quantization: str | None = None, random_weights: str | None = None, quiet: bool = False,
                  with_tokenizer: bool = True) -> ModelSource:
    """Device and dtype (CUDA + bf16 when a GPU is visible, else CPU + fp32), the checkpoint plan (format
    detected and printed; the embedded random default when model is None) and the tokenizer.
    quantization "fp8": quantise the decoder linears at load (an FP8 checkpoint is FP8 without asking).
    random_weights PRESET: no checkpoint; seeded random weights of that preset generated on the device at
    load (a benchmark / testing aid for models whose checkpoint does not fit the disk)."""
    from .checkpoint import plan_checkpoint

    t0 = time.perf_counter()
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    dev = resolve_device(device)
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
              "float32": torch.float32, "fp32": torch.float32, None: None}
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype!r} is not one of bfloat16, float16, float32")
    tdtype = dtypes[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if random_weights is not None:
        if model is not None:
            raise ValueError("give a checkpoint (--model) or --random-weights PRESET, not both")
        try:
            args = preset(random_weights)
        except ValueError as exc:
            raise ValueError(f"--random-weights: {exc}") from None
        if not quiet:
            print(f"pixtral_rt: random {args.name} weights (seed 0) generated on {dev} at load "
                  f"[random weights: the text will be meaningless]", file=sys.stderr)
        tokenizer = load_tokenizer(None, args) if with_tokenizer else None
        return ModelSource(dev, tdtype, None, args, None, tokenizer, True, t0, f"random {args.name}", quantization,
                           random_weights)
    random_default = model is None
    if random_default:
        default_args, folder = default_random_model(dev)
    else:
        folder = Path(model)
    plan = plan_checkpoint(folder, fmt)
    if getattr(plan, "quantization", None) is not None:
        quantization = "fp8"             # the checkpoint's own scheme (checkpoint.py validated it)
    if not quiet:
        print(f"pixtral_rt: {plan.describe()}" + (" [random weights: the text will be meaningless]"
                                                   if random_default else ""), file=sys.stderr)
    tokenizer = load_tokenizer(None if random_default else folder, plan.args) if with_tokenizer else None
    name = f"random {default_args.name}" if random_default else str(folder)
    return ModelSource(dev, tdtype, plan, plan.args, folder, tokenizer, random_default, t0, name, quantization)


def resolve_source(model, device, dtype, fmt, quantization=None, random_weights=None) -> ModelSource:
    """resolve_model without messages or tokenizer (tensor-parallel followers)."""
    return resolve_model(model, device, dtype, fmt, quantization, random_weights, quiet=True, with_tokenizer=False)


def load_reference_model(src: ModelSource, progress: bool = True):
    """The plain PyTorch reference model with the checkpoint's weights (built on meta, weights assigned)."""
    from .reference.fp8_linear import install_fp8_linears
    from .reference.model import PixtralModel
    sd = src.load_weights(progress)
    with torch.device("meta"):
        m = PixtralModel(src.args)
    install_fp8_linears(m, sd)
    m.load_state_dict(sd, assign=True, strict=True)
    return m.eval()


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
