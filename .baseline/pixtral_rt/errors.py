"""User-facing errors of the input pipeline.

Every error says what was wrong, with which input, and what to do. All derive from `PixtralInputError`
(a ValueError), so a server can map the whole family to HTTP 4xx, and each class carries a `status`
hint (400 bad input, 413 too large, 502 upstream fetch failed) and the `source` it is about.

    PixtralInputError
      ImageError                     an image could not be used
        ImageSourceError             malformed reference: unknown scheme, missing file, raw base64, bad data URL
        ImageFetchError              http(s) download failed: status, timeout, too many redirects, too big
        ImageDecodeError             empty, corrupt, truncated or non-image bytes
        ImageTooLargeError           pixel cap (decompression bomb) exceeded, checked from the header
        AnimatedImageError           animated input refused (only when the caller asked to refuse it)
      RequestError                   the request as a whole cannot be served
        MessageFormatError           messages not in the OpenAI chat shape
        TooManyImagesError           more images than the per-request cap
        ContextLengthError           prompt + max_tokens larger than the context
      TokenizerError                 tokenizer file missing or not matching the model config
      DeviceError                    --device names no device this machine has or this runtime runs on
    AnimatedImageWarning (a UserWarning): an animated image was given; its first frame is used
      (route_image_warnings shows it as one clean line: the CLI prints it, the server logs it)
"""
from __future__ import annotations

import warnings
from typing import Callable


def describe_source(source: object, limit: int = 80) -> str:
    """A short printable name for an image source (a path, a URL, '<bytes: 123>', '<PIL RGB 4x3>')."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str):
        s = source if len(source) <= limit else source[: limit - 20] + f"...(+{len(source) - limit + 20} chars)"
        return repr(s)
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"<{type(source).__name__} shape={tuple(shape)} dtype={getattr(source, 'dtype', '?')}>"
    size, mode = getattr(source, "size", None), getattr(source, "mode", None)
    if size is not None and mode is not None:
        return f"<PIL {mode} {size[0]}x{size[1]}>"
    return f"<{type(source).__name__}>"


class PixtralInputError(ValueError):
    """Base of all input errors. `source` names the offending input (or None for request-level errors)."""

    status = 400

    def __init__(self, message: str, source: object = None):
        super().__init__(message)
        self.source = source


class ImageError(PixtralInputError):
    """An image could not be used; the message names it."""


class ImageSourceError(ImageError):
    """The image reference is malformed (unknown scheme, missing file, raw base64 without data-URL prefix,
    bad base64, MIME type not matching the bytes, unsupported Python type)."""


class ImageFetchError(ImageError):
    """Downloading an http(s) image failed (HTTP status, timeout, too many redirects, over the size cap)."""

    status = 502


class ImageDecodeError(ImageError):
    """The bytes are empty, corrupt, truncated or not an image at all."""


class ImageTooLargeError(ImageError):
    """The image has more pixels (read from its header, before decoding) or bytes than allowed."""

    status = 413


class AnimatedImageError(ImageError):
    """An animated image was given where the caller asked for still images only."""


class RequestError(PixtralInputError):
    """The request as a whole cannot be served; nothing was computed."""


class MessageFormatError(RequestError):
    """The messages are not in the OpenAI chat shape this runtime accepts."""


class TooManyImagesError(RequestError):
    """More images in one request than the operator's cap allows."""

    status = 413


class ContextLengthError(RequestError):
    """Prompt tokens (text + image) plus max_tokens exceed the context."""

    status = 413


class AnimatedImageWarning(UserWarning):
    """An animated image (GIF/WEBP/APNG with several frames) was given; only its first frame is used."""


def route_image_warnings(emit: Callable[[str], None]) -> None:
    """Hand every AnimatedImageWarning to `emit` as its message alone (the CLI prints one line, the server
    logs it), instead of Python's 'file:line: AnimatedImageWarning: ...' followed by a source line that
    means nothing to a user. Other warnings go to the hook that was there before.

    Every load reports (a server logs it once per request, not once per process as Python's default
    registry would); a caller that wants one line per image deduplicates in `emit`. The filter is appended,
    so a user's own filter (`-W ignore::pixtral_rt.errors.AnimatedImageWarning`) still wins. Call it once,
    at start-up: it replaces process-wide hooks."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AnimatedImageWarning):
            emit(str(message))
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.filterwarnings("always", category=AnimatedImageWarning, append=True)
    warnings.showwarning = show


class DeviceError(PixtralInputError):
    """The requested device does not exist here (no CUDA GPU visible, index out of range) or is not one
    this runtime runs on (only cuda and cpu)."""


class TokenizerError(PixtralInputError):
    """The tokenizer cannot be loaded, or does not match the model config (patch size, image token ids)."""
