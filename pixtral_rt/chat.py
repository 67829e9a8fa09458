"""Chat requests -> what the engine runs: token ids, image tensors, [IMG] positions, packed offsets.

    tok = load_tokenizer(model_dir, args)            # mistral_common MistralTokenizer, checked against args
    req = encode_request(messages, tok, args, max_images=12, max_context=None, max_tokens=256)

Messages are in the OpenAI chat shape: {"role": "system"|"user"|"assistant"|"tool", "content": str | [part]},
parts {"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url": ...} | str},
{"type": "image", "image": <path | URL | bytes | PIL image | numpy array>}; assistant "tool_calls" and tool
"tool_call_id" as in OpenAI's API.

Token ids come from mistral_common itself (its chat format for v3 tekken / v7, system-prompt placement,
image-first reordering), so they match `encode_chat_completion` exactly. Only its image step is replaced:
images are planned from their headers (size after EXIF rotation) first, so a request with too many images or
tokens is refused before any pixel is decoded, and then decoded and preprocessed by pixtral_rt.preprocess
(native op or fallback). Literal "[IMG]" typed in text is encoded as text, never as an image slot; the
count of [IMG] ids is checked against the plan.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import PixtralArgs
from .errors import (ContextLengthError, ImageError, MessageFormatError, PixtralInputError, RequestError,
                     TokenizerError, TooManyImagesError)
from .images import DEFAULT_LIMITS, ImageLimits, OpenedImage, open_image
from .preprocess import ImagePlan, backend, plan_image, preprocess

log = logging.getLogger(__name__)

_PLACEHOLDER = "pixtral-rt-image:"  # ImageURLChunk url standing for our k-th image
_PARTS = "\x00pixtral-rt-parts:"   # text standing for the parts of the k-th image-bearing assistant / tool message
_PARTS_RE = re.compile("\x00pixtral-rt-parts:(\\d+);")


@dataclass
class EncodedRequest:
    """One request, planned and encoded. Images are in prompt (token) order."""

    tokens: list[int]
    images: list[Any]                       # torch.Tensor float32 (3, H, W), normalised
    patch_grids: list[tuple[int, int]]      # (rows, cols) in patches, before spatial merge
    image_token_positions: list[int]        # indices of [IMG] tokens in `tokens`
    cu_seqlens: list[int]                   # cumulative patch counts, starts with 0 (n_images + 1)
    prompt_tokens: int
    max_tokens: int = 0
    image_tokens: int = 0                   # [IMG] + [IMG_BREAK] + [IMG_END] tokens of all images
    image_sizes: list[tuple[int, int]] = field(default_factory=list)   # (width, height) as loaded (upright)
    image_names: list[str] = field(default_factory=list)
    preprocess_backend: str = ""
    image_out_hw: list[tuple[int, int]] = field(default_factory=list)   # (H, W) after resize, per image
    images_are_raw: bool = False            # images hold decoded uint8 (h, w, 3) pixels, not yet preprocessed
    image_digests: list[bytes] = field(default_factory=list)   # digest(image) per image, when asked for

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_patches(self) -> int:
        return self.cu_seqlens[-1]


# --------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(model_dir: str | Path | None, args: PixtralArgs):
    """A mistral_common MistralTokenizer for `args`.

    model_dir given: its `tekken.json` (Pixtral-12B, Mistral-Small-3.1) or `tokenizer.model.v7m1`-style
    SentencePiece file (Pixtral-Large). model_dir None: the files packaged in mistral_common — tekken_240911
    (Pixtral-12B, v3) or SentencePiece v7m1 (Pixtral-Large, vocab 32768); Mistral-Small-3.1's is not packaged.
    The tokenizer's image config and special ids are checked against `args.vision` (TokenizerError)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    try:
        if model_dir is not None:
            d = Path(model_dir)
            if not d.is_dir():
                raise TokenizerError(f"model folder {str(d)!r} does not exist or is not a folder")
            files = [d / "tekken.json"] + sorted(d.glob("tokenizer.model.v*"), reverse=True) + \
                sorted(p for p in d.glob("tekken*.json") if p.name != "tekken.json")
            files = [f for f in files if f.is_file()]
            if files:
                log.info("tokenizer: %s", files[0])
                tok = MistralTokenizer.from_file(str(files[0]))
            else:
                tok = _packaged(args, f"no tekken.json or tokenizer.model.v* in {str(d)!r}")
        else:
            tok = _packaged(args, "no model folder given")
    except TokenizerError:
        raise
    except ImportError as exc:
        raise TokenizerError(f"cannot load the tokenizer: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - mistral_common raises many types for a bad file
        raise TokenizerError(f"cannot load the tokenizer from {model_dir!r}: {type(exc).__name__}: {exc}") from exc
    check_tokenizer(tok, args)
    return tok


def _packaged(args: PixtralArgs, why: str):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if args.vision.spatial_merge_size > 1:
        raise TokenizerError(f"{why}, and Mistral-Small-3.1's tekken.json (v7, patch merger) is not packaged in "
                             "mistral_common: pass the checkpoint folder that holds tekken.json")
    if args.text.vocab_size == 32768:
        log.info("tokenizer: packaged SentencePiece v7m1 (Pixtral-Large), %s", why)
        return MistralTokenizer.v7(is_mm=True)
    log.info("tokenizer: packaged tekken_240911 v3 (Pixtral-12B), %s", why)
    return MistralTokenizer.v3(is_tekken=True, is_mm=True)


def check_tokenizer(tok, args: PixtralArgs) -> None:
    """The tokenizer's image config and special ids must be the model's, else images would be mis-tokenised."""
    enc = getattr(tok.instruct_tokenizer, "image_encoder", None)
    if enc is None:
        raise TokenizerError("the tokenizer has no image support (not a multimodal tekken / v7m1 file)")
    cfg, ids, v = enc.image_config, enc.special_ids, args.vision
    ours = (v.patch_size, v.image_size, v.spatial_merge_size, v.image_token_id, v.image_break_token_id,
            v.image_end_token_id)
    theirs = (cfg.image_patch_size, cfg.max_image_size, cfg.spatial_merge_size, ids.img, ids.img_break, ids.img_end)
    if ours != theirs:
        names = ("patch_size", "max image size", "spatial_merge_size", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
        diff = ", ".join(f"{n}: model {a} vs tokenizer {b}" for n, a, b in zip(names, ours, theirs) if a != b)
        raise TokenizerError(f"tokenizer does not match the model config {args.name!r}: {diff}")


# --------------------------------------------------------------------------------------------- messages
@dataclass
class _Image:
    where: str          # "messages[i].content[j]"
    source: Any
    opened: OpenedImage | None = None
    plan: ImagePlan | None = None


def _parse_messages(messages: Any) -> tuple[list[dict], list[_Image]]:
    """Validate the OpenAI shape; return messages with image parts replaced by placeholders, and the images."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageFormatError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise MessageFormatError(f"messages[{i}] must be a dict with a 'role', got {type(m).__name__}")
        role = m["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise MessageFormatError(f"messages[{i}].role {role!r} is not one of system, user, assistant, tool")
        content = m.get("content")
        parts: list[tuple[str, Any]] = []
        if content is None:
            if role != "assistant":
                raise MessageFormatError(f"messages[{i}] ({role}) has no content")
        elif isinstance(content, str):
            parts.append(("text", content))
        elif isinstance(content, (list, tuple)):
            for j, p in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(p, str):
                    parts.append(("text", p))
                    continue
                if not isinstance(p, dict) or "type" not in p:
                    raise MessageFormatError(f"{where} must be a dict with a 'type', got {type(p).__name__}")
                kind = p["type"]
                if kind == "text":
                    if not isinstance(p.get("text"), str):
                        raise MessageFormatError(f"{where}: a text part needs a string 'text'")
                    parts.append(("text", p["text"]))
                elif kind in ("image_url", "image"):
                    src = p.get(kind)
                    if kind == "image_url" and isinstance(src, dict):
                        src = src.get("url")
                    if src is None:
                        raise MessageFormatError(f"{where}: an {kind} part needs "
                                                 + ("{'image_url': {'url': ...}}" if kind == "image_url"
                                                    else "an 'image' value"))
                    if role == "system":
                        raise MessageFormatError(f"{where}: a system message cannot carry an image (no Mistral "
                                                 "chat format has a place for one): put it in a user message")
                    parts.append(("image", len(images)))
                    images.append(_Image(where=where, source=src))
                else:
                    raise MessageFormatError(f"{where}: unknown part type {kind!r} (text, image_url or image)")
        else:
            raise MessageFormatError(f"messages[{i}].content must be a string or a list of parts, "
                                     f"got {type(content).__name__}")
        out.append({**m, "_parts": parts})
    return out, images


def _to_mistral(msgs: list[dict]):
    """mistral_common messages, and the parts of image-bearing assistant / tool messages by marker index: such a
    message goes to mistral_common with a marker as its text (its validator and normalizer know no images
    there) and is encoded by _encode_with_images."""
    from mistral_common.protocol.instruct.chunk import ImageURLChunk, TextChunk
    from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage, ToolMessage,
                                                           UserMessage)
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    out, marked = [], {}
    for i, m in enumerate(msgs):
        role, parts = m["role"], m["_parts"]
        has_image = any(k == "image" for k, _ in parts)
        text = "".join(v for k, v in parts if k == "text")
        if has_image and role in ("assistant", "tool"):
            marked[len(marked)] = parts
            text = f"{_PARTS}{len(marked) - 1};"
        if role == "user" and has_image:
            chunks = [TextChunk(text=v) if k == "text" else ImageURLChunk(image_url=f"{_PLACEHOLDER}{v}")
                      for k, v in parts if not (k == "text" and v == "")]
            out.append(UserMessage(content=chunks))
        elif role == "user":
            out.append(UserMessage(content=text))
        elif role == "system":
            out.append(SystemMessage(content=text))
        elif role == "tool":
            out.append(ToolMessage(content=text, tool_call_id=m.get("tool_call_id"), name=m.get("name")))
        else:
            calls = None
            if m.get("tool_calls"):
                try:
                    calls = [ToolCall(id=c.get("id", "null"), function=FunctionCall(
                        name=c["function"]["name"], arguments=c["function"].get("arguments", "{}")))
                        for c in m["tool_calls"]]
                except (KeyError, TypeError, AttributeError) as exc:
                    raise MessageFormatError(f"messages[{i}].tool_calls must be a list of {{'id', 'function': "
                                             f"{{'name', 'arguments'}}}} dicts ({exc})") from exc
            out.append(AssistantMessage(content=text if parts else None, tool_calls=calls,
                                        prefix=bool(m.get("prefix", False))))
    return out, marked


def _tools_to_mistral(tools: list[dict]):
    """OpenAI `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]) as
    mistral_common Tools (they become [AVAILABLE_TOOLS] before the last user message)."""
    from mistral_common.protocol.instruct.tool_calls import Function, Tool

    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise MessageFormatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                     "'description': ..., 'parameters': {...}}}}")
        kw = {"name": f["name"], "parameters": f.get("parameters") or {}}
        if f.get("description") is not None:
            kw["description"] = f["description"]
        out.append(Tool(function=Function(**kw)))
    return out


class _PlanEncoder:
    """Stands in for mistral_common's ImageEncoder: returns the tokens of our plan (no pixels), and records
    the order in which mistral_common placed the images (it may move an image before its text)."""

    def __init__(self, base, images: list[_Image]):
        self.base, self.images, self.order = base, images, []

    def __call__(self, chunk):
        from mistral_common.tokens.tokenizers.image import ImageEncoding

        k = int(chunk.image_url.removeprefix(_PLACEHOLDER)) if hasattr(chunk, "image_url") else -1
        if not 0 <= k < len(self.images):
            raise MessageFormatError(f"unexpected image chunk {chunk!r}")
        self.order.append(k)
        ids = self.base.special_ids
        return ImageEncoding(tokens=self.images[k].plan.tokens(ids.img, ids.img_break, ids.img_end),
                             image=np.empty((0,), dtype=np.float32))

    def __getattr__(self, name):
        return getattr(self.base, name)


def _no_text(*_args, **_kwargs) -> str:
    return ""


def _tokenize(tokenizer, msgs: list[dict], images: list[_Image], tools: list[dict] | None = None
              ) -> tuple[list[int], list[int]]:
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    try:
        messages, marked = _to_mistral(msgs)
        request = ChatCompletionRequest(messages=messages, tools=_tools_to_mistral(tools) if tools else None)
        validated = tokenizer._chat_completion_request_validator.validate_request(request)
        instruct = tokenizer._instruct_request_normalizer.from_chat_completion_request(validated)
        it = copy.copy(tokenizer.instruct_tokenizer)  # per-call copy: the shared tokenizer is never mutated
        enc = _PlanEncoder(it.image_encoder, images)
        it.image_encoder = enc
        # encode_instruct also decodes every token back into a text field we never read: 1.9-2.1 of the
        # 2.4-2.5 ms a 1024^2-image prompt took to tokenise (benchmarks/bench_host.py, development CPU); the
        # copy's decode is a no-op instead
        it.decode = _no_text
        if marked:
            _encode_with_images(it, marked)
        tokens = it.encode_instruct(instruct).tokens
    except PixtralInputError:
        raise
    except (MistralCommonException, AssertionError, ValueError, TypeError) as exc:
        raise MessageFormatError(f"messages rejected by the chat format ({type(exc).__name__}): {exc}") from exc
    return list(tokens), enc.order


def _encode_with_images(it, marked: dict[int, list]) -> None:
    """Make the per-call instruct tokenizer copy `it` encode the marked (image-bearing) assistant and tool
    messages. mistral_common has no image format there for v7 (its V7 encoders assert text only; V13+ put
    tool-result chunks, images included, between [TOOL_RESULTS] and [/TOOL_RESULTS]). Ours keeps v7's
    layout and puts the content's chunks, text and images in their order, where its text goes:
        tool:      [TOOL_RESULTS] <tool_call_id> [TOOL_CONTENT] <chunks> [/TOOL_RESULTS]
        assistant: <chunks> [TOOL_CALLS]... (if it has calls) </s> (unless prefix)
    each text chunk encoded alone, each image as its [IMG]... tokens (the user-message image layout), as the
    Pixtral-Large chat template lays images inline in assistant and tool turns. Unmarked messages go to
    mistral_common's own encoders."""
    from mistral_common.protocol.instruct.chunk import ImageURLChunk, TextChunk

    def chunks_of(content: str) -> list:
        out = []
        for k, piece in enumerate(_PARTS_RE.split(content)):
            if k % 2 == 0:
                if piece:
                    out.append(TextChunk(text=piece))
                continue
            if int(piece) not in marked:
                raise MessageFormatError(f"unexpected image marker {piece!r} in a message")
            out += [TextChunk(text=v) if kind == "text" else ImageURLChunk(image_url=f"{_PLACEHOLDER}{v}")
                    for kind, v in marked[int(piece)] if not (kind == "text" and v == "")]
        return out

    tool_message, assistant_message = it.encode_tool_message, it.encode_assistant_message

    def encode_tool_message(message, is_before_last_user_message):
        if not (isinstance(message.content, str) and _PARTS_RE.search(message.content)):
            return tool_message(message, is_before_last_user_message)
        tokens, images, _ = it._encode_content_chunks(chunks_of(message.content))
        return ([it.BEGIN_TOOL_RESULTS, *it.tokenizer.encode(message.tool_call_id, bos=False, eos=False),
                 it.BEGIN_TOOL_CONTENT, *tokens, it.END_TOOL_RESULTS], images, [])

    def encode_assistant_message(message, is_before_last_user_message):
        if not (isinstance(message.content, str) and _PARTS_RE.search(message.content)):
            return assistant_message(message=message, is_before_last_user_message=is_before_last_user_message)
        tokens, _, _ = it._encode_content_chunks(chunks_of(message.content))
        if message.tool_calls:
            tokens += it._encode_tool_calls_in_assistant_message(message)
        if not message.prefix:
            tokens.append(it.tokenizer.eos_id)
        return tokens

    it.encode_tool_message, it.encode_assistant_message = encode_tool_message, encode_assistant_message


def tokenizer_version(tokenizer) -> int:
    """The mistral_common tokenizer version as a number: 3 (Pixtral-12B), 7 (Pixtral-Large, Mistral-Small-3.1)."""
    return int(str(tokenizer.instruct_tokenizer.tokenizer.version.value).lstrip("v"))


def _check_image_roles(msgs: list[dict], tokenizer) -> None:
    """Images outside user messages need a v7+ tokenizer: v3's chat format has no place for them."""
    version = tokenizer_version(tokenizer)
    if version >= 7:
        return
    for i, m in enumerate(msgs):
        if m["role"] in ("assistant", "tool") and any(k == "image" for k, _ in m["_parts"]):
            j = next(j for j, (k, _) in enumerate(m["_parts"]) if k == "image")
            raise MessageFormatError(
                f"messages[{i}].content[{j}]: an image in this {m['role']} message needs a v7 chat format "
                f"(Pixtral-Large, Mistral-Small-3.1); this model's tokenizer is v{version} (Pixtral-12B), whose "
                "format carries images in user messages only: send the image in a user message")


# --------------------------------------------------------------------------------------------- encode
_POOL = None


def _image_pool():
    """Threads shared by every request for opening (fetching) and decoding images: Pillow's decoders and
    urllib release the GIL, so a request's images load side by side."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="pixtral-rt-image")
    return _POOL


# Threads pay off only with enough work beside the largest image: on a 2-core machine, 4 images of 2 MP
# in all took 0.75x the serial time, while 37x1500 + 640x480 took 1.08x (benchmarks/bench_encode.py)
MIN_PARALLEL_PIXELS = 200_000


def _each(fn, items: list, workers: int | None, worth_it: bool = True):
    """[fn(x) for x in items], on the image threads when there is more than one item and it is worth it
    (workers None: decide; 1: always in order, here; 0 or > 1: threads). With threads every item runs; the
    first failure in item order is raised, as in the serial loop."""
    if len(items) <= 1 or workers == 1 or (workers is None and not worth_it):
        return [fn(x) for x in items]
    futures = [_image_pool().submit(fn, x) for x in items]
    return [f.result() for f in futures]


def _text_token_bound(msgs: list[dict], tools: list[dict] | None = None) -> int:
    """An upper bound on the prompt's text tokens, without tokenising: every string in the messages (image
    parts left out) costs at most its UTF-8 bytes + 1 tokens (byte-level BPE; SentencePiece with byte
    fallback and a leading-space piece), plus 16 control tokens per message and 16 for the prompt; the
    tools' JSON as mistral_common writes it, at most its bytes + 16."""
    def walk(x) -> int:
        if isinstance(x, str):
            return len(x.encode("utf-8", "surrogatepass")) + 1
        if isinstance(x, dict):
            if x.get("type") in ("image", "image_url"):
                return 0
            return sum(walk(k) + walk(v) for k, v in x.items() if k != "_parts")
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return len(str(x)) + 1 if x is not None else 0
    tools_bound = len(json.dumps(tools, ensure_ascii=False).encode("utf-8", "surrogatepass")) + 16 if tools else 0
    return sum(walk(m) + 16 for m in msgs) + 16 + tools_bound


def encode_request(messages, tokenizer, args: PixtralArgs, *, max_images: int = 12, max_context: int | None = None,
                   max_tokens: int = 0, image_limits: ImageLimits = DEFAULT_LIMITS, threads: int = 0,
                   to_torch: bool = True, raw_pixels: bool = False, workers: int | None = None,
                   digest=None, tools: list[dict] | None = None) -> EncodedRequest:
    """Plan, check and encode one chat request. Order of work: shape check -> image count cap -> image headers
    (pixel cap) -> tokens -> context check -> decode + preprocess (decoding starts beside the tokens when the
    context check cannot fail, see below). Raises a PixtralInputError subclass naming
    the input (MessageFormatError, TooManyImagesError, ImageError..., ContextLengthError); nothing is
    decoded for a request that is refused on counts. raw_pixels=True stops after decoding: `images` then
    holds uint8 (h, w, 3) arrays, to be resized and normalised on the GPU (preprocess.preprocess_cuda).
    A request's images are opened (URLs fetched) and decoded + preprocessed on shared threads, side by side,
    when that is worth it (several URLs; enough pixels beside the largest image); workers=1 does it one by
    one, workers=0 forces threads (same pixels, same tokens either way). When the request fits the context
    even at an upper bound on its text tokens (the usual case), its images are decoded on the threads while
    this thread tokenises; otherwise decoding waits for the exact context check, so a request refused on
    counts never has a pixel decoded (one the chat format refuses may have had its decoding started; queued
    decodes are cancelled). digest: optional fn(image) -> bytes, run on the image threads too
    (EncodedRequest.image_digests). tools: OpenAI-shaped function tools, tokenised by mistral_common into
    [AVAILABLE_TOOLS] (which tool_choice does not change: it only shapes the grammar, pixtral_rt.structured).
    Images in assistant and tool messages need a v7 tokenizer (_encode_with_images); v3 refuses them."""
    msgs, images = _parse_messages(messages)
    _check_image_roles(msgs, tokenizer)
    if max_tokens < 0:
        raise RequestError(f"max_tokens must be >= 0, got {max_tokens}")
    if len(images) > max_images:
        raise TooManyImagesError(f"request has {len(images)} images; at most {max_images} are allowed per request")
    v = args.vision

    def open_one(im):
        try:
            im.opened = open_image(im.source, image_limits)
        except ImageError as exc:
            raise type(exc)(f"{im.where}: {exc}", exc.source) from exc
        im.plan = plan_image(im.opened.width, im.opened.height, v)

    # opening reads headers only; threads help when several images come over the network
    n_urls = sum(isinstance(im.source, str) and im.source.startswith(("http://", "https://")) for im in images)
    _each(open_one, images, workers, worth_it=n_urls >= 2)

    context = args.text.max_seq_len if max_context is None else max_context
    image_tokens = sum(im.plan.n_tokens for im in images)

    def decode_one(im):
        try:
            pixels = im.opened.decode()
        except ImageError as exc:
            raise type(exc)(f"{im.where}: {exc}", exc.source) from exc
        cached = im.opened.cached          # image_cache entry of its encoded bytes (None: not cached)
        im.opened = None  # drop the decoder's copy early
        if raw_pixels:
            out = pixels
            if digest is not None and cached is not None:   # the pixels' digest, computed once per image
                if cached.digest is None or cached.digest[0] is not digest:
                    cached.digest = (digest, digest(out))
                return out, cached.digest[1]
        else:
            out = preprocess(pixels, (im.plan.out_height, im.plan.out_width), threads=threads)
            if to_torch:
                import torch
                out = torch.from_numpy(out)
        return out, (digest(out) if digest is not None else None)

    # decode beside tokenisation when no count check can refuse the request any more
    early = None
    if images and workers != 1 and image_tokens + _text_token_bound(msgs, tools) + max_tokens <= context:
        early = {id(im): _image_pool().submit(decode_one, im) for im in images}
    try:
        tokens, ordered, positions = _checked_tokens(tokenizer, msgs, images, v, max_tokens, context, image_tokens,
                                                     tools)
    except BaseException:
        for f in (early or {}).values():
            f.cancel()                  # queued decodes of a refused request never start
        raise
    if early is not None:
        done = [early[id(im)].result() for im in ordered]   # the first failure in prompt order is raised
    else:
        pixels = sorted(im.plan.width * im.plan.height for im in ordered)
        done = _each(decode_one, ordered, workers, worth_it=sum(pixels[:-1]) >= MIN_PARALLEL_PIXELS)
    tensors, cu = [t for t, _ in done], [0]
    for im in ordered:
        cu.append(cu[-1] + im.plan.n_patches)
    return EncodedRequest(
        tokens=tokens, images=tensors, patch_grids=[(im.plan.rows, im.plan.cols) for im in ordered],
        image_token_positions=positions, cu_seqlens=cu, prompt_tokens=len(tokens), max_tokens=max_tokens,
        image_tokens=image_tokens, image_sizes=[(im.plan.width, im.plan.height) for im in ordered],
        image_names=[im.where for im in ordered], preprocess_backend="deferred" if raw_pixels else backend(),
        image_out_hw=[(im.plan.out_height, im.plan.out_width) for im in ordered], images_are_raw=raw_pixels,
        image_digests=[d for _, d in done] if digest is not None else [])


def _checked_tokens(tokenizer, msgs, images, v, max_tokens: int, context: int, image_tokens: int, tools=None):
    """Tokens, the images in prompt order and the [IMG] positions, checked against the plans and the context."""
    tokens, order = _tokenize(tokenizer, msgs, images, tools)
    if sorted(order) != list(range(len(images))):
        raise MessageFormatError(f"chat format used images {order}, expected each of {len(images)} images once")
    ordered = [images[k] for k in order]
    positions = [i for i, t in enumerate(tokens) if t == v.image_token_id]
    expected = sum(im.plan.n_image_tokens for im in ordered)
    if len(positions) != expected:  # e.g. a tokenizer that turns typed "[IMG]" text into the control token
        raise MessageFormatError(f"prompt holds {len(positions)} [IMG] tokens but the images need {expected}: "
                                 "text must not contain image control tokens")
    if len(tokens) + max_tokens > context:
        raise ContextLengthError(
            f"request needs {len(tokens)} prompt tokens ({len(tokens) - image_tokens} text + {image_tokens} for "
            f"{len(ordered)} image(s)) + {max_tokens} max_tokens = {len(tokens) + max_tokens}, over the context "
            f"of {context} tokens: shorten the prompt, use fewer or smaller images, or lower max_tokens")
    return tokens, ordered, positions


def chat_prompt_tokens(messages, tokenizer, args: PixtralArgs, *, max_images: int = 12,
                       image_limits: ImageLimits = DEFAULT_LIMITS, workers: int | None = None,
                       tools: list[dict] | None = None) -> list[int]:
    """The prompt token ids `encode_request` would give these messages (and tools: the same chat format, image
    tokens and [AVAILABLE_TOOLS] included), for counting (POST /tokenize): images are opened (headers read, URLs fetched) and planned,
    never decoded, and no context check is made (the caller compares the count with the context). Raises
    the input errors encode_request raises for the same messages, but ContextLengthError."""
    msgs, images = _parse_messages(messages)
    if len(images) > max_images:
        raise TooManyImagesError(f"request has {len(images)} images; at most {max_images} are allowed per request")

    def plan_one(im):
        try:
            opened = open_image(im.source, image_limits)
        except ImageError as exc:
            raise type(exc)(f"{im.where}: {exc}", exc.source) from exc
        im.plan = plan_image(opened.width, opened.height, args.vision)

    n_urls = sum(isinstance(im.source, str) and im.source.startswith(("http://", "https://")) for im in images)
    _each(plan_one, images, workers, worth_it=n_urls >= 2)
    image_tokens = sum(im.plan.n_tokens for im in images)
    tokens, _, _ = _checked_tokens(tokenizer, msgs, images, args.vision, 0, 1 << 62, image_tokens, tools)
    return tokens
