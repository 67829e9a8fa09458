"""The engine in a process of its own, behind the same API as LLMEngine (pixtral_rt/serving/API.md).

    eng = EngineClient.start(model=None, max_batch=64, ...)      # spawns the engine process, waits for ready
    req = eng.encode(messages, max_tokens)                       # here: images, tokens (CPU work)
    h = eng.submit(req, params, on_output, logprobs)             # -> the engine process
    h.cancel(); eng.metrics(); eng.shutdown()

Why a process: the HTTP side (request parsing, image decoding, detokenising, JSON and SSE for every token
of every stream) and the step loop share one interpreter lock in a single process, so at 64 streams the
HTTP work delays the steps (measured: see docs/NOTES.md, serving). The engine process runs LLMEngine
(step loop thread + a command reader); this process keeps the tokenizer for encode() and the consumers'
TextStreams. Messages (pickled over two pipes):
    to the engine:   ("submit", rid, EncodedRequest, SamplingParams, logprobs) | ("cancel", rid) | ("stop",)
    to the engine:   ("metrics",) -> ("metrics", dict) back
    from the engine: ("ready", info, args, max_context, max_images, metrics) | ("error", message) at start,
                     then per drain ("events", [(rid, TokenEvent), ...]) | ("refused", rid, status, kind, message)
The engine's submission refusals (can never fit, queue full) are checked here first, so submit() raises
them synchronously as LLMEngine.submit does; a refusal that still happens there comes back as a final
TokenEvent with finish_reason "error".
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import queue
import threading
from typing import Callable

from ..chat import EncodedRequest, encode_request, load_tokenizer
from ..images import DEFAULT_LIMITS, ImageLimits
from ..sampling import SamplingParams
from .api import check_admission
from .outputs import TokenEvent
from .scheduler import QueueFullError
from .sequence import image_digest

log = logging.getLogger(__name__)


def _call(cb, ev: TokenEvent) -> None:
    """A consumer's callback; its failure (e.g. its event loop closed) must not stop the reader."""
    try:
        cb(ev)
    except Exception:  # noqa: BLE001
        log.exception("an output callback failed")


def _put_all(items: list) -> None:
    """On an event loop's thread: a batch of (put, event) in arrival order (one wake-up for all)."""
    for put, ev in items:
        _call(put, ev)


class _Handle:
    def __init__(self, client: "EngineClient", rid: str):
        self._client, self.request_id = client, rid

    def cancel(self) -> None:
        self._client._send(("cancel", self.request_id))


def _engine_main(conn_in, conn_out, kwargs: dict) -> None:
    """The engine process: load, then forward commands to LLMEngine and its events back in batches."""
    from .llm_engine import LLMEngine
    try:
        eng = LLMEngine.load(**kwargs)
    except BaseException as exc:  # noqa: BLE001 - report any load failure to the parent as one line
        conn_out.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn_out.send(("ready", eng.info, eng.args, eng.max_context, eng.max_images, eng.metrics()))
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    send_lock = threading.Lock()

    def sender():
        while True:
            item = outbox.get()
            if item is None:
                return
            batch = [item]
            try:
                while True:
                    nxt = outbox.get_nowait()
                    if nxt is None:
                        outbox.put(None)
                        break
                    batch.append(nxt)
            except queue.Empty:
                pass
            with send_lock:
                conn_out.send(("events", batch))

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    handles = {}
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "submit":
            _, rid, req, params, logprobs = msg

            def cb(ev, rid=rid):
                outbox.put((rid, ev))
                if ev.finish_reason is not None:
                    handles.pop(rid, None)
            try:
                handles[rid] = eng.submit(req, params, cb, logprobs, request_id=rid)
            except Exception as exc:  # noqa: BLE001 - refused: tell the parent (status + message)
                with send_lock:
                    conn_out.send(("refused", rid, getattr(exc, "status", 500), type(exc).__name__, str(exc)))
        elif msg[0] == "cancel":
            h = handles.get(msg[1])
            if h is not None:
                h.cancel()
        elif msg[0] == "metrics":
            with send_lock:
                conn_out.send(("metrics", eng.metrics()))
        elif msg[0] == "stop":
            break
    eng.shutdown()
    outbox.put(None)
    th.join(5)


class EngineClient:
    def __init__(self):
        self.ready = False
        self._callbacks: dict[str, Callable[[TokenEvent], None]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._metrics: dict = {}
        self._metrics_fresh = threading.Event()

    @classmethod
    def start(cls, model=None, *, timeout: float = 1800.0, **kwargs) -> "EngineClient":
        """Spawn the engine process with LLMEngine.load(model, **kwargs); returns once it is ready."""
        from ..preprocess import set_backend
        options = kwargs.get("options")
        if options is not None:              # requests are encoded (images preprocessed) in this process
            set_backend(options.preprocess)
        self = cls()
        ctx = mp.get_context("spawn")           # CUDA must not be inherited through fork
        to_engine_r, self._to_engine = ctx.Pipe(duplex=False)
        self._from_engine, from_engine_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_engine_main, args=(to_engine_r, from_engine_w, dict(model=model, **kwargs)),
                                 name="pixtral-rt-engine", daemon=True)
        self._proc.start()
        to_engine_r.close()
        from_engine_w.close()
        if not self._from_engine.poll(timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not start within {timeout:.0f} s")
        try:
            msg = self._from_engine.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited during load (exit code {self._proc.exitcode})") from None
        if msg[0] == "error":
            self._proc.join(5)
            raise RuntimeError(f"the engine failed to load: {msg[1]}")
        _, self.info, self.args, self.max_context, self.max_images, msg_metrics = msg
        page_size = msg_metrics["kv_page_size"]
        self.info = dict(self.info, engine="separate process")
        random_default = bool(self.info.get("random_weights"))
        self.tokenizer = load_tokenizer(None if random_default else model, self.args)
        self.eos_id = self.tokenizer.instruct_tokenizer.tokenizer.eos_id
        self.raw_pixels = self.info.get("device", "cpu") != "cpu"
        self._page_size = page_size
        self._kv_pages_total = self.info["kv_cache_tokens"] // page_size
        self._max_in_flight = self.info["max_batch"] + kwargs.get("max_queue", 1024)
        self._metrics = dict(msg_metrics)
        self._reader = threading.Thread(target=self._read, name="pixtral-rt-engine-reader", daemon=True)
        self._reader.start()
        self.ready = True
        return self

    # ------------------------------------------------------------------ the LLMEngine API
    def encode(self, messages, max_tokens: int, image_limits: ImageLimits = DEFAULT_LIMITS,
               tools: list | None = None) -> EncodedRequest:
        return encode_request(messages, self.tokenizer, self.args, max_images=self.max_images,
                              max_context=self.max_context, max_tokens=max_tokens, image_limits=image_limits,
                              raw_pixels=self.raw_pixels, digest=image_digest,   # digests on this side's threads
                              tools=tools)

    def submit(self, req: EncodedRequest, params: SamplingParams, on_output: Callable[[TokenEvent], None],
               logprobs: int | None = None, request_id: str = "") -> _Handle:
        if not self.ready:
            raise RuntimeError("the engine is not running")
        # the engine's own refusals, checked here so they raise synchronously (as LLMEngine.submit does)
        check_admission(req, params, logprobs, self._page_size, self._kv_pages_total,   # serving/api.py
                        vocab=self.args.text.vocab_size)
        with self._lock:
            if len(self._callbacks) >= self._max_in_flight:
                raise QueueFullError(f"the server is at capacity: {len(self._callbacks)} requests are in flight "
                                     "already; retry later")
            rid = f"{request_id or 'req'}-{next(self._ids)}"
            self._callbacks[rid] = on_output
            self._to_engine.send(("submit", rid, req, params, logprobs))
        return _Handle(self, rid)

    def metrics(self, timeout: float = 2.0) -> dict:
        """The engine's counters, asked for now (the last known ones if it does not answer in time)."""
        if self.ready:
            self._metrics_fresh.clear()
            try:
                self._send(("metrics",))
                self._metrics_fresh.wait(timeout)
            except (OSError, ValueError):
                pass
        return dict(self._metrics)

    def shutdown(self, timeout: float = 5.0) -> None:
        if not getattr(self, "_proc", None):
            return
        try:
            self._send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
        self.ready = False

    # ------------------------------------------------------------------ internals
    def _send(self, msg) -> None:
        with self._lock:
            self._to_engine.send(msg)

    def _read(self) -> None:
        while True:
            try:
                msg = self._from_engine.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "metrics":
                self._metrics = msg[1]
                self._metrics_fresh.set()
            elif msg[0] == "events":
                by_loop: dict = {}         # callbacks bound to an event loop: one hand-over per loop
                for rid, ev in msg[1]:
                    cb = self._callbacks.get(rid)
                    if cb is None:
                        continue
                    if ev.finish_reason is not None:
                        del self._callbacks[rid]
                    loop = getattr(cb, "loop", None)
                    if loop is None:
                        _call(cb, ev)
                    else:
                        by_loop.setdefault(loop, []).append((cb.put, ev))
                for loop, items in by_loop.items():
                    try:
                        loop.call_soon_threadsafe(_put_all, items)
                    except RuntimeError:   # that loop is closed (server gone): nobody is waiting for these
                        pass
            elif msg[0] == "refused":
                _, rid, _status, kind, text = msg
                cb = self._callbacks.pop(rid, None)
                if cb is not None:
                    _call(cb, TokenEvent(finish_reason="error", error=f"{kind}: {text}"))
        # the engine process is gone: every open request ends with an error
        self.ready = False
        for rid, cb in list(self._callbacks.items()):
            _call(cb, TokenEvent(finish_reason="error", error="the engine process stopped"))
        self._callbacks.clear()
