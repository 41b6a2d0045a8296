"""Streaming the tool parsers the way tokens come, for every parser (test_tool_parsers.py has the whole-text
cases and the two-piece splits): random multi-character chunks (seeded) and every single character add up to the
non-streamed parse, for a call with no arguments, several calls in one message and arguments over 8 KB; two
requests streamed interleaved keep apart; special tokens never reach content; a reasoning parser hands a tool
call written after </think> to the tool parser. The grammar-forced readers (required, named) too."""

from __future__ import annotations

import json
import random

import pytest
from test_tool_parsers import CASES, TOOLS, stream

from moeserve.server.chat_tools import AnswerParser, ToolPlan
from moeserve.server.tool_parsers import TOOL_PARSERS, tool_parser_class
from moeserve.server.tool_parsers.forced import forced_parser

LONG = "Paris, " * 1300  # > 8 KB of arguments
NO_ARGS = ("get_time", {})
WEATHER = ("get_weather", {"city": "Paris", "days": 3})
LONG_CALL = ("get_weather", {"city": LONG, "days": 3})


def _json(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False)


def _pyval(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def fmt(name: str, calls: list[tuple[str, dict]]) -> str:
    """The calls written the way the parser's model family writes them."""
    if name == "hermes":
        return "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {_json(a)}}}\n</tool_call>' for n, a in calls)
    if name == "qwen3_coder":
        return "\n".join("<tool_call>\n<function=" + n + ">\n" + "".join(
            f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in a.items()) + "</function>\n</tool_call>"
            for n, a in calls)
    if name in ("llama3_json", "llama4_json"):
        return "<|python_tag|>" + "; ".join(f'{{"name": "{n}", "parameters": {_json(a)}}}' for n, a in calls)
    if name == "pythonic":
        return "[" + ", ".join(f"{n}(" + ", ".join(f"{k}={_pyval(v)}" for k, v in a.items()) + ")"
                               for n, a in calls) + "]"
    if name == "deepseek_v3":
        return "<｜tool▁calls▁begin｜>" + "".join(
            f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{_json(a)}\n```<｜tool▁call▁end｜>"
            for n, a in calls) + "<｜tool▁calls▁end｜>"
    if name == "deepseek_v31":
        return "<｜tool▁calls▁begin｜>" + "".join(
            f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{_json(a)}<｜tool▁call▁end｜>" for n, a in calls) \
            + "<｜tool▁calls▁end｜>"
    if name == "kimi_k2":
        return "<|tool_calls_section_begin|>" + "".join(
            f"<|tool_call_begin|>functions.{n}:{i}<|tool_call_argument_begin|>{_json(a)}<|tool_call_end|>"
            for i, (n, a) in enumerate(calls)) + "<|tool_calls_section_end|>"
    if name in ("glm45", "glm47"):
        sep = "\n" if name == "glm45" else ""
        return "\n".join(f"<tool_call>{n}{sep or ''}" + "".join(
            f"<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>{sep}" for k, v in a.items()) + "</tool_call>"
            for n, a in calls)
    raise AssertionError(name)


def chunks(text: str, seed: int, most: int = 12) -> list[str]:
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        k = rng.randint(1, most)
        out.append(text[i:i + k])
        i += k
    return out


def expected(name: str, text: str):
    content, calls = tool_parser_class(name)(TOOLS).parse(text)
    return content or "", [([c["function"]["name"]], c["function"]["arguments"]) for c in calls]


def streamed(name: str, pieces: list[str]):
    content, calls = stream(tool_parser_class(name)(TOOLS), pieces)
    assert all(len(c["ids"]) == 1 for c in calls)
    return content, [(c["names"], c["arguments"]) for c in calls]


PARSERS = sorted(TOOL_PARSERS)


@pytest.mark.parametrize("name", PARSERS)
@pytest.mark.parametrize("calls", [[NO_ARGS], [WEATHER, NO_ARGS, WEATHER]], ids=["no-arguments", "several"])
def test_every_character_and_random_chunks(name, calls):
    text = "I will check.\n" + fmt(name, calls) if name not in ("pythonic", "llama3_json", "llama4_json") \
        else fmt(name, calls)
    want = expected(name, text)
    assert [(n[0], json.loads(a)) for n, a in want[1]] == calls, (name, text, want)
    assert streamed(name, list(text)) == want
    for seed in range(8):
        assert streamed(name, chunks(text, seed)) == want, seed


@pytest.mark.parametrize("name", PARSERS)
def test_arguments_over_8kb(name):
    text = fmt(name, [LONG_CALL, NO_ARGS])
    want = expected(name, text)
    assert json.loads(want[1][0][1]) == LONG_CALL[1] and len(want[1][0][1]) > 8192
    for seed in range(3):
        assert streamed(name, chunks(text, seed, most=40)) == want, seed


@pytest.mark.parametrize("name", PARSERS)
def test_two_requests_interleaved_keep_apart(name):
    texts = [fmt(name, [WEATHER]), "Plain words, no call at all, " * 3]
    wants = [expected(name, t) for t in texts]
    streamers = [tool_parser_class(name)(TOOLS).streamer() for _ in texts]
    got = [["", []], ["", []]]
    parts = [chunks(t, seed=i, most=5) for i, t in enumerate(texts)]
    for step in range(max(map(len, parts)) + 1):
        for i, s in enumerate(streamers):
            if step < len(parts[i]):
                c, d = s.feed(parts[i][step])
            elif step == len(parts[i]):
                c, d = s.finish()
            else:
                continue
            got[i][0] += c
            got[i][1] += d
    for (content, deltas), (want_content, want_calls) in zip(got, wants):
        assert content == want_content
        args: dict[int, list] = {}
        for d in deltas:
            entry = args.setdefault(d["index"], [[], ""])
            if "id" in d:
                entry[0].append(d["function"]["name"])
            entry[1] += d["function"].get("arguments", "")
        assert [tuple(args[i]) for i in sorted(args)] == [tuple(w) for w in want_calls]


@pytest.mark.parametrize("name", [n for n in PARSERS if TOOL_PARSERS[n].needs_special_tokens])
def test_special_tokens_never_reach_streamed_content(name):
    text = "Checking.\n" + fmt(name, [WEATHER, NO_ARGS]) + "\n"
    for pieces in (list(text), chunks(text, 1)):
        content, _ = streamed(name, pieces)
        assert "<|" not in content and "<｜" not in content and "▁" not in content, content


# reasoning parser name, tool parser name, how thinking is written
PAIRS = [("qwen3", "hermes"), ("deepseek_r1", "deepseek_v3"), ("glm45", "glm45"), ("kimi_k2", "kimi_k2")]


@pytest.mark.parametrize("reasoning,tools", PAIRS)
def test_reasoning_then_a_tool_call_streamed(reasoning, tools):
    text = "<think>I should look it up.</think>\n\n" + fmt(tools, [WEATHER])
    plan = ToolPlan(TOOLS, tool_parser_class(tools))
    whole = AnswerParser(plan, reasoning, "<|im_start|>assistant\n").message(text)
    assert whole["reasoning_content"] == "I should look it up."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]] == [WEATHER]
    for pieces in [list(text)] + [chunks(text, s) for s in range(4)]:
        a = AnswerParser(plan, reasoning, "<|im_start|>assistant\n")
        out: dict = {}
        for p in pieces + [None]:
            d = a.delta("", final=True) if p is None else a.delta(p)
            for k, v in d.items():
                out[k] = out.get(k, type(v)()) + v
        assert out.get("reasoning_content") == "I should look it up."
        assert not out.get("content", "").strip()
        assert [c["function"]["name"] for c in out["tool_calls"] if "id" in c] == ["get_weather"]
        assert "".join(c["function"].get("arguments", "") for c in out["tool_calls"]) == \
            whole["tool_calls"][0]["function"]["arguments"]


# -- the grammar-forced readers --

FORCED = [
    (None, '[{"name": "get_weather", "parameters": {"city": "Pa\\"r]is}", "days": 3}}, '
           '{"name": "get_time", "parameters": {}}]', [("get_weather", {"city": 'Pa"r]is}', "days": 3}),
                                                      ("get_time", {})]),
    ("get_weather", '{"city": "Paris", "days": 3}', [WEATHER]),
    ("get_time", "{}", [NO_ARGS]),
]


@pytest.mark.parametrize("function,text,calls", FORCED, ids=["required", "named", "named-no-arguments"])
def test_forced_readers_stream_like_the_whole(function, text, calls):
    parser = forced_parser(function)
    content, whole = parser(TOOLS).parse(text)
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole] == calls
    want = [([c["function"]["name"]], c["function"]["arguments"]) for c in whole]
    for pieces in [list(text)] + [chunks(text, s) for s in range(8)]:
        got_content, got = stream(parser(TOOLS), pieces)
        assert got_content == "" and [(c["names"], c["arguments"]) for c in got] == want
