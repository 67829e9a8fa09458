"""The request side of tools and structured output, pure parsing (no server): tools / tool_choice /
parallel_tool_calls / response_format validated with the offending parameter named, and the mapping of a
request to the Constraint its answers are sampled under (pixtral_rt/server/constraints.py); the response
types serialise as OpenAI's (tool_calls left out of a message without calls; a call's first stream delta
with id, type and name, later ones with arguments only)."""
from __future__ import annotations

import pytest

from pixtral_rt.server.constraints import constraint_for, parses_tool_calls
from pixtral_rt.server.protocol import (AssistantMessage, DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                        FunctionCall, OpenAIError, ToolCall, parse_chat_request)
from pixtral_rt.structured import Constraint

MSGS = [{"role": "user", "content": "hi"}]
PARAMS = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "now"}}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _req(**kw):
    return parse_chat_request({"messages": MSGS, **kw})


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"nam": "search"}}},
     "tool_choice.function.nam"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice.function.name"),
    ({"tool_choice": {"type": "function", "function": {"name": "search"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_and_format_fields_are_400_naming_the_parameter(extra, param):
    with pytest.raises(OpenAIError) as e:
        _req(**extra)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param), e.value.message


def test_requests_map_to_their_constraints():
    tl = [{"name": "search", "parameters": PARAMS}, {"name": "now", "parameters": None}]
    assert constraint_for(_req()) is None
    assert constraint_for(_req(response_format={"type": "text"}, tools=[])) is None
    assert constraint_for(_req(response_format={"type": "json_object"})) == Constraint.json_object()
    assert constraint_for(_req(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMA, "strict": True}})) == Constraint.json_schema(SCHEMA)
    assert constraint_for(_req(tools=TOOLS)) == Constraint.tool_calls(tl, "auto")
    assert constraint_for(_req(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)) == \
        Constraint.tool_calls(tl, "required", parallel=False)
    assert constraint_for(_req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}})) == \
        Constraint.tool_calls(tl, "required", function="now")
    assert constraint_for(_req(tools=TOOLS, tool_choice="none")) == Constraint.tool_calls(tl, "none")
    assert constraint_for(_req(tools=TOOLS, tool_choice="none", response_format={"type": "json_object"})) == \
        Constraint.json_object()
    assert constraint_for(_req(tools=TOOLS, response_format={"type": "json_object"})) == \
        Constraint.tool_calls(tl, "auto", schema={"type": "object"})
    assert parses_tool_calls(_req(tools=TOOLS)) and not parses_tool_calls(_req(tools=TOOLS, tool_choice="none"))
    assert not parses_tool_calls(_req(response_format={"type": "json_object"}))
    assert _req(tools=TOOLS).tool_dicts() == [
        {"type": "function", "function": {"name": "search", "description": "Search", "parameters": PARAMS}},
        {"type": "function", "function": {"name": "now"}}]


def test_response_types_serialise_as_openai():
    assert AssistantMessage(content="hi").model_dump() == {"role": "assistant", "content": "hi"}
    call = ToolCall(id="abcDEF123", function=FunctionCall(name="f", arguments='{"a": 1}'))
    assert AssistantMessage(content=None, tool_calls=[call]).model_dump() == {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    first = DeltaToolCall(index=0, id="abcDEF123", function=DeltaFunctionCall(name="f", arguments=""))
    more = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"a"'))
    assert DeltaMessage(tool_calls=[first, more]).model_dump() == {"tool_calls": [
        {"index": 0, "id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"a"'}}]}
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
