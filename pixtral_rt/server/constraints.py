"""A chat request's response_format, tools and tool_choice -> the Constraint its answers are sampled under.

    c = constraint_for(chat)          # None: free text
    parse_calls = parses_tool_calls(chat)

    response_format text / none, no tools            None
    response_format json_object                      Constraint.json_object()
    response_format json_schema                      Constraint.json_schema(schema)
    tools, tool_choice "none"                        text that never starts a call (or the JSON format asked for)
    tools, tool_choice "auto" (the default)          text or calls; with a JSON response_format: the JSON or calls
    tools, tool_choice "required"                    one or more calls (one with parallel_tool_calls false)
    tools, tool_choice {"function": {"name": f}}     calls of f only

The tools always reach the prompt ([AVAILABLE_TOOLS], pixtral_rt/chat.py), whatever tool_choice says, as
mistral_common tokenises them. The request was checked for shape by protocol.parse_chat_request; whether
each schema compiles is pixtral_rt.structured.check_constraint's part.
"""
from __future__ import annotations

from ..structured.constraint import Constraint
from .protocol import ChatCompletionRequest, NamedToolChoice


def _schema(chat: ChatCompletionRequest) -> dict | None:
    fmt = chat.response_format
    if fmt is None or fmt.type == "text":
        return None
    return {"type": "object"} if fmt.type == "json_object" else fmt.json_schema.schema_


def _json(chat: ChatCompletionRequest) -> Constraint | None:
    fmt = chat.response_format
    if fmt is None or fmt.type == "text":
        return None
    return Constraint.json_object() if fmt.type == "json_object" else Constraint.json_schema(fmt.json_schema.schema_)


def constraint_for(chat: ChatCompletionRequest) -> Constraint | None:
    if not chat.tools:
        return _json(chat)
    tools = [{"name": t.function.name, "parameters": t.function.parameters} for t in chat.tools]
    parallel = chat.parallel_tool_calls is not False
    choice = chat.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice):
        return Constraint.tool_calls(tools, "required", function=choice.function.name, parallel=parallel)
    if choice == "none":
        return _json(chat) or Constraint.tool_calls(tools, "none", parallel=parallel)
    return Constraint.tool_calls(tools, choice, parallel=parallel, schema=_schema(chat) if choice == "auto" else None)


def parses_tool_calls(chat: ChatCompletionRequest) -> bool:
    """Whether the answers may hold [TOOL_CALLS] (and so go through the tool-call parser)."""
    return bool(chat.tools) and chat.tool_choice != "none"
