"""Formats that wrap each call in a start and an end marker (hermes, qwen3_coder, deepseek, kimi_k2, glm45):
the text between calls is content, section markers around the calls are dropped, and each call's body is read
by the format's `body`."""

from __future__ import annotations

import json
import re

from moeserve.server.tool_parsers.base import PartialCall, Scan, ToolParser, finish_content, held_back


class TaggedToolParser(ToolParser):
    call_start = ""
    call_end = ""
    drop: tuple[str, ...] = ()  # section markers: never content

    def body(self, body: str, final: bool) -> PartialCall | None:
        """A call's body (between the markers) -> the call; None if it is not a call after all (final only)."""
        raise NotImplementedError

    def scan(self, text: str, final: bool) -> Scan:
        content, calls, pos = [], [], 0
        while True:
            start = text.find(self.call_start, pos)
            if start < 0:
                tail = text[pos:]
                if not final:
                    tail = tail[:len(tail) - held_back(tail, (self.call_start, *self.drop))]
                content.append(tail)
                break
            content.append(text[pos:start])
            begin = start + len(self.call_start)
            end = text.find(self.call_end, begin)
            closed = end >= 0
            body = text[begin:end] if closed else text[begin:]
            if not closed and not final:
                body = body[:len(body) - held_back(body, (self.call_end,))]
            call = self.body(body, final=closed or final)
            if call is None:  # not a call: its text stays content
                content.append(text[start:end + len(self.call_end)] if closed else text[start:])
            else:
                calls.append(call)
            if not closed:
                break
            pos = end + len(self.call_end)
        joined = "".join(content)
        for m in self.drop:
            joined = joined.replace(m, "")
        return Scan(finish_content(joined, bool(calls), final), calls)


def partial_json_value(raw: str, final: bool) -> str:
    """A JSON value written in the text, as it stands: closing braces and whitespace at its end are held back
    while streaming (they may belong to what encloses it)."""
    return raw.strip() if final else raw.strip().rstrip("} \t\r\n")


def json_object_end(raw: str) -> int | None:
    """Where the JSON value at the start of `raw` (after whitespace) ends, or None if it does not parse yet."""
    stripped = raw.lstrip()
    try:
        _, end = json.JSONDecoder().raw_decode(stripped)
    except ValueError:
        return None
    return len(raw) - len(stripped) + end


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def json_call(body: str, final: bool) -> PartialCall | None:
    """`{"name": "f", "arguments": {...}}` (hermes, llama3_json; "parameters" as Llama 3.1 writes it). The
    arguments are passed on as the model wrote them, so that streamed pieces add up to the final text."""
    name_m = _NAME.search(body)
    args_m = _ARGS.search(body)
    if args_m and name_m and args_m.start() < name_m.start():
        name_m = None  # a "name" inside the arguments; the real name comes after them
    if final:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args_obj = obj.get("arguments", obj.get("parameters", {}))
        raw = None
        if args_m:
            end = json_object_end(body[args_m.end():])
            raw = body[args_m.end():args_m.end() + end].strip() if end is not None else None
        if raw is None or json.loads(raw) != args_obj:
            raw = json.dumps(args_obj, ensure_ascii=False)
        return PartialCall(obj["name"], raw)
    if name_m is None:
        return PartialCall(None)
    name = json.loads(f'"{name_m.group(1)}"')
    if not args_m:
        return PartialCall(name)
    rest = body[args_m.end():]
    end = json_object_end(rest)
    return PartialCall(name, rest[:end].strip() if end is not None else partial_json_value(rest, False))


def typed_value(parser: ToolParser, function: str, param: str, value: str) -> str:
    """A parameter written as text (qwen3_coder, glm45) -> its JSON, typed by the tool's schema: strings stay
    strings, anything else is read as JSON where it parses."""
    typ = parser.param_type(function, param)
    if typ not in (None, "string"):
        try:
            return json.dumps(json.loads(value), ensure_ascii=False)
        except ValueError:
            pass
    return json.dumps(value, ensure_ascii=False)


def open_string(parser: ToolParser, function: str, param: str) -> bool:
    """Whether a parameter is streamed as a growing JSON string (else it is sent whole when it closes)."""
    return parser.param_type(function, param) in (None, "string")


def build_object(done: list[tuple[str, str]], open_part: str | None, final: bool) -> str:
    """`{"a": 1, "b": "x"}` from finished (key, JSON) pairs and the part being written (while streaming)."""
    parts = [f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in done]
    if open_part is not None:
        parts.append(open_part)
    text = "{" + ", ".join(parts)
    return text + "}" if final else text
