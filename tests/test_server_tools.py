"""Tools through the real `moeserve serve` (tiny random Llama, ChatML template that renders tools and tool
results) with the openai SDK: requests with tools are accepted, a tool result in the history renders, bad tool
input is a 400 naming the field. The random model writes no real calls: parsing is tested in
test_tool_parsers.py."""

from __future__ import annotations

import httpx
import openai
import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve.server.process import ServerProcess

TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments.city }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("tools"), "LlamaForCausalLM")
    args = [ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-model-len", "512", "--chat-template",
            TEMPLATE, "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]
    with ServerProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


def test_request_with_tools_is_accepted(client):
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}, "none"):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice,
                                           max_tokens=8, temperature=0)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert msg.content is not None or msg.tool_calls


def test_streaming_with_tools(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_history_with_a_tool_result_renders(client):
    messages = USER + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4,
                                       temperature=0, logprobs=True)
    assert r.usage.prompt_tokens > 20


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"chat_template_kwargs": {"tools": TOOLS}}, "chat_template_kwargs.tools"),
])
def test_bad_tool_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.base_url + "/chat/completions", json={"messages": USER, "max_tokens": 2, **body},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auto_needs_the_flag(tmp_path):
    from moeserve.server.chat_tools import plan_tools
    from moeserve.server.errors import APIError
    from moeserve.server.protocol import ChatCompletionRequest
    from moeserve.server.serving import ServerSettings

    req = ChatCompletionRequest(messages=USER, tools=TOOLS)
    with pytest.raises(APIError, match="enable-auto-tool-choice"):
        plan_tools(req, ServerSettings(model_names=["m"], max_model_len=8, tool_call_parser="hermes"))


def test_unknown_parser_fails_at_startup():
    from moeserve.server.launch import check_agent_flags

    with pytest.raises(ValueError, match="tool-call-parser"):
        check_agent_flags(True, "nope", None)
    with pytest.raises(ValueError, match="reasoning-parser"):
        check_agent_flags(False, None, "nope")
