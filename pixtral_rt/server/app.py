"""The OpenAI-compatible HTTP app (FastAPI, served by uvicorn) over a loaded engine; `python -m
pixtral_rt.serve` (serve.py: the command line) builds it with `build_app` and runs it with `serve`.

Endpoints: POST /v1/chat/completions (streamed as server-sent events or whole), GET /v1/models,
GET /health (200 only while the engine is ready), GET /metrics (Prometheus); POST /v1/completions,
/tokenize and /detokenize are in text_endpoints.py.

Each request: body read with a size cap -> validated (openai_protocol) -> host work (image fetch and decode,
tokenisation: engine.encode) in a thread pool, never on the event loop -> one engine request per choice
(serve_completion) -> tokens back through an asyncio queue. A client that goes away has its requests
cancelled, which frees their KV pages. Errors answer in OpenAI's shape; no traceback reaches a client.
SIGTERM / Ctrl-C: stop accepting, end the requests in flight, shut the engine down.

This module imports fastapi, uvicorn and the engine (torch): the command line imports it only once its
arguments are checked, so `--help` works without the serve extra.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PixtralInputError
from ..images import ImageLimits
from .protocol import (AssistantMessage, ChatCompletionChunk, ChatCompletionResponse, Choice, ChoiceLogprobs,
                       ChunkChoice, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ModelCard,
                       ModelList, OpenAIError, ToolCall, parse_chat_request)
from ..structured import check_constraint, warm_up
from .completion import Aborted, CompletionRun, GenerationFailed, TokenText
from .constraints import constraint_for, parses_tool_calls
from .metrics import ServerMetrics
# the HTTP plumbing and the sampling mapping the routes share live in modules of their own (the text routes,
# text_endpoints.py, use them too); the chat route below calls them by these names
from .http_io import StreamingRun as _StreamingRun, input_error as _input_error, parse_json as _json
from .http_io import read_body as _read_body, sse as _sse, unless_client_leaves as _unless_client_leaves
from .sampling_args import sampling_params as _sampling
from .text_endpoints import add_text_endpoints

log = logging.getLogger("pixtral_rt.serve")

DEFAULT_MAX_BODY_BYTES = 64 << 20
# what a server may fetch: no local files, no private addresses (the CLI's defaults allow both)
SERVER_IMAGE_LIMITS = ImageLimits(allow_local_files=False, allow_private_urls=False)
SHUTDOWN_GRACE_S = 5.0


def _error_response(err: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class _State:
    """What the routes share: the engine, the host-work pool, and the requests in flight (for shutdown)."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name
        self.created = int(time.time())
        # image downloads block for up to their timeout: a pool of their own keeps them off the event loop
        # and out of the default executor
        self.pool = ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4),
                                       thread_name_prefix="pixtral-encode")
        self.token_text = TokenText(engine.tokenizer)
        self.metrics = ServerMetrics(engine)
        self.active: set[CompletionRun] = set()
        self.draining = False

    def check_accepting(self) -> None:
        if self.draining:
            raise OpenAIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.engine.ready:
            raise OpenAIError(503, "the engine is not ready", type="server_error", code="not_ready")

    def drain(self) -> None:
        """Shutdown: refuse new requests and end those in flight (their streams finish with an error event).
        Runs on the event loop's thread (_Server.handle_exit schedules it there)."""
        self.draining = True
        for run in list(self.active):
            run.abort("the server is shutting down")

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, max_model_len=self.engine.max_context)


class _AnswerUnexpected:
    """ASGI middleware for server bugs: an exception no handler took is logged with its traceback and answered
    500 in OpenAI's shape, and the connection stays usable. Not `@app.exception_handler(Exception)`: Starlette
    runs that one in ServerErrorMiddleware, which re-raises after answering, and uvicorn then drops the
    kept-alive connection, so the client's next request on it failed too. This middleware sits below
    ServerErrorMiddleware and swallows the exception. Once a response has started (a stream), nothing more
    can be answered: the exception goes on, and uvicorn closing the half-sent response is the right end."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await _error_response(OpenAIError(500, "internal server error (the server log has the details)",
                                              type="server_error", code="internal_error"))(scope, receive, send)


def build_app(engine, served_model_name: str, api_key: str | None = None, max_images: int = 12,
              image_limits: ImageLimits = SERVER_IMAGE_LIMITS,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over a loaded engine. `app.state.pixtral.drain()` ends the requests in flight."""
    state = _State(engine, served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.pool.shutdown(wait=False, cancel_futures=True)

    # no /docs or /openapi.json: they would be one more unauthenticated surface
    app = FastAPI(title="pixtral_rt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_AnswerUnexpected)
    app.state.pixtral = state
    # the grammar library's view of the tokenizer (~1 s for tekken) is built now, beside start-up, not on the
    # first request with a response_format or tools
    state.pool.submit(warm_up, engine.tokenizer)

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    guarded = [Depends(authorized)]

    def unknown_model(name: str) -> OpenAIError:
        return OpenAIError(404, f"the model {name!r} does not exist: this server serves {state.name!r}",
                           param="model", code="model_not_found")

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return _error_response(exc)

    @app.exception_handler(PixtralInputError)
    async def _bad_input(request, exc: PixtralInputError):
        return _error_response(_input_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # unknown route (404), wrong method (405)
        return _error_response(OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                           code="not_found" if exc.status_code == 404 else None))

    @app.get("/health")
    async def health():
        state.check_accepting()
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        # engine.metrics() may wait for an answer from the engine (EngineClient): not on the event loop
        body, content_type = await asyncio.get_running_loop().run_in_executor(state.pool, state.metrics.render)
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return ModelList(data=[state.model_card()]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def model(model_id: str):
        if model_id != state.name:
            raise unknown_model(model_id)
        return state.model_card().model_dump()

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        state.check_accepting()
        body = await _read_body(request, max_body_bytes)
        t_body = time.monotonic()
        chat = parse_chat_request(_json(body))
        del body
        t_parse = time.monotonic()
        if chat.model is not None and chat.model != state.name:
            raise unknown_model(chat.model)
        if chat.image_count() > max_images:  # counted before any image is fetched
            raise OpenAIError(413, f"the request has {chat.image_count()} images; at most {max_images} are "
                                   "allowed per request", param="messages", code="too_many_images")
        asked = chat.max_new_tokens
        loop = asyncio.get_running_loop()
        constraint = constraint_for(chat)
        if constraint is not None:   # a schema that cannot compile is a 400 naming it (compiled once, cached)
            await loop.run_in_executor(state.pool, check_constraint, constraint, engine.tokenizer)
        # with no max_tokens the answer may fill the context: encode checks that one token fits
        req = await loop.run_in_executor(
            state.pool, functools.partial(engine.encode, chat.chat_messages(), asked or 1, image_limits=image_limits,
                                          tools=chat.tool_dicts()))
        max_tokens = asked or engine.max_context - req.prompt_tokens
        t_encode = time.monotonic()
        prep = state.metrics.prepare
        prep.labels("body").observe(t_body - arrived)
        prep.labels("parse").observe(t_parse - t_body)
        prep.labels("encode").observe(t_encode - t_parse)   # with the schema check of a constrained request
        state.check_accepting()  # shutdown may have begun during a slow image download
        # may refuse (min_tokens over max_tokens): before the run exists
        params = _sampling(chat, max_tokens, constraint=constraint)
        run = CompletionRun(engine, state.token_text, state.metrics, n=chat.n or 1, stop=tuple(chat.stop),
                            logprobs=(chat.top_logprobs or 0) if chat.logprobs else None, arrived=arrived,
                            on_close=state.active.discard, tool_calls=parses_tool_calls(chat))
        state.active.add(run)
        run.submit(req, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return _StreamingRun(run, _stream_events(run, chat, rid, created, state.name))
        try:
            body = await _unless_client_leaves(request, _whole_answer(run, rid, created, state.name))
        finally:
            run.close()
        # 499 (client closed request): nobody reads it, but the access log says what happened
        return JSONResponse(body) if body is not None else Response(status_code=499)

    # POST /v1/completions, /tokenize, /detokenize
    add_text_endpoints(app, state, dependencies=guarded, max_body_bytes=max_body_bytes, max_images=max_images,
                       image_limits=image_limits, unknown_model=unknown_model)
    return app


async def _whole_answer(run: CompletionRun, rid: str, created: int, model: str) -> dict:
    logprobs = [[] for _ in run.choices]
    try:
        async for d in run.deltas():
            if d.logprobs is not None:
                logprobs[d.index] += d.logprobs
    except Aborted as exc:
        raise OpenAIError(503, str(exc), type="server_error", code="shutting_down") from exc
    except GenerationFailed as exc:
        raise OpenAIError(500, str(exc), type="server_error", code="generation_failed") from exc
    choices = [Choice(index=i, message=_message(c), finish_reason=c.finish_reason,
                      logprobs=ChoiceLogprobs(content=logprobs[i]) if run.logprobs is not None else None)
               for i, c in enumerate(run.choices)]
    return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                  usage=run.usage()).model_dump()


def _message(c) -> AssistantMessage:
    """A finished choice's message: its text, and its tool calls (content null when there is no text)."""
    calls = [ToolCall(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
             for t in (c.calls.calls if c.calls is not None else [])]
    return AssistantMessage(content=c.content or (None if calls else c.content), tool_calls=calls or None)


def _delta_calls(deltas) -> list[DeltaToolCall]:
    return [DeltaToolCall(index=d.index, id=d.id, function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
            for d in deltas]


async def _stream_events(run: CompletionRun, chat, rid: str, created: int, model: str):
    """SSE chunks: each choice's role first, then its text (and logprobs), then its finish_reason; with
    stream_options.include_usage a last chunk with no choices and the usage; then [DONE]. An error after
    the stream began can no longer change the status code: it is sent as an {"error": ...} event."""
    exclude = None if chat.include_usage else {"usage"}

    def chunk(choices, usage=None) -> str:
        c = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        return _sse(c.model_dump_json(exclude=exclude))

    # the hot path, one chunk per token of every stream: the same JSON as chunk() gives for a text-only
    # delta, built from a fixed head (pydantic costs ~100 us a chunk, which caps a 64-stream server)
    head = json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model},
                      ensure_ascii=False)[:-1]
    tail = ',"usage":null}' if chat.include_usage else "}"

    def text_chunk(index: int, text: str) -> str:
        return (f'data: {head},"choices":[{{"index":{index},"delta":{{"content":{json.dumps(text, ensure_ascii=False)}}},'
                f'"logprobs":null,"finish_reason":null}}]{tail}\n\n')

    try:
        for i in range(len(run.choices)):
            yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for d in run.deltas():
            if d.text and d.logprobs is None:
                yield text_chunk(d.index, d.text)
            elif d.text or d.logprobs:
                lp = ChoiceLogprobs(content=d.logprobs) if d.logprobs is not None else None
                yield chunk([ChunkChoice(index=d.index, delta=DeltaMessage(content=d.text), logprobs=lp)])
            if d.tool_calls:
                yield chunk([ChunkChoice(index=d.index, delta=DeltaMessage(tool_calls=_delta_calls(d.tool_calls)))])
            if d.finish_reason is not None:
                yield chunk([ChunkChoice(index=d.index, delta=DeltaMessage(), finish_reason=d.finish_reason)])
        if chat.include_usage:
            yield chunk([], usage=run.usage())
    except Aborted as exc:
        yield _sse(json.dumps(OpenAIError(503, str(exc), type="server_error", code="shutting_down").body()))
    except GenerationFailed as exc:
        yield _sse(json.dumps(OpenAIError(500, str(exc), type="server_error", code="generation_failed").body()))
    except Exception:  # noqa: BLE001 - the headers are sent: log it, tell the client in the stream
        log.exception("streaming %s failed", rid)
        yield _sse(json.dumps(OpenAIError(500, "internal server error (the server log has the details)",
                                          type="server_error", code="internal_error").body()))
    yield _sse("[DONE]")


# --------------------------------------------------------------------------------------------- running
class _Server(uvicorn.Server):
    """uvicorn's server with this shutdown: on SIGTERM / Ctrl-C, first end the requests in flight (so long
    streams do not hold up the graceful stop), then stop as uvicorn does, and return instead of re-raising
    the signal (uvicorn re-raises it after stopping, which would end the process with -15, not 0)."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            # a signal handler interrupts the event loop between any two bytecodes: drain in a loop callback
            asyncio.get_running_loop().call_soon_threadsafe(self.on_exit)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` (bound and listening: serve.py opens it before the model loads, so the port
    cannot be taken in between) until SIGTERM / Ctrl-C has drained the requests in flight."""
    host, port = sock.getsockname()[:2]
    # uvicorn picks httptools + uvloop when installed (the serve extra installs them); the benchmark-only
    # switch PIXTRAL_RT_BENCH_HTTP_STACK=h11 serves with h11 + asyncio instead (benchmarks/bench_http_stack.py)
    stack = dict(http="h11", loop="asyncio") if os.environ.get("PIXTRAL_RT_BENCH_HTTP_STACK") == "h11" else {}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **stack)
    _Server(config, app.state.pixtral.drain).run(sockets=[sock])
