"""Request fields the server does not honour (openai_protocol.NOT_HONOURED): each is refused with 400 naming
it unless its value changes nothing; fields no table knows are refused as unrecognized; the table and the
protocol models never both claim a field. Pure parsing, no server."""
from __future__ import annotations

import pytest

from pixtral_rt.server.protocol import (ANY, NOT_HONOURED, ChatCompletionRequest, ChatMessage, ContentPart, ImageURL,
                                        OpenAIError, StreamOptions, parse_chat_request)

MESSAGES = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# one value per table entry that would change the answer (ANY entries have none)
REFUSED = {
    "functions": [TOOL["function"]], "function_call": {"name": "f"},
    "modalities": ["text", "audio"], "service_tier": "flex",
    "prediction": {"type": "content", "content": "x"}, "audio": {"voice": "alloy", "format": "wav"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {}, "min_p": 0.1,
    "ignore_eos": True, "best_of": 2, "use_beam_search": True,
    "length_penalty": 0.5, "include_stop_str_in_output": True, "echo": True,
    "add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": {"x": 1},
    "priority": 1, "prompt_logprobs": 1, "chat_template": "{{ x }}", "guided_json": {}, "guided_regex": "a+",
    "guided_choice": ["a"], "guided_grammar": "root ::= x", "structured_outputs": {}, "truncate_prompt_tokens": 5,
    "logits_processors": ["x"],
    "messages[].refusal": "I can't", "messages[].annotations": [{"type": "url_citation"}],
    "messages[].audio": {"id": "a"}, "messages[].function_call": {"name": "f", "arguments": "{}"},
    "stream_options.continuous_usage_stats": True,
}


def _request(path: str, value) -> tuple[dict, str]:
    """A request with `value` at table key `path`, and the param an error about it must name."""
    if path.startswith("messages[]."):
        name = path.removeprefix("messages[].")
        # an assistant message of the history, where OpenAI's own responses carry these fields
        return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", name: value},
                             {"role": "user", "content": "again"}]}, f"messages[1].{name}"
    if path.startswith("stream_options."):
        name = path.removeprefix("stream_options.")
        return {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True, name: value}}, path
    return {"messages": MESSAGES, path: value}, path


def _refused(body: dict) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        parse_chat_request(body)
    return e.value


@pytest.mark.parametrize("path", sorted(REFUSED))
def test_a_value_that_would_change_the_answer_is_refused_naming_the_field(path):
    body, param = _request(path, REFUSED[path])
    err = _refused(body)
    assert (err.status, err.param, err.code) == (400, param, "unsupported_parameter"), err.message
    assert err.message.startswith(f"{param}: not supported by this server") and "leave it out" in err.message


@pytest.mark.parametrize("path", sorted(p for p, a in NOT_HONOURED.items() if a != ANY))
def test_values_that_change_nothing_are_accepted_and_others_not(path):
    for value in (*NOT_HONOURED[path], None):  # null is "not set", accepted for every field
        parse_chat_request(_request(path, value)[0])
    assert _refused(_request(path, REFUSED[path])[0]).code == "unsupported_parameter"


def test_what_issue_19_names_as_harmless_is_accepted():
    harmless = {"user": "u-1", "metadata": {"k": "v"}, "store": True, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                "parallel_tool_calls": True, "top_k": 40, "seed": 3, "n": 2}
    for key, value in harmless.items():
        parse_chat_request({"messages": MESSAGES, key: value})
    for key in ("logit_bias", "tools", "tool_choice", "response_format"):
        parse_chat_request({"messages": MESSAGES, key: None})
    req = parse_chat_request({"messages": MESSAGES, **harmless})
    assert req.top_k == 40 and req.n == 2   # the honoured ones are kept
    parse_chat_request({"messages": [{"role": "user", "content": "hi", "name": "ann"},
                                     {"role": "assistant", "content": "a", "refusal": None, "annotations": [],
                                      "audio": None, "function_call": None}],
                        "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}})
    for key in harmless.keys() & REFUSED.keys():  # ... and the same fields set to change the answer are not
        assert _refused({"messages": MESSAGES, key: REFUSED[key]}).param == key


def test_bookkeeping_passes_and_unknown_fields_are_refused_at_every_level():
    for key in (k for k, a in NOT_HONOURED.items() if a == ANY and "." not in k):
        parse_chat_request({"messages": MESSAGES, key: {"anything": [1, "x"]}})
    unknown = [
        ({"messages": MESSAGES, "frobnicate": 1}, "frobnicate"),
        ({"messages": MESSAGES, "skip_special_tokens": True}, "skip_special_tokens"),
        ({"messages": [{"role": "user", "content": "hi", "speaker": "x"}]}, "messages[0].speaker"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}]},
         "messages[0].content[0].cache_control"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://e.com/",
                                                                                           "zoom": 2}}]}]},
         "messages[0].content[0].image_url.zoom"),
        ({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True, "every": 2}},
         "stream_options.every"),
    ]
    for body, param in unknown:
        err = _refused(body)
        assert (err.status, err.param, err.code) == (400, param, "unknown_parameter"), err.message
        assert err.message == f"{param}: unrecognized request argument (this server does not know it): leave it out"


def test_the_table_and_the_models_never_both_claim_a_field():
    models = {"": ChatCompletionRequest, "messages[].": ChatMessage, "messages[].content[].": ContentPart,
              "messages[].content[].image_url.": ImageURL, "stream_options.": StreamOptions}
    assert {m._PATH for m in models.values()} == set(models)  # each model looks its extras up where listed here
    for path, accepted in NOT_HONOURED.items():
        prefix, _, name = path.rpartition(".")
        prefix = prefix + "." if prefix else ""
        assert prefix in models, f"{path}: no protocol model has the prefix {prefix!r}"
        assert name not in models[prefix].model_fields, f"{path} is a field of {models[prefix].__name__} and in " \
                                                        "NOT_HONOURED: honour it or list it, not both"
        assert accepted == ANY or isinstance(accepted, tuple), path
    assert set(REFUSED) == {p for p, a in NOT_HONOURED.items() if a != ANY}, "every refusable entry is tested"
