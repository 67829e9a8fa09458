"""The text routes of the server, beside chat (app.py): what users of vLLM reach for.

    POST /v1/completions   raw prompt text or token ids -> OpenAI `text_completion` (whole or SSE stream)
    POST /tokenize         {"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}
    POST /detokenize       {"tokens": [...]} -> {"prompt": str}

A completion's prompt gets no chat format: the string is tokenised as it is (BOS first), the ids are taken
as given (pixtral_rt/text_prompt.py), and it runs through the same engine `submit` as a chat request, with
the same sampling, stop strings, cancellation when the client leaves, and shutdown. /tokenize with messages
counts what the chat route would feed the model, image tokens included: images are fetched and planned
from their headers, never decoded or run through the vision encoder (chat.chat_prompt_tokens); no context
check is made, max_model_len is there to compare with. /detokenize leaves special tokens (BOS, [INST]) out,
as an answer's text does.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..chat import chat_prompt_tokens
from ..errors import PixtralInputError
from ..images import ImageLimits
from ..text_prompt import check_token_ids, encode_text_prompt, text_prompt_tokens
from .completion import Aborted, GenerationFailed
from .completions_protocol import (CompletionChoice, CompletionRequest, CompletionResponse, DetokenizeRequest,
                                   DetokenizeResponse, TokenizeRequest, TokenizeResponse)
from .http_io import StreamingRun, input_error, read_json, sse, unless_client_leaves
from .protocol import OpenAIError, parse_request
from .sampling_args import sampling_params
from .text_completion import LegacyLogprobs, TextCompletionRun

log = logging.getLogger("pixtral_rt.serve")


def _encode_prompts(engine, req: CompletionRequest, max_tokens: int):
    """(EncodedRequest, echo text) per prompt; host work, in the server's thread pool. The echo text of a
    string prompt is the string itself, of token ids their decoded text."""
    out = []
    for i, p in enumerate(req.prompts):
        enc = encode_text_prompt(p, engine.tokenizer, engine.args, max_context=engine.max_context,
                                 max_tokens=max_tokens, add_special_tokens=req.add_special_tokens, where=req.where(i))
        echo = (p if isinstance(p, str) else engine.tokenizer.decode(p)) if req.echo else ""
        out.append((enc, echo))
    return out


def add_text_endpoints(app: FastAPI, state, *, dependencies: list, max_body_bytes: int, max_images: int,
                       image_limits: ImageLimits, unknown_model) -> None:
    """Register the three routes on `app`. state: app.py's _State (engine, thread pool, token texts, metrics,
    the runs in flight); unknown_model(name) -> the OpenAIError 404 for a model this server does not serve."""
    engine = state.engine

    def check_model(name: str | None) -> None:
        if name is not None and name != state.name:
            raise unknown_model(name)

    @app.post("/v1/completions", dependencies=dependencies)
    async def completions(request: Request):
        arrived = time.monotonic()
        state.check_accepting()
        req = parse_request(await read_json(request, max_body_bytes), CompletionRequest)
        check_model(req.model)
        max_tokens = req.max_new_tokens
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                state.pool, functools.partial(_encode_prompts, engine, req, max_tokens))
        except PixtralInputError as exc:
            raise input_error(exc, "prompt") from exc
        state.check_accepting()
        n = req.n or 1
        # each prompt's n choices sample as that prompt would alone (seed + j for choice j)
        params = [sampling_params(req, max_tokens) for _ in encoded]
        run = TextCompletionRun(engine, state.token_text, state.metrics, n=len(encoded) * n, stop=tuple(req.stop),
                                logprobs=req.logprobs, arrived=arrived, on_close=state.active.discard)
        state.active.add(run)
        run.submit_prompts([e for e, _ in encoded], params)
        echo = [text for _, text in encoded for _ in range(n)]          # per choice
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingRun(run, _stream_events(run, req, rid, created, state.name, echo))
        try:
            body = await unless_client_leaves(request, _whole_answer(run, rid, created, state.name, echo))
        finally:
            run.close()
        return JSONResponse(body) if body is not None else Response(status_code=499)

    @app.post("/tokenize", dependencies=dependencies)
    async def tokenize(request: Request):
        state.check_accepting()
        req = parse_request(await read_json(request, max_body_bytes), TokenizeRequest)
        check_model(req.model)
        if req.messages is not None:
            if req.image_count() > max_images:  # counted before any image is fetched, as for chat
                raise OpenAIError(413, f"the request has {req.image_count()} images; at most {max_images} are "
                                       "allowed per request", param="messages", code="too_many_images")
            param, work = "messages", functools.partial(
                chat_prompt_tokens, [m.to_chat() for m in req.messages], engine.tokenizer, engine.args,
                max_images=max_images, image_limits=image_limits, tools=req.tool_dicts())
        else:
            param, work = "prompt", functools.partial(text_prompt_tokens, req.prompt, engine.tokenizer, engine.args,
                                                      add_special_tokens=req.add_special_tokens is not False)
        try:
            tokens = await asyncio.get_running_loop().run_in_executor(state.pool, work)
        except PixtralInputError as exc:
            raise input_error(exc, param) from exc
        strs = [state.token_text.of(t)[0] for t in tokens] if req.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_context, tokens=tokens,
                                token_strs=strs).model_dump()

    @app.post("/detokenize", dependencies=dependencies)
    async def detokenize(request: Request):
        state.check_accepting()
        req = parse_request(await read_json(request, max_body_bytes), DetokenizeRequest)
        check_model(req.model)
        try:
            ids = check_token_ids(req.tokens, engine.tokenizer.instruct_tokenizer.tokenizer.n_words, "tokens")
        except PixtralInputError as exc:
            raise input_error(exc, "tokens") from exc
        text = await asyncio.get_running_loop().run_in_executor(state.pool, engine.tokenizer.decode, ids)
        return DetokenizeResponse(prompt=text).model_dump()


def _failure(exc: Exception) -> OpenAIError:
    if isinstance(exc, Aborted):
        return OpenAIError(503, str(exc), type="server_error", code="shutting_down")
    if isinstance(exc, GenerationFailed):
        return OpenAIError(500, str(exc), type="server_error", code="generation_failed")
    log.exception("a completion failed")
    return OpenAIError(500, "internal server error (the server log has the details)", type="server_error",
                       code="internal_error")


async def _whole_answer(run: TextCompletionRun, rid: str, created: int, model: str, echo: list[str]) -> dict:
    items = [[] for _ in run.choices]
    try:
        async for d in run.deltas():
            if d.logprobs:
                items[d.index] += d.logprobs
    except (Aborted, GenerationFailed) as exc:
        raise _failure(exc) from exc
    choices = [CompletionChoice(index=i, text=echo[i] + c.text.text, finish_reason=c.finish_reason,
                                logprobs=LegacyLogprobs(len(echo[i])).part(items[i]) if run.logprobs is not None
                                else None)
               for i, c in enumerate(run.choices)]
    return CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=run.usage()).model_dump()


async def _stream_events(run: TextCompletionRun, req: CompletionRequest, rid: str, created: int, model: str,
                         echo: list[str]):
    """SSE chunks of `text_completion` objects: each choice's echoed prompt first (with echo), then its text
    (and logprobs) as it comes, its finish_reason on the chunk of its last event; with
    stream_options.include_usage a last chunk with no choices and the usage; then [DONE]. An error after
    the stream began is sent as an {"error": ...} event."""
    exclude = None if req.include_usage else {"usage"}

    def chunk(choices, usage=None) -> str:
        return sse(CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
                   .model_dump_json(exclude=exclude))

    # the hot path, one chunk per token: the same JSON as chunk() gives for a text-only delta, built by hand
    # (pydantic costs ~100 us a chunk, as for chat)
    head = json.dumps({"id": rid, "object": "text_completion", "created": created, "model": model},
                      ensure_ascii=False)[:-1]
    tail = ',"usage":null}' if req.include_usage else "}"

    def text_chunk(index: int, text: str) -> str:
        return (f'data: {head},"choices":[{{"index":{index},"text":{json.dumps(text, ensure_ascii=False)},'
                f'"logprobs":null,"finish_reason":null}}]{tail}\n\n')

    logprobs = [LegacyLogprobs(len(e)) for e in echo]
    try:
        for i, e in enumerate(echo):
            if e:
                yield text_chunk(i, e)
        async for d in run.deltas():
            if d.text and d.logprobs is None and d.finish_reason is None:
                yield text_chunk(d.index, d.text)
            elif d.text or d.logprobs or d.finish_reason is not None:
                lp = logprobs[d.index].part(d.logprobs) if d.logprobs is not None else None
                yield chunk([CompletionChoice(index=d.index, text=d.text, logprobs=lp, finish_reason=d.finish_reason)])
        if req.include_usage:
            yield chunk([], usage=run.usage())
    except Exception as exc:  # noqa: BLE001 - the headers are sent: tell the client in the stream
        yield sse(json.dumps(_failure(exc).body()))
    yield sse("[DONE]")
