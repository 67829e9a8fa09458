"""Token ids -> text pieces for one output stream, with stop strings. Runs on the consumer side (the CLI
loop, the HTTP handler), never in the step loop: detokenising 64 streams there would stall every step.

    text = TextStream(tokenizer, stop=("\n\n",))
    piece = text.add([id1, id2])   # new text that is safe to show
    if text.stopped: ...           # a stop string was found: cancel the request, finish with "stop"
    piece = text.finish()          # at the end of the stream: whatever was held back

A piece never contains the first characters of a stop string that may still complete (they are held back
until the next token decides), so the concatenated pieces always equal the final text.
"""
from __future__ import annotations

import codecs


class IncrementalText:
    """Token ids -> new text per token, decoding only a short window (host work per token stays constant
    instead of re-decoding the whole answer). Each step decodes ids[prefix:] and ids[prefix:read] and
    returns the difference: both windows start at the same token, so a tokenizer that drops a leading space
    at the start of a sequence drops it from both. A window ending in an incomplete UTF-8 sequence is held
    until the next token completes it."""

    def __init__(self, decode):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        new = self.decode(self.ids[self.prefix:])
        if new.endswith("\ufffd"):
            return ""
        return self._advance(new)

    def flush(self) -> str:
        """Whatever is held back (an incomplete sequence at the very end decodes as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        return self._advance(self.decode(self.ids[self.prefix:]))

    def _advance(self, new: str) -> str:
        old = self.decode(self.ids[self.prefix:self.read])
        self.prefix, self.read = self.read, len(self.ids)
        return new[len(old):]


class ByteText:
    """IncrementalText for a byte-level BPE tokenizer (tekken: Pixtral-12B, Mistral-Small-3.1): each token is a
    fixed byte string, so the text is the UTF-8 decoding of the bytes so far, special tokens skipped (as
    Tekkenizer.decode with its default policy). One dictionary lookup and one incremental-decoder call per
    token instead of two decodes of a window through mistral_common (benchmarks/bench_host.py, detokenize).
    Same text: tekken decodes each run of ordinary tokens between special tokens on its own (bytes -> str with
    errors="replace"), so a special token ends the decoder's run too (a sequence cut there becomes U+FFFD, as
    there). A piece never ends inside a character: the decoder holds incomplete bytes."""

    _UTF8 = codecs.getincrementaldecoder("utf-8")

    def __init__(self, pieces: "BytePieces"):
        self._pieces = pieces
        self._dec = self._UTF8(errors="replace")
        self.ids: list[int] = []

    def add(self, token: int) -> str:
        self.ids.append(token)
        piece = self._pieces.get(token)
        if piece is None:                              # special token: skipped; it closes the current run
            return self.flush()
        return self._dec.decode(piece)

    def flush(self) -> str:
        """The end of a run: bytes of a cut character become U+FFFD; the next run starts clean."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


class BytePieces:
    """Token id -> its bytes (None for a special token) of a tekken tokenizer, looked up once per id."""

    def __init__(self, raw):
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        self._raw, self._keep, self._n_special = raw, SpecialTokenPolicy.KEEP, raw.num_special_tokens
        self._cache: dict[int, bytes | None] = {}

    def get(self, token: int) -> bytes | None:
        try:
            return self._cache[token]
        except KeyError:
            b = None if token < self._n_special else self._raw.id_to_byte_piece(token, self._keep)
            self._cache[token] = b
            return b


_BYTE_PIECES: dict = {}          # raw tekken tokenizer (hashed by identity) -> its BytePieces


def incremental_text(tokenizer):
    """The fastest exact IncrementalText for `tokenizer` (a MistralTokenizer): ByteText for tekken, the
    windowed decode otherwise (SentencePiece drops a leading space, so its text is not a concatenation of
    per-token pieces)."""
    raw = getattr(getattr(tokenizer, "instruct_tokenizer", None), "tokenizer", None)
    if raw is None or not hasattr(raw, "id_to_byte_piece") or not hasattr(raw, "num_special_tokens"):
        return IncrementalText(tokenizer.decode)
    pieces = _BYTE_PIECES.get(raw)
    if pieces is None:
        pieces = _BYTE_PIECES[raw] = BytePieces(raw)
    return ByteText(pieces)


def stop_prefix_len(text: str, stops) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (held back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_stop(text: str, stops) -> int | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


class TextStream:
    def __init__(self, tokenizer, stop=()):
        self.stop = tuple(s for s in stop if s)
        self._inc = incremental_text(tokenizer)
        self._pending = ""          # decoded, not yet emitted (may begin a stop string)
        self._parts: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def token_ids(self) -> list[int]:
        return self._inc.ids

    def add(self, token_ids) -> str:
        if self.stopped:
            return ""
        for t in token_ids:
            self._pending += self._inc.add(int(t))
        return self._emit(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._inc.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        cut = find_stop(self._pending, self.stop) if self.stop else None
        if cut is not None:
            self._pending, self.stopped, final = self._pending[:cut], True, True
        keep = 0 if final else stop_prefix_len(self._pending, self.stop)
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        if out:
            self._parts.append(out)
        return out
