"""`<think>...</think>` into reasoning_content: whole and streamed at every boundary alike; thinking switched
off in the prompt keeps the answer (and its tool call) out of reasoning."""

from __future__ import annotations

import pytest

from moeserve.server.reasoning_parsers import REASONING_PARSERS, opens_thinking, reasoning_parser_class
from moeserve.server.tool_parsers import tool_parser_class

CASES = [  # (prompt ends with, text, reasoning, content)
    ("<|im_start|>assistant\n", "<think>\nLet me think.\n</think>\n\nParis.", "Let me think.", "Paris."),
    ("<｜Assistant｜><think>\n", "Hmm, France.\n</think>\n\nParis.", "Hmm, France.", "Paris."),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "Paris.", None, "Paris."),
    ("<|im_start|>assistant\n", "Paris.", None, "Paris."),
    ("<｜Assistant｜><think>\n", "Cut off while thin", "Cut off while thin", ""),
]


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
@pytest.mark.parametrize("prompt,text,reasoning,content", CASES)
def test_whole_and_streamed(name, prompt, text, reasoning, content):
    parser = reasoning_parser_class(name)(opens_thinking(prompt))
    assert parser.parse(text) == (reasoning, content)
    for cut in range(len(text) + 1):
        s = parser.streamer()
        parts = [s.feed(text[:cut]), s.feed(text[cut:]), s.finish()]
        assert "".join(r for r, _ in parts) == (reasoning or "") and "".join(c for _, c in parts) == content


def test_reasoning_does_not_swallow_a_tool_call():
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # enable_thinking: false
    reasoning, content = reasoning_parser_class("qwen3")(opens_thinking(prompt)).parse(text)
    assert reasoning is None
    assert tool_parser_class("hermes")().parse(content)[1][0]["function"]["name"] == "get_time"
    reasoning, content = reasoning_parser_class("qwen3")().parse("<think>ok</think>\n\n" + text)
    assert reasoning == "ok" and tool_parser_class("hermes")().parse(content)[1]


def test_unknown_name():
    with pytest.raises(ValueError, match="deepseek_r1"):
        reasoning_parser_class("nope")
