"""A mistral_common tokenizer as a grammar library sees it: the bytes of every token id, which ids are
special, and the facts of the chat format that the tool-call grammar and parser need.

    v = vocab_of(tokenizer)          # cached per tokenizer object
    v.tokens[i]                      # bytes of token i; a special token as b"<NAME>" (llguidance's form)
    v.special_ids, v.eos_id, v.n_words
    v.tool_calls_id                  # [TOOL_CALLS]: 9 in tekken (Pixtral-12B, Mistral-Small-3.1), 5 in v7m1
    v.sentencepiece, v.version       # Pixtral-Large's v7m1 SentencePiece file; "v3" | "v7" | ...

Tekken (byte-level BPE): ids < num_special_tokens (1000) are control tokens, the rest are byte pieces.
SentencePiece v7m1: control pieces plus <unk> (id 0) are special; "\u2581" stands for a space and
"<0xNN>" for one raw byte (byte fallback). Special tokens are renamed "[X]" -> "<X>": llguidance only takes
special tokens written in angle brackets (mistral_common's own guidance adapter does the same); the
grammars here name them by id (<[9]>), so only uniqueness matters.
"""
from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass, field

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Vocab:
    tokens: list[bytes]
    special_ids: list[int]
    eos_id: int
    bos_id: int
    tool_calls_id: int
    sentencepiece: bool
    version: str                    # mistral_common TokenizerVersion value: "v3", "v7", ...
    encode: object = field(repr=False, default=None)   # str -> token ids, no BOS/EOS, no dummy prefix

    @property
    def n_words(self) -> int:
        return len(self.tokens)

    @property
    def calls_after_text(self) -> bool:
        """v7 and later encode an assistant message with text AND tool calls (text first); v3 refuses both."""
        return int(self.version.lstrip("v") or 0) >= 7


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def vocab_of(tokenizer) -> Vocab:
    """The Vocab of a mistral_common MistralTokenizer (built once per tokenizer object: ~0.4 s for tekken's
    131072 ids on the development CPU)."""
    with _LOCK:
        v = _CACHE.get(tokenizer)
        if v is None:
            v = _CACHE[tokenizer] = _build(tokenizer)
        return v


def _special_name(piece: str) -> bytes:
    return (f"<{piece[1:-1]}>" if piece.startswith("[") and piece.endswith("]") else piece).encode()


def _build(tokenizer) -> Vocab:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, SpecialTokens

    raw = tokenizer.instruct_tokenizer.tokenizer
    n = raw.n_words
    if hasattr(raw, "id_to_byte_piece"):            # tekken
        n_special = raw.num_special_tokens
        special = list(range(n_special))
        tokens = [_special_name(raw.id_to_piece(i)) for i in special]
        tokens += [raw.id_to_byte_piece(i, SpecialTokenPolicy.RAISE) for i in range(n_special, n)]
        sentencepiece = False

        def encode(text: str) -> list[int]:
            return raw.encode(text, bos=False, eos=False)
    else:                                           # SentencePiece
        special_set = set(raw.special_ids) | {raw.unk_id}
        special = sorted(special_set)
        tokens = []
        for i in range(n):
            piece = raw.id_to_piece(i)
            if i in special_set:
                tokens.append(_special_name(piece))
            elif (m := _BYTE_PIECE.fullmatch(piece)) is not None:
                tokens.append(bytes([int(m.group(1), 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        sentencepiece = True
        # SentencePiece adds a dummy-prefix space to the start of every encode: strip it by encoding behind
        # a marker character and dropping the marker's pieces
        marker = raw.encode("\u263a", bos=False, eos=False)

        def encode(text: str) -> list[int]:
            ids = raw.encode("\u263a" + text, bos=False, eos=False)
            return ids[len(marker):] if ids[:len(marker)] == marker else raw.encode(text, bos=False, eos=False)
    return Vocab(tokens=tokens, special_ids=special, eos_id=raw.eos_id, bos_id=raw.bos_id,
                 tool_calls_id=raw.get_special_token(SpecialTokens.tool_calls.value), sentencepiece=sentencepiece,
                 version=str(raw.version.value), encode=encode)
