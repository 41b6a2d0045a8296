"""Llama's formats, where the whole answer is the call(s):

llama3_json (Llama 3.1/3.2/3.3 JSON tool calling, llama4_json too): `{"name": "f", "parameters": {...}}`, several
joined by `; `, maybe after `<|python_tag|>`.
pythonic (Llama 3.2 / Llama 4 and others): `[get_weather(city="Paris"), get_time()]`, maybe inside
`<|python_start|>...<|python_end|>`.
An answer that does not start like a call is content.
"""

from __future__ import annotations

import ast
import json

from moeserve.server.tool_parsers.base import PartialCall, Scan, ToolParser
from moeserve.server.tool_parsers.tagged import json_call, json_object_end


def _after_prefix(text: str, prefix: str, opener: str, final: bool) -> str | None:
    """The calls' text if the answer starts with a call; "" while that cannot be told yet; None if content."""
    head = text.lstrip()
    if head.startswith(prefix):
        head = head[len(prefix):].lstrip()
    if head.startswith(opener):
        return head
    if not final and (prefix.startswith(head) or not head):
        return ""
    return None


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    prefix = "<|python_tag|>"

    def scan(self, text, final):
        body = _after_prefix(text, self.prefix, "{", final)
        if body is None:
            return Scan(text)
        calls, pos = [], 0
        while pos < len(body):
            end = json_object_end(body[pos:])
            if end is None:  # the call being written
                call = json_call(body[pos:], final)
                if final and call is None:
                    return Scan(text)
                if call is not None:
                    calls.append(call)
                break
            call = json_call(body[pos:pos + end], final=True)
            if call is None:
                return Scan(text) if final else Scan("", calls)
            calls.append(call)
            pos += end
            rest = body[pos:].lstrip()
            if not rest.startswith(";"):
                break
            pos = len(body) - len(rest) + 1
        return Scan("", calls)


def _literal(node: ast.AST):
    return ast.literal_eval(node)


def _call_from_source(src: str) -> PartialCall | None:
    try:
        node = ast.parse(src.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or node.args:
        return None
    try:
        args = {kw.arg: _literal(kw.value) for kw in node.keywords}
    except ValueError:
        return None
    name = ast.unparse(node.func)
    return PartialCall(name, json.dumps(args, ensure_ascii=False))


class PythonicToolParser(ToolParser):
    name = "pythonic"
    prefix = "<|python_start|>"

    def scan(self, text, final):
        body = _after_prefix(text, self.prefix, "[", final)
        if body is None:
            return Scan(text)
        calls, depth, quote, start, i = [], 0, None, 1, 1
        closed = False
        while i < len(body):
            ch = body[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                if depth == 0:  # the list's own ]
                    closed = True
                    break
                depth -= 1
                if depth == 0 and ch == ")":
                    call = _call_from_source(body[start:i + 1])
                    if call is None:
                        return Scan(text) if final else Scan("", calls)
                    calls.append(call)
            elif ch == "," and depth == 0:
                start = i + 1
            i += 1
        if final and (not closed or not calls and body[1:i].strip()):
            return Scan(text)
        if not final and depth > 0 and "(" in body[start:]:  # a call being written: its name is known
            calls.append(PartialCall(body[start:body.index("(", start)].strip()))
        return Scan("", calls)
