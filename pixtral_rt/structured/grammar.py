"""Constraint -> a Lark grammar (llguidance's dialect) in the output format of the tokenizer's version.

Tool calls, v3 (Pixtral-12B, tekken) and v7 (Pixtral-Large v7m1 SentencePiece, Mistral-Small-3.1 tekken),
as mistral_common's InstructTokenizerV2/V3 `_encode_tool_calls_in_assistant_message` writes them into an
assistant turn (the format these models were trained on):

    [TOOL_CALLS] + encode(json.dumps([{"name": "f", "arguments": {...}}, ...]))

so `[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]` with json.dumps's ", " / ": "
separators and no other whitespace. SentencePiece's encode adds its dummy-prefix space, so after
[TOOL_CALLS] a v7m1 model writes " [" (one optional space is allowed there); tekken has none. v7 assistant
turns may carry text before the calls (InstructTokenizerV7.encode_assistant_message), v3 ones may not.
(mistral_common's own GrammarFactory covers only tekken >= v11, whose format is [TOOL_CALLS]name[ARGS]{...}.)

Arguments and response_format schemas are llguidance %json with the same separators and no free whitespace:
the shortest valid answers, in the layout the model saw in training. Free text is one lexeme /(.|\\n)+/,
which admits no special token, so [TOOL_CALLS], [IMG] and the like never appear inside text.
"""
from __future__ import annotations

import json

from .constraint import Constraint
from .vocab import Vocab

# llguidance's JSON options: json.dumps's default separators, no whitespace beyond them
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def json_rule(schema: dict) -> str:
    """An llguidance `%json {...}` item for `schema` with JSON_OPTIONS (a schema's own x-guidance is
    replaced: the layout is this runtime's choice, not the request's)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)   # a Lark string literal is a JSON string


def tool_call_rules(c: Constraint, v: Vocab) -> list[str]:
    """Rules `fcalls` (the whole [TOOL_CALLS] part) and one `call_i` per callable tool."""
    tools = c.tool_list()
    chosen = [(i, t) for i, t in enumerate(tools) if not c.function or t["name"] == c.function]
    rules = []
    for i, t in chosen:
        head = _quoted('{"name": ' + json.dumps(t["name"], ensure_ascii=False) + ', "arguments": ')
        rules.append(f"call_{i}: {head} {json_rule(t.get('parameters') or EMPTY_PARAMETERS)} \"}}\"")
    call = " | ".join(f"call_{i}" for i, _ in chosen)
    rules.append(f"call: {call}")
    space = '" "? ' if v.sentencepiece else ""
    more = ' (", " call)*' if c.parallel else ""
    rules.append(f'fcalls: <[{v.tool_calls_id}]> {space}"[" call{more} "]"')
    return rules


def lark_for(c: Constraint, v: Vocab) -> str:
    """The whole grammar of constraint `c` for vocabulary `v` (start rule first)."""
    lead = '" "? ' if v.sentencepiece else ""    # SentencePiece starts an answer with its dummy-prefix space
    if c.kind == "json_object":
        return f"start: {lead}{json_rule({'type': 'object'})}\n"
    if c.kind == "json_schema":
        return f"start: {lead}{json_rule(c.schema_dict())}\n"
    text = "TEXT: /(.|\\n)+/"
    if c.choice == "none":
        # an empty answer is allowed (EOS first), as without a grammar
        return f"start: TEXT?\n{text}\n"
    rules = tool_call_rules(c, v)
    if c.choice == "required" or c.function:
        start = "start: fcalls"
    elif c.schema:                                   # auto + response_format: the JSON answer or calls
        start = f"start: {lead}{json_rule(c.schema_dict())} | fcalls"
    elif v.calls_after_text:
        start = "start: TEXT | TEXT? fcalls"
    else:
        start = "start: TEXT | fcalls"
    return "\n".join([start, *rules, text]) + "\n"
