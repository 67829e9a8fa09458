"""The serving engine: continuous batching over a paged KV cache, stepped by one thread of its own.

    eng = LLMEngine.load(model_dir or None, max_batch=64)     # loads, sizes the KV pool, captures graphs
    req = eng.encode(messages, max_tokens)                    # host work, in the caller's thread
    h = eng.submit(req, SamplingParams(...), on_output=cb, logprobs=None)
    h.cancel()
    for piece in eng.stream(messages, params): ...            # sync convenience (CLI, tests)

The step loop (one thread) owns the scheduler and the model runner. Other threads only append to the
waiting queue (under a lock) and set cancel flags, so HTTP work never delays a step. Each iteration:
schedule (host, under the lock) -> launch the step on the device -> deliver the PREVIOUS step's tokens
(wait for its event; callbacks) while this one runs. A sequence that ends is seen one step late: the step
after its last token (EOS) is computed and discarded.

KV pages come on demand (pixtral_rt/serving/scheduler.py): a request holds the pages of its prompt, plus one
more each time its last page fills; when none is left the youngest running request is preempted and later
resumed by recomputing prompt + delivered output. The token a preempted sequence sampled in the step before
(still on its way to the host) is dropped in `_deliver` and recomputed by the resume, so a stream goes on
with no gap and no duplicate. metrics(): preemptions_total, pages held by running sequences / cached
(evictable prefix pages) / free.
Interface for the HTTP side: pixtral_rt/serving/API.md.
"""
from __future__ import annotations

import atexit
import functools
import logging
import queue
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..chat import EncodedRequest, encode_request
from ..loading import ModelSource, build_model, check_kv_pool, kv_pool_tokens, resolve_model
from ..options import RuntimeOptions
from ..images import DEFAULT_LIMITS, ImageLimits
from ..sampling import SamplingParams
from .detokenize import TextStream
from .kv_pages import PagePool
from .api import check_admission
from .model_runner import ModelRunner, StepOutput
from .outputs import GenerationResult, TokenEvent
from .scheduler import QueueFullError, Scheduler

__all__ = ["LLMEngine", "QueueFullError", "RequestHandle"]
from .sequence import Sequence, Status, image_digest

log = logging.getLogger(__name__)
GIB = 1 << 30


def _warm_grammars(tokenizer) -> None:
    """Build the tokenizer's grammar-library state at load (structured output), if the library is installed."""
    try:
        from ..structured import warm_up
        warm_up(tokenizer)
    except ImportError:               # llguidance missing: constrained requests are refused with the reason
        pass


def _shutdown_if_alive(ref) -> None:
    eng = ref()
    if eng is not None:
        eng.shutdown()


class RequestHandle:
    def __init__(self, engine: "LLMEngine", seq: Sequence):
        self._engine, self._seq = engine, seq

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    def cancel(self) -> None:
        self._engine._cancel(self._seq)


@dataclass
class _Counters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_prompt_tokens: int = 0
    requests_finished: int = 0
    steps: int = 0
    extra: dict = field(default_factory=dict)
    # host seconds of the step loop by part (benchmarks): run (launch, with before_sample inside), take +
    # masks (before_sample: a constrained step's previous tokens, its masks), wait (for the previous step's
    # tokens), deliver (tokens into sequences and out to their consumers)
    host_s: dict = field(default_factory=lambda: dict.fromkeys(("run", "take", "masks", "wait", "deliver"), 0.0))


class LLMEngine:
    def __init__(self, args, tokenizer, model, info: dict, max_context: int, max_images: int, max_batch: int,
                 n_pages: int, page_size: int = 64, max_queue: int = 1024, chunk_tokens: int = 512,
                 use_graphs: bool = True, progress: bool = True, prefill_schedule: str = "fifo"):
        self.args, self.tokenizer, self.info = args, tokenizer, info
        self.max_context, self.max_images, self.max_batch = max_context, max_images, max_batch
        self.eos_id = tokenizer.instruct_tokenizer.tokenizer.eos_id
        self.raw_pixels = model.raw_pixels
        self.pool = PagePool(n_pages, page_size)
        self.scheduler = Scheduler(self.pool, max_batch, chunk_tokens=chunk_tokens, max_queue=max_queue,
                                   max_context=max_context, prefill_schedule=prefill_schedule)
        self.runner = ModelRunner(model, args, model.device, max_batch, n_pages, page_size, max_context,
                                  use_graphs=use_graphs, progress=progress, eos_id=self.eos_id)
        self.counters = _Counters()
        # a GPU step runs while the host delivers the previous one's tokens; on CPU a step is done on return
        self._overlap = model.device.type == "cuda"
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="pixtral-rt-step-loop", daemon=True)
        self._thread.start()
        # stop the loop before interpreter teardown: a daemon thread inside a torch op at exit aborts the process
        # (a weak reference: a shut-down engine's memory must not stay pinned by the atexit table)
        self._atexit = functools.partial(_shutdown_if_alive, weakref.ref(self))
        atexit.register(self._atexit)
        self.ready = True

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model=None, *, device: str | None = None, dtype: str | None = None, max_context: int | None = None,
             max_images: int = 12, max_batch: int = 64, max_queue: int = 1024, page_size: int = 64,
             kv_tokens: int | None = None, fmt: str | None = None, progress: bool = True, use_graphs: bool = True,
             chunk_tokens: int = 512, prefill_schedule: str = "fifo", reserve_bytes: int = 8 * GIB,
             quantization: str | None = None,
             random_weights: str | None = None, tensor_parallel: int | None = None,
             options: RuntimeOptions | None = None) -> "LLMEngine":
        """model: a checkpoint folder, None (the embedded random default) or a resolved ModelSource.
        kv_tokens: size of the KV page pool in tokens (default: GPU memory left after weights minus
        reserve_bytes; on CPU 4 full contexts). quantization "fp8" / "int4": FP8 / int4 decoder linears;
        random_weights PRESET: seeded random weights generated on the device (loading.resolve_model). tensor_parallel N: the
        decoder sharded over N processes, this one rank 0 (pixtral_rt/tensor_parallel.py); under torchrun the
        world is the launcher's, and ranks != 0 follow rank 0 here and exit when it stops. options: the
        measured alternatives (pixtral_rt/options.py), carried to every rank. chunk_tokens / prefill_schedule:
        the prefill token budget of a step while others decode and how it is shared among prompts
        (serving/scheduler.py). Building the model and sizing the KV pool: pixtral_rt/loading.py."""
        from .. import compile_events
        from .. import tensor_parallel as tpm
        options = options or RuntimeOptions()
        env = tpm.torchrun_env()
        world = env[1] if env else (tensor_parallel or 1)
        if env and tensor_parallel not in (None, 1, world):
            raise ValueError(f"--tensor-parallel {tensor_parallel} but torchrun started {world} processes")
        if world < 1:
            raise ValueError(f"--tensor-parallel must be >= 1, got {world}")
        if env and env[0] != 0:                       # a torchrun follower: never returns to the caller
            src = model if isinstance(model, ModelSource) else None
            tpm.follow_from_env(dict(model=str(src.folder) if src and src.folder else model, device=device,
                                     dtype=dtype, fmt=fmt, quantization=quantization, random_weights=random_weights,
                                     options=options.to_dict(), max_batch=max_batch, max_images=max_images,
                                     max_context=max_context, page_size=page_size))
            raise SystemExit(0)
        compile_events.install()          # count compiles / tunings / captures from the start of the load
        from ..preprocess import set_backend
        set_backend(options.preprocess)
        src = model if isinstance(model, ModelSource) else resolve_model(model, device, dtype, fmt, quantization,
                                                                         random_weights)
        args, dev = src.args, src.device
        ctx = min(max_context or args.text.max_seq_len, args.text.max_seq_len)
        build_kw = dict(max_batch=max_batch, max_seq=ctx + page_size, max_images=max_images)
        if world > 1 or tpm.one_rank_forced():
            model_, backend, use_graphs, kv_default = tpm.start_leader(src, world, env, build_kw, use_graphs,
                                                                       progress, options)
            kv_tokens = kv_tokens if kv_tokens is not None else kv_default
            dev = src.device
        else:
            model_ = build_model(src, use_graphs=use_graphs, progress=progress, options=options, **build_kw)
            backend = f"{'fast' if dev.type == 'cuda' else 'reference'} (paged, continuous batching)"
        n_pages = kv_pool_tokens(src, ctx, page_size, reserve_bytes, world, kv_tokens) // page_size
        check_kv_pool(n_pages, page_size, ctx)
        load_s = time.perf_counter() - src.t0
        info = {"model": src.name, "format": src.format, "random_weights": src.random_default,
                "tensor_parallel": world,
                "quantization": src.quantization, "precision": src.precision(),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "dtype": str(src.dtype).replace("torch.", ""), "backend": backend, "load_s": load_s,
                "max_context": ctx, "kv_cache_tokens": (n_pages - 1) * page_size, "max_batch": max_batch}
        eng = cls(args, src.tokenizer, model_, info, ctx, max_images, max_batch, n_pages, page_size, max_queue,
                  chunk_tokens, use_graphs, progress, prefill_schedule)
        if dev.type == "cuda" and use_graphs:
            eng.runner.warmup_info["warm_request_s"] = round(eng.warm_request(), 2)
            eng.runner.warmup_info["warmup_s"] += eng.runner.warmup_info["warm_request_s"]
        if dev.type == "cuda":
            _warm_grammars(src.tokenizer)     # ~0.6 s once, not on a server's first constrained request
        info["load_s"] = time.perf_counter() - src.t0
        w = info["warmup"] = dict(eng.runner.warmup_info)
        prepared = (f"; warm-up {w['warmup_s']:.1f} s: {w['decode_graphs']} decode graphs, {w['vision_buckets']} "
                    f"vision buckets, {w['triton_compiles']} kernel compiles, {w['autotunes']} autotunings, "
                    f"+{w['warmup_extra_GB']:.2f} GB") if w else ""
        print(f"pixtral_rt: {backend} on {dev}, {info['precision']}, context {ctx} tokens, KV cache "
              f"{info['kv_cache_tokens']} tokens in {n_pages - 1} pages of {page_size}, max batch {max_batch}; "
              f"ready in {info['load_s']:.1f} s{prepared}", file=sys.stderr)
        return eng

    def warm_request(self) -> float:
        """One small request end to end before the first user's (issue 12), so that the first real request
        costs what the next ones do: it is the first run of what the kernel warm-up does not touch -- the
        JPEG and PNG decoders and the image threads, the tokenizer's caches, the GPU preprocessing op, CUDA
        modules loaded on first use, the feature and prefix caches. Afterwards the caches forget it and the
        counters restart at 0. Returns its seconds."""
        import io

        import numpy as np
        from PIL import Image
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        files = []
        for fmt, (h, w) in (("JPEG", (40, 56)), ("PNG", (24, 72))):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
            files.append(buf.getvalue())
        msgs = [{"role": "user", "content": [{"type": "image", "image": f} for f in files]
                 + [{"type": "text", "text": "Describe the two images."}]}]
        req = encode_request(msgs, self.tokenizer, self.args, max_images=self.max_images,
                             max_context=self.max_context, max_tokens=2, raw_pixels=self.raw_pixels, workers=0)
        for _ in self.stream(None, SamplingParams(max_tokens=2, temperature=0.0), req=req):
            pass
        deadline = time.perf_counter() + 10       # the step loop releases the finished sequence next step
        while (self.scheduler.n_running or self.scheduler.n_waiting) and time.perf_counter() < deadline:
            time.sleep(0.001)
        with self._cv:
            self.pool.forget_cached()
            self.runner.features.clear()
            self.counters = _Counters()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ requests (any thread)
    def encode(self, messages, max_tokens: int, image_limits: ImageLimits = DEFAULT_LIMITS,
               tools: list | None = None) -> EncodedRequest:
        """Plan, fetch / decode images, tokenise, check the context (raises PixtralInputError subclasses).
        tools: OpenAI function tools, tokenised into the prompt (chat.encode_request)."""
        return encode_request(messages, self.tokenizer, self.args, max_images=self.max_images,
                              max_context=self.max_context, max_tokens=max_tokens, image_limits=image_limits,
                              raw_pixels=self.raw_pixels, digest=image_digest, tools=tools)

    def submit(self, req: EncodedRequest, params: SamplingParams, on_output: Callable[[TokenEvent], None],
               logprobs: int | None = None, request_id: str = "",
               first_token_ack: threading.Event | None = None) -> RequestHandle:
        """Queue one request; `on_output` gets its TokenEvents from the step thread. `first_token_ack`
        (optional, in-process consumers): the step thread waits up to 2 ms after emitting the first token
        for the consumer to set it, so the consumer gets the GIL at once rather than after the next
        step's host work (measured: ~1 ms of TTFT otherwise)."""
        check_admission(req, params, logprobs, self.pool.page_size, self.pool.usable,   # serving/api.py
                        vocab=self.args.text.vocab_size)
        digests = req.image_digests if len(req.image_digests) == len(req.images) else [image_digest(im) for im in
                                                                                        req.images]
        seq = Sequence(req, params, on_output, logprobs, digests=digests,
                       request_id=request_id, t_submit=time.perf_counter(), first_token_ack=first_token_ack)
        if params.constraint is not None:        # structured output / tool calls: compiled here, off the loop
            seq.matcher = self._matcher(params.constraint)
        seq.plan_prefix(self.pool.page_size, self.args.vision.spatial_merge_size)
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is shut down")
            seq.t_enqueued = time.perf_counter()
            self.scheduler.add(seq)
            self._cv.notify()
        return RequestHandle(self, seq)

    def _matcher(self, constraint):
        """A fresh grammar matcher of a request's constraint (compiled grammars are cached there)."""
        from ..structured import make_matcher     # the grammar library lives in pixtral_rt/structured
        return make_matcher(constraint, self.tokenizer, self.args.text.vocab_size)

    def _cancel(self, seq: Sequence) -> None:
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def compile_events(self) -> dict[str, int]:
        """Triton compilations, autotuner tunings and CUDA graph captures in this process so far
        (pixtral_rt/compile_events.py): compare before and after a request to see what it paid for."""
        from .. import compile_events
        return compile_events.snapshot()

    def metrics(self) -> dict:
        c = self.counters
        return {"running": self.scheduler.n_running, "waiting": self.scheduler.n_waiting,
                "kv_pages_used": self.pool.used, "kv_pages_total": self.pool.usable,
                "kv_pages_cached": self.pool.cached, "kv_pages_free": len(self.pool.free),
                "preemptions_total": self.scheduler.preemptions,
                "kv_page_size": self.pool.page_size, "prompt_tokens_total": c.prompt_tokens,
                "generation_tokens_total": c.generation_tokens, "cached_prompt_tokens_total": c.cached_prompt_tokens,
                "requests_finished_total": c.requests_finished, "steps_total": c.steps}

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cv:
            if self._stop:
                return
            for s in list(self.scheduler.waiting) + list(self.scheduler.running):
                s.cancelled = True
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        atexit.unregister(self._atexit)
        self.ready = False
        stop = getattr(self.runner.model, "shutdown", None)
        if stop is not None:              # tensor parallel: tell the followers to exit, wait for them
            stop()

    # ------------------------------------------------------------------ sync convenience
    def stream(self, messages, params: SamplingParams | None = None, logprobs: int | None = None,
               req: EncodedRequest | None = None, result: GenerationResult | None = None) -> Iterator[str]:
        """Text pieces of one request (stop strings applied). `result` (optional) is filled as it goes."""
        params = params or SamplingParams()
        res = result if result is not None else GenerationResult()
        t0 = time.perf_counter()
        req = req or self.encode(messages, params.max_tokens)
        # stages of the time to first token: encode_ms (host: image fetch + decode + preprocess, tokenise)
        # here, then queue_ms, vision_ms, prefill_ms from the engine (TokenEvent.timings); ttft_ms is the
        # whole, from this call to the first token in hand
        res.timings["encode_ms"] = (time.perf_counter() - t0) * 1e3
        res.prompt_tokens, res.image_patches, res.n_images = req.prompt_tokens, req.n_patches, req.n_images
        q: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        ack = threading.Event()          # set when the first token is in hand: see submit()
        h = self.submit(req, params, q.put, logprobs, first_token_ack=ack)
        text = TextStream(self.tokenizer, params.stop)
        t_first = None
        try:
            while True:
                ev = q.get()
                if ev.timings:
                    res.timings.update(ev.timings)
                if ev.token_ids and t_first is None:
                    t_first = time.perf_counter()
                    res.timings["ttft_ms"] = (t_first - t0) * 1e3
                    ack.set()
                res.token_ids += ev.token_ids
                if ev.logprobs is not None:
                    res.logprobs += ev.logprobs
                    res.top_logprobs += ev.top_logprobs or []
                piece = text.add(ev.token_ids)
                if text.stopped:
                    h.cancel()
                    res.finish_reason = "stop"
                elif ev.finish_reason:
                    piece += text.finish()
                    res.finish_reason = ev.finish_reason
                    if ev.error:
                        raise RuntimeError(ev.error)
                if piece:
                    yield piece
                if res.finish_reason:
                    break
        except BaseException:
            h.cancel()
            res.finish_reason = res.finish_reason or "interrupted"
            raise
        finally:
            res.text = text.text
            n = len(res.token_ids)
            if t_first is not None and n > 1:
                res.timings["decode_tok_s"] = (n - 1) / (time.perf_counter() - t_first)

    def generate(self, messages, params: SamplingParams | None = None, logprobs: int | None = None
                 ) -> GenerationResult:
        res = GenerationResult()
        for _ in self.stream(messages, params, logprobs, result=res):
            pass
        return res

    # ------------------------------------------------------------------ the step loop (its own thread)
    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException as exc:  # noqa: BLE001 - a bug in the loop: fail every request rather than hang
            log.exception("the step loop stopped")
            with self._cv:
                self._stop, self.ready = True, False
                seqs = list(self.scheduler.waiting) + list(self.scheduler.running)
            for s in seqs:
                if s.finish_reason is None:
                    s.finish_reason, s.status = "error", Status.FINISHED
                    self._emit(s, TokenEvent(finish_reason="error", error=f"the engine stopped: {exc}",
                                             prompt_tokens=s.prompt_len))

    def _steps(self) -> None:
        prev: StepOutput | None = None
        while True:
            with self._cv:
                while not self._stop and prev is None and not self.scheduler.running and not self.scheduler.waiting:
                    self._cv.wait()
                if self._stop and prev is None:
                    plan = self.scheduler.schedule()     # releases everything (all cancelled)
                    self._finish_released(plan.released)
                    return
                t_woke = time.perf_counter()
                plan = self.scheduler.schedule()
            for sq in plan.admitted:
                if not sq.preemptions:                 # the first admission: queue_ms's parts (TokenEvent.timings)
                    sq.t_woke = t_woke
            self._finish_released(plan.released)
            # constrained sequences that sample in this step need their grammar advanced by the previous
            # step's tokens: the runner launches the decode forward, then calls before_sample, which
            # delivers the previous step (its tokens are ready once the GPU reaches this forward) and
            # uploads the masks while the forward runs; free batches skip this
            # (the grammars take the tokens there; their consumers are told once the sampling is launched, so
            # waking them does not stand between the masks and the GPU)
            cons = [s for s in plan.decode + [c.seq for c in plan.prefill if c.last] if s.matcher is not None]
            before_sample, held, pending = None, None, []
            if cons:
                held, prev = [prev], None            # taken by before_sample (or delivered below if it never ran)

                def before_sample():
                    t0 = time.perf_counter()
                    if held[0] is not None:
                        p, held[0] = held[0], None
                        pending.append(self._take(p))
                    t1 = time.perf_counter()
                    self._set_masks([s for s in cons if s.finish_reason is None and not s.cancelled])
                    hs = self.counters.host_s
                    hs["take"] += t1 - t0
                    hs["masks"] += time.perf_counter() - t1
            else:
                self.runner.set_token_masks([])       # clears the masks of sequences constrained before
            t0 = time.perf_counter()
            try:
                out = self.runner.run(plan, before_sample)
                for c in plan.prefill:
                    self.scheduler.register_prefix(c.seq)
                self.counters.steps += 1
            except Exception as exc:  # noqa: BLE001 - e.g. CUDA OOM: fail the step's requests, keep serving
                log.exception("step failed")
                if held and held[0] is not None:      # the step failed before before_sample: its tokens stand
                    self._deliver(held[0])
                self._fail(plan, exc)
                out = None
            t1 = time.perf_counter()
            for events in pending:
                self._emit_all(*events)
            hs = self.counters.host_s
            hs["run"] += t1 - t0
            hs["deliver"] += time.perf_counter() - t1
            if prev is not None:
                self._deliver(prev)
            prev = out if out is not None and (out.reports or out.stages) else None
            if prev is not None and not self._overlap:
                self._deliver(prev)      # CPU: the step has finished already; waiting a step would only add latency
                prev = None

    def _set_masks(self, seqs: list[Sequence]) -> None:
        """Token masks of the constrained sequences the next step samples (each matcher is current: every
        token before this step was delivered to it); every other slot samples freely. Runs while the GPU
        computes this step's forward (ModelRunner.run's before_sample)."""
        if seqs:
            rows = self.runner.mask_buffer(len(seqs))        # (n, ceil(V / 32)) int32, host
            from ..structured import Matcher, fill_bitmasks
            ms = [s.matcher for s in seqs]
            if all(isinstance(m, Matcher) for m in ms):
                fill_bitmasks(ms, rows)                      # on llguidance's threads, GIL released
            else:                                            # other matchers (tests): one by one
                for i, m in enumerate(ms):
                    m.fill_bitmask(rows[i])
        self.runner.set_token_masks([s.slot for s in seqs])

    def _finish_released(self, released: list[Sequence]) -> None:
        for s in released:
            if s.finish_reason is None:                 # cancelled before it finished
                s.finish_reason = "abort"
                self._emit(s, TokenEvent(finish_reason="abort", prompt_tokens=s.prompt_len,
                                         cached_tokens=s.num_cached))

    def _fail(self, plan, exc: Exception) -> None:
        msg = ("the GPU ran out of memory during this step; retry with a shorter request"
               if isinstance(exc, torch.cuda.OutOfMemoryError) else f"internal error in the model step: {exc}")
        for s in plan.decode + [c.seq for c in plan.prefill]:
            if s.finish_reason is None:
                s.finish_reason, s.status = "error", Status.FINISHED
                self._emit(s, TokenEvent(finish_reason="error", error=msg, prompt_tokens=s.prompt_len))

    def _deliver(self, out: StepOutput) -> None:
        t0 = time.perf_counter()
        out.wait()
        t1 = time.perf_counter()
        self._emit_all(*self._take(out, waited=True))
        hs = self.counters.host_s
        hs["wait"] += t1 - t0
        hs["deliver"] += time.perf_counter() - t1

    def _take(self, out: StepOutput, waited: bool = False) -> tuple[list, list]:
        """A finished step's tokens into their sequences (output, grammar, finish reason): the events to emit
        and the first-token acknowledgements to wait for (_emit_all)."""
        if not waited:
            out.wait()
        for seq, kind, ms in out.stage_ms():
            if kind == "vision":
                seq.vision_ms += ms
            else:
                seq.prefill_ms += ms
        toks = out.tokens.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        now = time.perf_counter()
        c = self.counters
        acks, events = [], []                           # acks: first tokens out: hand their consumers the GIL
        for seq, slot in out.reports:
            if seq.finish_reason is not None or seq.cancelled:
                continue                                # ended earlier: this token was computed past its end
            if seq.status == Status.WAITING:
                continue                                # preempted after this step: its resume recomputes it
            tok = toks[slot]
            ev = TokenEvent(prompt_tokens=seq.prompt_len, cached_tokens=seq.num_cached)
            if not seq.output and not seq.t_first:
                seq.t_first = now
                ev.timings = {"queue_ms": max(0.0, seq.t_admit - seq.t_submit) * 1e3,
                              # its parts: submit()'s host work (admission checks, prefix keys), then the step
                              # thread's wake-up (or the step it was busy with), then the scheduler's call
                              "queue_submit_ms": max(0.0, seq.t_enqueued - seq.t_submit) * 1e3,
                              "queue_wake_ms": max(0.0, seq.t_woke - seq.t_enqueued) * 1e3,
                              "queue_schedule_ms": max(0.0, seq.t_admit - seq.t_woke) * 1e3,
                              "vision_ms": seq.vision_ms, "prefill_ms": seq.prefill_ms}
                c.prompt_tokens += seq.prompt_len
                c.cached_prompt_tokens += seq.num_cached
                if seq.first_token_ack is not None:
                    acks.append(seq.first_token_ack)
            if tok == self.eos_id or tok in seq.params.stop_token_ids:   # neither is emitted
                seq.finish_reason = "stop"
            else:
                seq.output.append(tok)
                c.generation_tokens += 1
                ev.token_ids = [tok]
                if seq.matcher is not None:
                    ev.error = self._advance_grammar(seq, tok)
                if seq.logprobs is not None and lps is not None:
                    ev.logprobs = [lps[slot]]
                    k = seq.logprobs
                    ev.top_logprobs = [list(zip(out.top_ids[slot, :k].tolist(), out.top_logprobs[slot, :k].tolist()))]
                if len(seq.output) >= seq.max_tokens and seq.finish_reason is None:   # grammar "stop" wins
                    seq.finish_reason = "length"
            if seq.finish_reason is not None:
                seq.status = Status.FINISHED
                c.requests_finished += 1
                ev.finish_reason = seq.finish_reason
            events.append((seq, ev))
        return events, acks

    def _emit_all(self, events: list, acks: list) -> None:
        for seq, ev in events:
            self._emit(seq, ev)
        for a in acks:       # Event.wait releases the GIL; the consumer sets it once the token is in hand
            a.wait(0.002)

    @staticmethod
    def _advance_grammar(seq: Sequence, tok: int) -> str | None:
        """Feed a delivered token to the sequence's grammar; a complete grammar ends it with "stop".
        Returns the error of a token the grammar refuses (the mask makes that a bug: the request fails)."""
        try:
            seq.matcher.accept(tok)
        except ValueError as exc:
            log.error("%s: sampled token %d outside its grammar: %s", seq.request_id, tok, exc)
            seq.finish_reason = "error"
            return f"internal error: token {tok} was sampled outside the request's grammar ({exc})"
        if seq.matcher.is_stopped():
            seq.finish_reason = "stop"
        return None

    @staticmethod
    def _emit(seq: Sequence, ev: TokenEvent) -> None:
        try:
            seq.on_output(ev)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the step loop
            log.exception("output callback of %s failed", seq.request_id)
