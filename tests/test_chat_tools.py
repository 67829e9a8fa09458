"""Tools, tool calls and tool results in the prompt: encode_request against mistral_common's
encode_chat_completion, token for token, for v3 tekken (Pixtral-12B), v7 SentencePiece (Pixtral-Large) and
v7 tekken (Mistral-Small-3.1 shaped): a multi-turn conversation with [AVAILABLE_TOOLS], an assistant turn of
calls, the tool results and a final answer. Images in v7 tool results and assistant turns, which
mistral_common does not encode, follow v7's own layout with the image tokens where the content goes (the
layout pinned here); v3 refuses them with a message that says why."""
from __future__ import annotations

import numpy as np
import pytest

from pixtral_rt.chat import encode_request, load_tokenizer
from pixtral_rt.config import MISTRAL_SMALL_31, PIXTRAL_12B, PIXTRAL_LARGE
from pixtral_rt.errors import MessageFormatError
from tests.helpers import image_tokens
from tests.test_chat import _small31_folder

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
IMG = np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8)   # 3 x 5 patches at 16 px


def _load(name: str, tmp_path_factory):
    if name == "v3-12b":
        return PIXTRAL_12B, load_tokenizer(None, PIXTRAL_12B)
    if name == "v7-large":
        pytest.importorskip("sentencepiece", reason="Pixtral-Large's v7m1 tokenizer needs sentencepiece")
        return PIXTRAL_LARGE, load_tokenizer(None, PIXTRAL_LARGE)
    return MISTRAL_SMALL_31, load_tokenizer(_small31_folder(tmp_path_factory.mktemp("small31")), MISTRAL_SMALL_31)


@pytest.fixture(scope="module", params=["v3-12b", "v7-large", "v7-small31"])
def model(request, tmp_path_factory):
    return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["v7-large", "v7-small31"])
def v7_model(request, tmp_path_factory):
    """The v7 tokenizers only: text and calls in one turn, images outside user messages (v3 refuses both)."""
    return _load(request.param, tmp_path_factory)


def _call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


CONVERSATION = [
    {"role": "system", "content": "You answer with tools when you can."},
    {"role": "user", "content": "Weather in Paris and Rome, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        _call("abcDEF123", "get_weather", '{"city": "Paris"}'), _call("xyz987UVW", "get_weather",
                                                                       '{"city": "Rome", "unit": "C"}')]},
    {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "tool", "tool_call_id": "xyz987UVW", "name": "get_weather", "content": "18 degrees, rain"},
    {"role": "assistant", "content": "Paris: 21, clear. Rome: 18 and rain."},
    {"role": "user", "content": "And the time?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("tIme00042", "now", "{}")]},
    {"role": "tool", "tool_call_id": "tIme00042", "name": "now", "content": "12:30"},
]


def _mistral_request(messages, tools):
    """The same conversation built directly with mistral_common's types."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            out.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m.get("name")))
        else:
            calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"],
                                                                arguments=c["function"]["arguments"]))
                     for c in m.get("tool_calls") or []] or None
            out.append(AssistantMessage(content=m["content"], tool_calls=calls))
    tl = [Tool(function=Function(name=t["function"]["name"], parameters=t["function"]["parameters"],
                                 **({"description": t["function"]["description"]}
                                    if "description" in t["function"] else {}))) for t in tools]
    return ChatCompletionRequest(messages=out, tools=tl)


@pytest.mark.parametrize("upto", [2, 5, 7, 9], ids=["first-turn", "after-results", "second-user", "last-result"])
def test_a_conversation_with_tools_is_tokenised_as_mistral_common_does(model, upto):
    args, tok = model
    msgs = CONVERSATION[:upto]
    ours = encode_request(msgs, tok, args, tools=TOOLS).tokens
    theirs = tok.encode_chat_completion(_mistral_request(msgs, TOOLS)).tokens
    assert ours == theirs
    ids = tok.instruct_tokenizer
    assert ids.BEGIN_AVAILABLE_TOOLS in ours                    # the tools are in the prompt
    if upto > 2:
        assert ids.TOOL_CALLS in ours and ids.BEGIN_TOOL_RESULTS in ours


def test_v7_text_before_calls_in_one_assistant_turn(v7_model):
    args, tok = v7_model
    msgs = [CONVERSATION[1], {**CONVERSATION[2], "content": "Checking both cities."}, *CONVERSATION[3:5]]
    assert encode_request(msgs, tok, args, tools=TOOLS).tokens == \
        tok.encode_chat_completion(_mistral_request(msgs, TOOLS)).tokens


def _img_tokens(args):
    unit = args.vision.patch_size * args.vision.spatial_merge_size
    return image_tokens(args, -(-40 // unit), -(-72 // unit))


def test_v7_tool_result_with_an_image_has_the_pinned_layout(v7_model):
    """[TOOL_RESULTS] <id> [TOOL_CONTENT] <text> <image tokens> [/TOOL_RESULTS]: mistral_common's tokens of
    the same conversation with the text alone, the image's tokens inserted before [/TOOL_RESULTS]."""
    args, tok = v7_model
    head = CONVERSATION[1:3]
    text = "Here is the chart:"
    with_image = head + [{"role": "tool", "tool_call_id": "abcDEF123", "content": [
        {"type": "text", "text": text}, {"type": "image", "image": IMG}]}, CONVERSATION[4]]
    text_only = head + [{"role": "tool", "tool_call_id": "abcDEF123", "content": text}, CONVERSATION[4]]
    req = encode_request(with_image, tok, args, tools=TOOLS)
    theirs = tok.encode_chat_completion(_mistral_request(text_only, TOOLS)).tokens
    end = theirs.index(tok.instruct_tokenizer.END_TOOL_RESULTS)
    assert req.tokens == theirs[:end] + _img_tokens(args) + theirs[end:]
    assert req.n_images == 1 and req.image_names == ["messages[2].content[1]"]
    assert req.image_token_positions == [i for i, t in enumerate(req.tokens) if t == args.vision.image_token_id]
    # the image alone (no text): [TOOL_RESULTS] <id> [TOOL_CONTENT] <image tokens> [/TOOL_RESULTS]
    alone = encode_request(head + [{"role": "tool", "tool_call_id": "abcDEF123", "content": [
        {"type": "image", "image": IMG}]}, CONVERSATION[4]], tok, args, tools=TOOLS).tokens
    ids = tok.instruct_tokenizer
    start = alone.index(ids.BEGIN_TOOL_RESULTS)
    cid = ids.tokenizer.encode("abcDEF123", bos=False, eos=False)
    assert alone[start:start + len(cid) + 2 + len(_img_tokens(args)) + 1] == \
        [ids.BEGIN_TOOL_RESULTS, *cid, ids.BEGIN_TOOL_CONTENT, *_img_tokens(args), ids.END_TOOL_RESULTS]


def test_v7_assistant_turn_with_an_image_has_the_pinned_layout(v7_model):
    """<text> <image tokens> </s>: mistral_common's tokens of the text-only turn, the image before its EOS."""
    args, tok = v7_model
    text = "I drew this for you:"
    with_image = [{"role": "user", "content": "Draw a cat."},
                  {"role": "assistant", "content": [{"type": "text", "text": text}, {"type": "image", "image": IMG}]},
                  {"role": "user", "content": "Nice."}]
    text_only = [with_image[0], {"role": "assistant", "content": text}, with_image[2]]
    ours = encode_request(with_image, tok, args).tokens
    theirs = tok.encode_chat_completion(_mistral_request(text_only, [])).tokens
    eos = theirs.index(tok.instruct_tokenizer.tokenizer.eos_id)
    assert ours == theirs[:eos] + _img_tokens(args) + theirs[eos:]


def test_v3_refuses_images_outside_user_messages_saying_why():
    tok = load_tokenizer(None, PIXTRAL_12B)
    for msgs, where in [
        (CONVERSATION[1:3] + [{"role": "tool", "tool_call_id": "abcDEF123", "content": [
            {"type": "text", "text": "chart:"}, {"type": "image", "image": IMG}]}], "messages[2].content[1]"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "image", "image": IMG}]},
          {"role": "user", "content": "?"}], "messages[1].content[0]"),
    ]:
        with pytest.raises(MessageFormatError) as e:
            encode_request(msgs, tok, PIXTRAL_12B, tools=TOOLS)
        msg = str(e.value)
        assert msg.startswith(where) and "v7" in msg and "v3" in msg and "user message" in msg


def test_a_system_message_never_carries_an_image():
    tok = load_tokenizer(None, PIXTRAL_12B)
    with pytest.raises(MessageFormatError, match=r"messages\[0\].content\[0\]: a system message cannot carry"):
        encode_request([{"role": "system", "content": [{"type": "image", "image": IMG}]},
                        {"role": "user", "content": "hi"}], tok, PIXTRAL_12B)
