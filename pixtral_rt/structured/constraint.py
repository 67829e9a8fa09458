"""What one request's output must look like: a Constraint, plain text fields only.

A Constraint travels inside SamplingParams from the HTTP server to the engine, possibly through a process
boundary (serving/engine_client.py pickles SamplingParams), and keys the compiled-grammar caches on both
sides: so it is frozen, hashable and made of strings and bools, with the schemas as JSON text.

    Constraint.json_object()                                    any JSON object
    Constraint.json_schema(schema_dict)                         JSON matching the schema
    Constraint.tool_calls(tools, choice="required", function="", parallel=True, schema=None)

`tools` is the request's list in its order ([{"name": ..., "parameters": {...}}, ...]), so an error about
tools[i] names the request's own index. choice:
    "required"  the answer is one or more calls ([TOOL_CALLS] first); `function` set: calls of that one only
    "auto"      text, or calls (for v7+ tokenizers: text then calls); a call that starts is a valid one
    "none"      text only: the [TOOL_CALLS] token is never allowed
With choice "auto" and a `schema` (response_format beside tools, as mistral_common allows): the answer is
JSON matching the schema, or calls.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json_object", "json_schema", "tool_calls")
CHOICES = ("required", "auto", "none")


def _text(obj: Any) -> str:
    # key order is kept (it is the order a schema asks properties to be generated in)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Constraint:
    kind: str                      # one of KINDS
    schema: str = ""               # JSON text of a JSON schema ("" = none)
    tools: str = ""                # JSON text: [{"name": str, "parameters": schema}, ...] (kind tool_calls)
    choice: str = "required"       # one of CHOICES (kind tool_calls)
    function: str = ""             # a named tool_choice: only this function may be called
    parallel: bool = True          # more than one call per answer

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Constraint.kind must be one of {KINDS}, got {self.kind!r}")
        if self.choice not in CHOICES:
            raise ValueError(f"Constraint.choice must be one of {CHOICES}, got {self.choice!r}")
        if self.kind == "json_schema" and not self.schema:
            raise ValueError("a json_schema Constraint needs its schema")
        if self.kind == "tool_calls" and not self.tools:
            raise ValueError("a tool_calls Constraint needs its tools")

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls(kind="json_object")

    @classmethod
    def json_schema(cls, schema: dict) -> "Constraint":
        return cls(kind="json_schema", schema=_text(schema))

    @classmethod
    def tool_calls(cls, tools: list[dict], choice: str = "required", function: str = "", parallel: bool = True,
                   schema: dict | None = None) -> "Constraint":
        """tools: [{"name": str, "parameters": JSON schema or None}, ...] in the request's order."""
        listed = [{"name": t["name"], "parameters": t.get("parameters")} for t in tools]
        return cls(kind="tool_calls", tools=_text(listed), choice=choice, function=function, parallel=parallel,
                   schema="" if schema is None else _text(schema))

    def tool_list(self) -> list[dict]:
        return json.loads(self.tools) if self.tools else []

    def schema_dict(self) -> dict | None:
        return json.loads(self.schema) if self.schema else None
