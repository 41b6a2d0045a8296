"""tool_choice "required" and a named function plan a grammar (server/tool_parsers/forced.py), with or without
--enable-auto-tool-choice / --tool-call-parser; the schemas the grammar gets; the 400s of their bad input."""

from __future__ import annotations

import pytest

from moeserve.server.chat_tools import plan_tools
from moeserve.server.errors import APIError
from moeserve.server.protocol import ChatCompletionRequest
from moeserve.server.serving import ServerSettings
from moeserve.server.tool_parsers.forced import NamedFunctionParser, RequiredParser, forced_schema

P = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": P}},
         {"type": "function", "function": {"name": "ping"}}]
USER = [{"role": "user", "content": "hi"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
FLAGS = [ServerSettings(["m"], 64), ServerSettings(["m"], 64, enable_auto_tool_choice=True, tool_call_parser="hermes")]


@pytest.mark.parametrize("settings", FLAGS, ids=["no-flags", "auto-hermes"])
def test_required_and_named_are_forced_with_or_without_the_flags(settings):
    plan = plan_tools(ChatCompletionRequest(messages=USER, tools=TOOLS, tool_choice="required"), settings)
    assert issubclass(plan.parser, RequiredParser) and plan.forced_schema["minItems"] == 1
    plan = plan_tools(ChatCompletionRequest(messages=USER, tools=TOOLS, tool_choice=NAMED), settings)
    assert issubclass(plan.parser, NamedFunctionParser) and plan.parser.function == "get_weather"
    assert plan.forced_schema == P


def test_schemas():
    s = forced_schema(TOOLS, None, parallel=False)
    assert s["maxItems"] == 1 and [i["properties"]["name"]["enum"] for i in s["items"]["anyOf"]] == \
        [["get_weather"], ["ping"]]
    assert s["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert "maxItems" not in forced_schema(TOOLS, None) and forced_schema(TOOLS[1:], None)["items"]["required"]
    assert forced_schema(TOOLS, "ping") == {"type": "object", "properties": {}}


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": NAMED, "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense-type"}}}}}]}, "tools.0.function.parameters"),
    ({"tool_choice": "required", "tools": TOOLS + TOOLS[1:]}, "tools.2.function.name"),
])
def test_bad_forced_input(extra, param):
    req = ChatCompletionRequest(messages=USER, **{"tools": TOOLS, **extra})
    with pytest.raises(APIError) as e:
        plan_tools(req, FLAGS[0])
    assert e.value.status == 400 and e.value.param == param


def test_unknown_parser_name_stops_serve_with_a_clear_error():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "moeserve.cli", "serve", "--device", "cpu", "--tool-call-parser",
                        "nope", "--port", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--tool-call-parser 'nope' is not known" in r.stderr and "hermes" in r.stderr
