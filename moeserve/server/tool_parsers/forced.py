"""Tool calls the grammar forces (tool_choice "required" or a named function), so no model format is involved:

    named function: the model writes the function's arguments object, {"city": "Paris"}; the call is that
                    object under the named function.
    required:       the model writes [{"name": "get_weather", "parameters": {...}}, ...] (one or more items, each
                    an anyOf over the tools); each item is one call.

`forced_schema` is the JSON schema the grammar gets; `forced_parser` the parser that reads the answer, whole or
streamed (name first, then arguments piece by piece), through the same scan/streamer interface as the others.
"""

from __future__ import annotations

import json

from moeserve.server.tool_parsers.base import PartialCall, Scan, ToolParser

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def parameters_of(tool: dict) -> dict:
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


def forced_schema(tools: list[dict], name: str | None, parallel: bool = True) -> dict:
    """The schema for a named function's arguments (name given) or for the required array (name None)."""
    if name is not None:
        return next(parameters_of(t) for t in tools if t["function"]["name"] == name)
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": parameters_of(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class NamedFunctionParser(ToolParser):
    """The whole answer is the arguments of `function` (set per request by forced_parser)."""

    function = ""

    def scan(self, text: str, final: bool) -> Scan:
        return Scan("", [PartialCall(self.function, text)])


class RequiredParser(ToolParser):
    """The answer is a JSON array of {"name", "parameters"} objects; read with a small scanner that knows where
    each value starts and ends, so a prefix of the answer gives a prefix of each call's arguments."""

    def scan(self, text: str, final: bool) -> Scan:
        calls: list[PartialCall] = []
        i = _ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return Scan("", calls)
        i += 1
        while True:
            i = _ws(text, i)
            if i >= len(text) or text[i] == "]":
                break
            if text[i] == ",":
                i += 1
                continue
            if text[i] != "{":
                break
            call, i, done = _object(text, i + 1)
            if call is not None:
                calls.append(call)
            if not done:
                break
        return Scan("", calls)


def _ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _string_end(text: str, i: int) -> int:
    """text[i] is the opening quote; the index after the closing quote, or -1 if the string is not complete."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return -1


def _value_end(text: str, i: int) -> int:
    """The index after the JSON value starting at text[i], or -1 if the text stops inside it."""
    if i >= len(text):
        return -1
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                i = _string_end(text, i)
                if i < 0:
                    return -1
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    j = i  # number, true, false, null: ends at a delimiter
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else -1


def _object(text: str, i: int) -> tuple[PartialCall | None, int, bool]:
    """One {"name": ..., "parameters": ...} item from after its "{": (the call so far, where the scan stopped,
    whether the item is complete)."""
    name: str | None = None
    arguments: str | None = None
    while True:
        i = _ws(text, i)
        if i >= len(text):
            break
        if text[i] == "}":
            return _call(name, arguments), i + 1, True
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            break
        end = _string_end(text, i)
        if end < 0:
            break
        key = json.loads(text[i:end])
        i = _ws(text, end)
        if i >= len(text) or text[i] != ":":
            break
        i = _ws(text, i + 1)
        end = _value_end(text, i)
        if key == "parameters":
            arguments = text[i:] if end < 0 else text[i:end]
        elif key == "name" and end >= 0:
            name = json.loads(text[i:end])
        if end < 0:
            break
        i = end
    return _call(name, arguments), i, False


def _call(name, arguments) -> PartialCall | None:
    return PartialCall(name, arguments or "") if isinstance(name, str) else None


def forced_parser(name: str | None) -> type[ToolParser]:
    if name is None:
        return RequiredParser
    return type("NamedFunctionParser", (NamedFunctionParser,), {"function": name})
