"""HTTP plumbing every route of the server shares (app.py: chat; text_endpoints.py: completions, tokenize):
the request body read with a size cap and parsed as JSON, server-sent events framing, a streaming response
that closes its run however it ends, waiting for a result unless the client leaves first, and input errors
(pixtral_rt.errors) turned into OpenAI's error shape.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import (ConstraintError, ContextLengthError, ImageError, ImageFetchError, ImageTooLargeError,
                      MessageFormatError, PixtralInputError, TooManyImagesError)
from ..serving.scheduler import QueueFullError
from .protocol import OpenAIError

# input error class -> OpenAI error code; the first match wins, so subclasses come first
ERROR_CODES = [(QueueFullError, "queue_full"), (ContextLengthError, "context_length_exceeded"),
               (TooManyImagesError, "too_many_images"), (ImageTooLargeError, "image_too_large"),
               (ImageFetchError, "image_fetch_failed"), (ImageError, "invalid_image"),
               (MessageFormatError, "invalid_messages"), (ConstraintError, "invalid_schema")]


# request fields an engine-side refusal may start its message with ("logit_bias: token id 131072 is outside
# the vocabulary"): the error's param then names it
NAMED_FIELDS = ("logit_bias", "stop_token_ids")


def input_error(exc: PixtralInputError, param: str = "messages") -> OpenAIError:
    """An input error from the request pipeline or the engine's admission (queue full: 503), as OpenAI
    would answer it. `param`: the request field the error is about unless its message names a part of it
    ("messages[0].content[1]: image ...", "prompt[3]: token id ...")."""
    msg = str(exc)
    # OpenAI answers 400 for a prompt that does not fit the context (errors.py says 413 for the CLI's sake)
    status = 400 if isinstance(exc, ContextLengthError) else exc.status
    code = next((c for cls, c in ERROR_CODES if isinstance(exc, cls)), "invalid_request")
    where = msg.split(":", 1)[0]
    if " " not in where and (where.startswith(f"{param}[") or where.split("[", 1)[0] in NAMED_FIELDS):
        param = where
    if isinstance(exc, ConstraintError) and exc.param:   # a schema of response_format or of a tool: it says which
        param = exc.param
    kind = {502: "upstream_error", 503: "server_error"}.get(status, "invalid_request_error")
    return OpenAIError(status, msg, type=kind, param=None if status == 503 else param, code=code)


def sse(data: str) -> str:
    return f"data: {data}\n\n"


class StreamingRun(StreamingResponse):
    """Server-sent events of one run (anything with a close(): completion.CompletionRun). However the
    response ends (done, client gone, server stopping), the run is closed, so an abandoned request stops
    generating and its KV pages are freed at once."""

    def __init__(self, run, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


async def read_body(request: Request, cap: int) -> bytes:
    too_big = OpenAIError(413, f"request body is over the cap of {cap} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_big
    chunks, total = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked body has no Content-Length
        total += len(chunk)
        if total > cap:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


async def read_json(request: Request, cap: int):
    """The request's body, at most `cap` bytes, as decoded JSON (OpenAIError 413 / 400 otherwise)."""
    return parse_json(await read_body(request, cap))


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, coro):
    """The result of `coro`, or None when the client disconnects first (then `coro` is cancelled)."""
    work, gone = asyncio.ensure_future(coro), asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    return work.result() if work in done else None
