"""The tool-parser interface: one `scan` of the text so far, shared by the whole-text parse and the streaming
parser, so that a streamed answer always adds up to the non-streamed one.

A parser's `scan(text, final)` returns the content and the calls found in `text`. With final=False the text may
stop anywhere (mid marker, mid JSON): the scan then holds back what it cannot be sure of yet, so that every
partial result is a *prefix* of the final one (content and each call's arguments). `ToolCallStreamer` sends
only the growth between two scans: id and name once, then `arguments` piece by piece.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class PartialCall:
    name: str | None  # None until the whole name has been written
    arguments: str = ""  # JSON text; while streaming, a prefix of the final arguments
    id: str | None = None  # a format that writes its own ids (Kimi K2) sets it


@dataclass
class Scan:
    content: str
    calls: list[PartialCall] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def finish_content(content: str, has_calls: bool, final: bool) -> str:
    """Trailing whitespace is held back while streaming (it may only separate calls); once there are calls, the
    whitespace around them is dropped."""
    if not final or has_calls:
        return content.rstrip()
    return content


class ToolParser:
    """One instance per request (it keeps that request's tools and streaming state)."""

    name = ""
    # Formats whose markers are special tokens: the request must be detokenized with them kept.
    needs_special_tokens = False

    def __init__(self, tools: list[dict] | None = None):
        self.tools = tools or []

    def scan(self, text: str, final: bool) -> Scan:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """The whole answer -> (content or None, OpenAI tool_calls)."""
        s = self.scan(text, final=True)
        calls = [c for c in s.calls if c.name is not None]
        out = [{"id": c.id or new_call_id(), "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        content = s.content if (s.content or not out) else None
        return content, out

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self)

    # -- helpers for formats whose arguments are typed by the tool's schema --
    def param_type(self, function: str, param: str) -> str | None:
        for t in self.tools:
            fn = t.get("function") or {}
            if fn.get("name") == function:
                prop = ((fn.get("parameters") or {}).get("properties") or {}).get(param) or {}
                typ = prop.get("type")
                return typ if isinstance(typ, str) else None
        return None


class ToolCallStreamer:
    """Text deltas in, (content delta, tool_call deltas) out; state belongs to one request."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent_content = ""
        self.ids: list[str] = []
        self.sent_args: list[str] = []

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        return self._diff(self.parser.scan(self.text, final=False))

    def finish(self) -> tuple[str, list[dict]]:
        return self._diff(self.parser.scan(self.text, final=True))

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def _diff(self, s: Scan) -> tuple[str, list[dict]]:
        content = ""
        if len(s.content) > len(self.sent_content) and s.content.startswith(self.sent_content):
            content = s.content[len(self.sent_content):]
            self.sent_content = s.content
        deltas = []
        for i, call in enumerate(c for c in s.calls if c.name is not None):
            delta: dict = {"index": i}
            if i == len(self.ids):  # a new call: its id and whole name, then the arguments so far
                self.ids.append(call.id or new_call_id())
                self.sent_args.append("")
                delta.update(id=self.ids[i], type="function", function={"name": call.name, "arguments": ""})
            sent = self.sent_args[i]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                delta.setdefault("function", {})["arguments"] = call.arguments[len(sent):]
                self.sent_args[i] = call.arguments
            if len(delta) > 1:
                deltas.append(delta)
        return content, deltas
