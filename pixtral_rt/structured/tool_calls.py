"""A model's answer, token by token -> its text content and its tool calls in OpenAI's shape.

v3 / v7 tokenizers (Pixtral-12B, Pixtral-Large, Mistral-Small-3.1) write calls as one [TOOL_CALLS] token and
a JSON list (grammar.py): `[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, ...]`.

    calls = ToolCallStream(tokenizer, stop=("\\n\\n",))
    text, deltas = calls.add(token_ids)    # new content text, and ToolCallDelta items (streaming)
    text, deltas = calls.finish()          # at the end of the answer
    calls.text, calls.calls                # all content; the complete calls (ToolCall: id, name, arguments)

Streaming follows OpenAI: a call's first delta carries index, id, type and function.name with arguments "",
the next ones argument fragments; the fragments concatenate to the call's `arguments`, which is the
arguments JSON exactly as the model wrote it (so streamed and whole answers agree by construction).
Text before [TOOL_CALLS] is content (v7 allows text, then calls); stop strings apply to content only.

Output that is not a valid call list (the model was not constrained, or max_tokens cut it) is returned as
text content: `calls.malformed` is then True and `calls.calls` empty; while streaming, text that turns out
malformed before a call's first delta went out is sent as content from there on (what already went out as
call deltas cannot be taken back: a cut answer ends with finish_reason "length").
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from ..serving.detokenize import TextStream, incremental_text

_ID_CHARS = string.ascii_letters + string.digits
# a call's head, up to where its arguments value begins: name first, as the grammar writes it
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    """A tool-call id as v3 / v7 tokenizers require it back in the conversation: 9 letters or digits
    (mistral_common's validator: ^[a-zA-Z0-9]{9}$)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str                 # JSON text of the arguments object


@dataclass
class ToolCallDelta:
    index: int                     # which call of this answer
    id: str | None = None          # first delta of a call only (with the name)
    name: str | None = None
    arguments: str = ""


def _merged(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive argument fragments of one call as one delta (a call's first delta stays on its own)."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        if out and d.id is None and out[-1].index == d.index and out[-1].id is None:
            out[-1] = ToolCallDelta(index=d.index, arguments=out[-1].arguments + d.arguments)
        else:
            out.append(d)
    return out


@dataclass
class _Open:
    """The call object being read: where it starts in the call text, its head once read, what went out."""
    start: int
    index: int
    id: str = ""
    name: str | None = None
    args_start: int = -1           # where its arguments value begins (an offset into the call text)
    sent: int = -1                 # end of the argument text already sent


HEAD_SEARCH_CHARS = 256            # a head not complete within this many characters is not in the grammar's order


class ToolCallStream:
    def __init__(self, tokenizer, stop=(), tool_calls_id: int | None = None):
        self.tool_calls_id = tokenizer.instruct_tokenizer.TOOL_CALLS if tool_calls_id is None else tool_calls_id
        self._content = TextStream(tokenizer, stop=stop)
        self._decoder = incremental_text(tokenizer)
        self.started = False                 # [TOOL_CALLS] seen
        self.malformed = False
        self.calls: list[ToolCall] = []
        self._buf = ""                       # decoded call text after [TOOL_CALLS]
        self._pos = 0                        # scanned up to here
        self._depth = 0                      # 1 inside the list, 2 inside a call object, 3+ inside its arguments
        self._in_string = self._escape = False
        self._closed = False                 # the call list ended
        self._open: _Open | None = None
        self._sent_any = False               # a call delta went out: streaming can no longer turn it into text
        self._streamed = 0                   # malformed call text sent as content so far

    # ------------------------------------------------------------------ the interface
    @property
    def stopped(self) -> bool:
        return self._content.stopped

    @property
    def text(self) -> str:
        """The whole answer's content: the text before [TOOL_CALLS], and the call text if it is malformed."""
        return self._content.text + (self._buf if self.malformed else "")

    def add(self, token_ids) -> tuple[str, list[ToolCallDelta]]:
        text, deltas = self._add(token_ids)
        return text, _merged(deltas)

    def _add(self, token_ids) -> tuple[str, list[ToolCallDelta]]:
        text, deltas = "", []
        for t in token_ids:
            t = int(t)
            if self.started:
                deltas += self._feed(self._decoder.add(t))
            elif t == self.tool_calls_id:
                text += self._content.finish()       # content so far is final (nothing held for a stop)
                self.started = True
            else:
                text += self._content.add([t])
                if self._content.stopped:
                    break
        return text + self._malformed_text(), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The rest of the answer; afterwards `calls` holds the complete calls (none if malformed)."""
        if not self.started:
            return self._content.finish(), []
        deltas = self._feed(self._decoder.flush())
        if not self.malformed and not self._closed:
            self._fail()                                   # cut short (max_tokens) or never opened
        if not self.malformed:
            try:
                json.loads(self._buf)                      # the scan is lenient about commas: the list must parse
            except ValueError:
                self._fail()
        if self.malformed:
            self.calls = []
        return self._malformed_text(), _merged(deltas)

    # ------------------------------------------------------------------ scanning the call text
    def _malformed_text(self) -> str:
        """Malformed call text not yet streamed, as content: only while no call delta went out."""
        if not self.malformed or self._sent_any or self._streamed == len(self._buf):
            return ""
        piece, self._streamed = self._buf[self._streamed:], len(self._buf)
        return piece

    def _fail(self) -> None:
        self.malformed, self._open = True, None

    def _feed(self, piece: str) -> list[ToolCallDelta]:
        self._buf += piece
        out: list[ToolCallDelta] = []
        buf = self._buf
        while self._pos < len(buf) and not self.malformed:
            ch = buf[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch.isspace():
                pass
            elif self._closed:
                self._fail()                               # text after the call list
            elif self._depth == 0:
                if ch != "[":
                    self._fail()                           # the list must open first
                self._depth = 1
            elif self._depth == 1:
                if ch == "{":
                    self._open = _Open(start=self._pos - 1, index=len(self.calls))
                    self._depth = 2
                elif ch == "]":
                    self._depth, self._closed = 0, True
                elif ch != "," or not self.calls:
                    self._fail()                           # only call objects, comma-separated
            elif ch == '"':
                self._in_string = True
            elif ch in "[{":
                self._depth += 1
            elif ch in "]}":
                self._depth -= 1
                if self._depth == 1:
                    out += self._close_call()
                    continue
            if self._open is not None and not self.malformed:
                out += self._progress()
        return out

    def _progress(self) -> list[ToolCallDelta]:
        """Deltas of the open call: its head once complete, then the argument text scanned so far."""
        o = self._open
        if o.args_start < 0:
            if self._pos - o.start > HEAD_SEARCH_CHARS:
                return []
            m = _HEAD.match(self._buf, o.start, self._pos)
            if m is None or m.end() != self._pos:
                return []
            o.name, o.args_start, o.id = json.loads(m.group(1)), m.end(), new_call_id()
            self._sent_any = True
            return [ToolCallDelta(index=o.index, id=o.id, name=o.name, arguments="")]
        while o.args_start < self._pos and self._buf[o.args_start].isspace():
            o.args_start += 1                          # the arguments value starts at its first character
        o.sent = max(o.sent, o.args_start)
        # the arguments object's text so far: everything scanned while inside it (depth >= 3), and its
        # closing brace (depth back to 2 right after it)
        inside = self._depth >= 3 or (self._depth == 2 and self._buf[self._pos - 1] in "]}")
        if inside and self._buf[o.args_start] in "[{" and self._pos > o.sent:
            piece, o.sent = self._buf[o.sent:self._pos], self._pos
            return [ToolCallDelta(index=o.index, arguments=piece)]
        return []

    def _close_call(self) -> list[ToolCallDelta]:
        """The open call object just closed (at self._pos): check it, send what is left of its arguments."""
        o, self._open = self._open, None
        try:
            obj = json.loads(self._buf[o.start:self._pos])
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or set(obj) - {"name", "arguments", "id"}:
            self._fail()
            return []
        args = obj.get("arguments", {})
        if isinstance(args, str):                      # arguments written as a JSON string of JSON
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            self._fail()
            return []
        out = []
        if o.args_start >= 0 and isinstance(obj.get("arguments"), dict):
            arguments = self._buf[o.args_start:o.sent]     # as written (the object's text was all sent)
        else:                                           # not in the grammar's order: the whole call at once
            arguments = json.dumps(args, ensure_ascii=False)
            if o.args_start < 0:
                o.id, o.name = new_call_id(), obj["name"]
                out.append(ToolCallDelta(index=o.index, id=o.id, name=o.name, arguments=""))
                self._sent_any = True
            out.append(ToolCallDelta(index=o.index, arguments=arguments))
        self.calls.append(ToolCall(id=o.id, name=o.name, arguments=arguments))
        return out
