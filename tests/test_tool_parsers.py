"""Each tool parser on its family's own format: the whole-text parse, and the same text streamed split at every
character boundary adds up to it (content, names, ids once, arguments)."""

from __future__ import annotations

import json

import pytest

from moeserve.server.tool_parsers import TOOL_PARSERS, tool_parser_class

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]

W = ("get_weather", {"city": "Paris", "days": 3})
T = ("get_time", {})
DS = "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>"
DSC = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"
DS31 = "<｜tool▁call▁begin｜>{}<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
KIMI = "<|tool_call_begin|>functions.{}:{}<|tool_call_argument_begin|>{}<|tool_call_end|>"
CASES = [  # (parser, model text, expected content, expected calls)
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me check.", [W, T]),
    ("hermes", "Just text, no calls.\n", "Just text, no calls.\n", []),
    ("hermes", '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [T]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
                    "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n"
                    "</tool_call>", None, [W, T]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
                    '{"name": "get_time", "parameters": {}}', None, [W, T]),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("pythonic", '[get_weather(city="Paris", days=3), get_time()]', None, [W, T]),
    ("pythonic", "[1, 2] is a list.", "[1, 2] is a list.", []),
    ("deepseek_v3", "Sure." + DS.format(DSC.format("get_weather", '{"city": "Paris", "days": 3}')
                                         + DSC.format("get_time", "{}")), "Sure.", [W, T]),
    ("deepseek_v31", DS.format(DS31.format("get_weather", '{"city": "Paris", "days": 3}')
                               + DS31.format("get_time", "{}")), None, [W, T]),
    ("kimi_k2", "<|tool_calls_section_begin|>" + KIMI.format("get_weather", 0, '{"city": "Paris", "days": 3}')
     + KIMI.format("get_time", 1, "{}") + "<|tool_calls_section_end|>", None, [W, T]),
    ("glm45", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days"
              "</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n<tool_call>get_time\n</tool_call>", None, [W, T]),
    ("glm47", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>"
              "<arg_value>3</arg_value></tool_call>", None, [W]),
]


def stream(parser, pieces):
    s = parser.streamer()
    content, calls = "", {}
    for piece in [*pieces, None]:
        c, deltas = s.finish() if piece is None else s.feed(piece)
        content += c
        for d in deltas:
            call = calls.setdefault(d["index"], {"ids": [], "names": [], "arguments": ""})
            if "id" in d:
                call["ids"].append(d["id"])
                call["names"].append(d["function"]["name"])
            call["arguments"] += d["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def check(name, text, content, expected):
    got_content, calls = tool_parser_class(name)(TOOLS).parse(text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
    assert all(c["id"] for c in calls)
    return got_content, calls


@pytest.mark.parametrize("name,text,content,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_whole_and_streamed_at_every_boundary(name, text, content, expected):
    whole_content, whole = check(name, text, content, expected)
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text) if cut == 0 else []):
            if not pieces:
                continue
            got, calls = stream(tool_parser_class(name)(TOOLS), pieces)
            assert got == (whole_content or ""), (cut, got)
            assert [(c["names"], c["arguments"]) for c in calls] == \
                [([w["function"]["name"]], w["function"]["arguments"]) for w in whole], cut
            assert all(len(c["ids"]) == 1 for c in calls)


def test_no_argument_call_streams_its_arguments():
    _, calls = stream(tool_parser_class("hermes")(TOOLS), list('<tool_call>\n{"name": "get_time"}\n</tool_call>'))
    assert calls[0]["arguments"] == "{}"


def test_arguments_longer_than_8kb():
    long = "x" * 9000
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{long}"}}}}\n</tool_call>'
    check("hermes", text, None, [("get_weather", {"city": long})])
    _, calls = stream(tool_parser_class("hermes")(TOOLS), [text[i:i + 7] for i in range(0, len(text), 7)])
    assert json.loads(calls[0]["arguments"]) == {"city": long}


def test_state_is_not_shared_between_requests():
    a, b = tool_parser_class("hermes")(TOOLS).streamer(), tool_parser_class("hermes")(TOOLS).streamer()
    a.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    content, deltas = b.feed("Hello there")
    assert content == "Hello there" and deltas == []
    assert b.finish() == ("", [])


def test_special_tokens_never_reach_content():
    for name, text, *_ in CASES:
        if TOOL_PARSERS[name].needs_special_tokens:
            content, _ = tool_parser_class(name)(TOOLS).parse(text)
            assert "<｜" not in (content or "") and "<|" not in (content or "")


def test_unknown_parser_name():
    with pytest.raises(ValueError, match="hermes"):
        tool_parser_class("nope")
