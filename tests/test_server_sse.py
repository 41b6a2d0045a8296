"""The streaming endpoints' events: the per-token path (one choice, text only, joined from strings) writes byte for
byte what encoding the chunk dict writes, for chat and completions, and leaves the other paths alone."""

from __future__ import annotations

import asyncio
import json

import pytest

from moeserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from moeserve.server import chat, completions
from moeserve.server.sse import DONE, ChunkTemplate, sse

TEXTS = ["", "He", "Hell", 'Hell"o\\', 'Hell"o\\ wörld\n😀\u2028', 'Hell"o\\ wörld\n😀\u2028</s>']


class FakeStream:
    """RequestStream's surface for merged(): cumulative outputs, then the end."""

    def __init__(self, outs):
        self.outs = outs
        self.closed = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for o in self.outs:
            yield o

    def close(self):
        self.closed = True


def outputs(texts=TEXTS, n=1, rid="r"):
    outs = []
    for k, text in enumerate(texts):
        last = k == len(texts) - 1
        choices = [CompletionOutput(i, text, list(range(k + 1)), finish_reason="length" if last else None)
                   for i in range(n)]
        outs.append(RequestOutput(rid, None, [1, 2], choices, last, RequestMetrics(0.0)))
    return outs


def events(gen) -> list[str]:
    async def run():
        return [e async for e in gen]
    return asyncio.run(run())


def canonical(event: str) -> str:
    """What sse() writes for this event's JSON: the dict path's bytes."""
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = event[len("data: "):-2]
    return event if body == "[DONE]" else sse(json.loads(body))


@pytest.mark.parametrize("text", ["", " hello", 'q"uote\\back', "é\n\t😀\u2028\u2029\x00", "</s>"])
def test_template_text_is_the_dict_encoding(text):
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": 'ti"ny'}
    t = ChunkTemplate(head, ("delta", "content"))
    assert t.text(2, text) == sse({**head, "choices": [
        {"index": 2, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]})
    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "tiny"}
    t = ChunkTemplate(head, ("text",))
    assert t.text(0, text) == sse({**head, "choices": [
        {"index": 0, "text": text, "logprobs": None, "finish_reason": None}]})
    assert t.chunk([], usage={"prompt_tokens": 1}) == sse({**head, "choices": [], "usage": {"prompt_tokens": 1}})


def test_chat_stream_events():
    stream = FakeStream(outputs())
    evs = events(chat._stream(None, [stream], "chatcmpl-1", "tiny", 5, 1, None, True))
    assert stream.closed
    assert evs[-1] == DONE and all(e == canonical(e) for e in evs)
    bodies = [json.loads(e[6:]) for e in evs[:-1]]
    assert all(b["id"] == "chatcmpl-1" and b["object"] == "chat.completion.chunk" and b["created"] == 5
               and b["model"] == "tiny" for b in bodies)
    assert [b["choices"] for b in bodies] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        *[[{"index": 0, "delta": {"content": d}, "logprobs": None, "finish_reason": None}]
          for d in ["He", "ll", '"o\\', ' wörld\n😀\u2028']],
        [{"index": 0, "delta": {"content": "</s>"}, "logprobs": None, "finish_reason": "length",
          "stop_reason": None}],
        [],
    ]
    assert bodies[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


def test_completion_stream_events_of_two_prompts():
    a, b = FakeStream(outputs(rid="c-0")), FakeStream(outputs(["x", "xy"], rid="c-1"))
    evs = events(completions._stream(None, [a, b], "cmpl-1", "tiny", 5, 1, None, False))
    assert evs[-1] == DONE and all(e == canonical(e) for e in evs)
    choices = [json.loads(e[6:])["choices"] for e in evs[:-1]]
    assert all(len(c) == 1 for c in choices)
    texts = {0: "", 1: ""}
    for (c,) in choices:
        texts[c["index"]] += c["text"]
        assert c["logprobs"] is None
        assert ("stop_reason" in c) == (c["finish_reason"] is not None)
    assert texts == {0: TEXTS[-1], 1: "xy"}
    assert [c[0]["finish_reason"] for c in choices].count("length") == 2


def test_several_choices_still_share_an_event():
    evs = events(chat._stream(None, [FakeStream(outputs(["a", "ab"], n=2))], "chatcmpl-1", "tiny", 5, 2, None,
                              False))
    assert all(e == canonical(e) for e in evs)
    choices = [json.loads(e[6:])["choices"] for e in evs[:-1]]
    assert [[c["index"] for c in cs] for cs in choices] == [[0, 1], [0, 1], [0, 1]]
    assert [c["delta"] for c in choices[1]] == [{"content": "a"}, {"content": "a"}]
