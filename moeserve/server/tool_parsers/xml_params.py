"""Formats that write each argument as its own tagged text, typed by the tool's schema:

qwen3_coder: `<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n</function>\n</tool_call>`
glm45 / glm47: `<tool_call>NAME\n<arg_key>P</arg_key>\n<arg_value>VALUE</arg_value>\n</tool_call>` (GLM-4.7
writes the same without the newlines).
"""

from __future__ import annotations

import json
import re

from moeserve.server.tool_parsers.base import PartialCall, held_back
from moeserve.server.tool_parsers.tagged import TaggedToolParser, build_object, open_string, typed_value


def _trim_newline(value: str, final: bool) -> str:
    """One newline after the opening tag and one before the closing tag are layout, not value."""
    if value.startswith("\n"):
        value = value[1:]
    if final and value.endswith("\n"):
        value = value[:-1]
    elif not final:
        value = value.rstrip("\n")
    return value


class _ParamParser(TaggedToolParser):
    call_start, call_end = "<tool_call>", "</tool_call>"
    value_end = ""

    def read(self, body: str) -> tuple[str | None, list[tuple[str, str, int, int]]]:
        """(name if complete, [(param, raw value, value start, value end or -1)])"""
        raise NotImplementedError

    def body(self, body: str, final: bool) -> PartialCall | None:
        name, params = self.read(body)
        if name is None:
            return None if final else PartialCall(None)
        done, open_part = [], None
        for key, value, closed in params:
            if closed or final:
                done.append((key, typed_value(self, name, key, _trim_newline(value, True))))
            elif open_string(self, name, key):
                value = value[:len(value) - held_back(value, (self.value_end,))]
                text = json.dumps(_trim_newline(value, False), ensure_ascii=False)[:-1]
                open_part = f"{json.dumps(key, ensure_ascii=False)}: {text}"
            else:
                open_part = f"{json.dumps(key, ensure_ascii=False)}: "
        return PartialCall(name, build_object(done, open_part, final))


class Qwen3CoderToolParser(_ParamParser):
    name = "qwen3_coder"
    value_end = "</parameter>"
    _FUNC = re.compile(r"<function=([^>\n]+)>")
    _PARAM = re.compile(r"<parameter=([^>\n]+)>")

    def read(self, body):
        m = self._FUNC.search(body)
        if m is None:
            return None, []
        params, pos = [], m.end()
        while (p := self._PARAM.search(body, pos)) is not None:
            end = body.find(self.value_end, p.end())
            if end < 0:
                params.append((p.group(1).strip(), body[p.end():], False))
                break
            params.append((p.group(1).strip(), body[p.end():end], True))
            pos = end + len(self.value_end)
        return m.group(1).strip(), params


class Glm45ToolParser(_ParamParser):
    name = "glm45"
    value_end = "</arg_value>"
    _PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>", re.S)

    def read(self, body):
        cut = re.search(r"\n|<arg_key>", body)
        if cut is None:
            return None, []  # the name runs until its newline (or the first argument)
        params, pos = [], cut.start()
        while (p := self._PAIR.search(body, pos)) is not None:
            end = body.find(self.value_end, p.end())
            if end < 0:
                params.append((p.group(1).strip(), body[p.end():], False))
                break
            params.append((p.group(1).strip(), body[p.end():end], True))
            pos = end + len(self.value_end)
        return body[:cut.start()].strip(), params

    def body(self, body, final):
        if final and "<arg_key>" not in body and "\n" not in body and body.strip():
            body += "\n"  # `<tool_call>NAME</tool_call>`: a call without arguments
        return super().body(body, final)
