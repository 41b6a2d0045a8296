"""Formats written with special tokens (the request is detokenized with them kept):

deepseek_v3: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```
<｜tool▁call▁end｜><｜tool▁calls▁end｜>` (one line; DeepSeek-V3 / R1-0528 chat template).
deepseek_v31: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜><｜tool▁calls▁end｜>`.
kimi_k2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
<|tool_call_end|><|tool_calls_section_end|>`; the id is `functions.NAME:IDX`.
"""

from __future__ import annotations

import json

from moeserve.server.tool_parsers.base import PartialCall, held_back
from moeserve.server.tool_parsers.tagged import TaggedToolParser, partial_json_value

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def _args(raw: str, final: bool) -> str:
    if final:
        raw = raw.strip()
        try:
            json.loads(raw)
        except ValueError:
            return raw
        return raw
    return partial_json_value(raw, False)


class DeepSeekV3ToolParser(TaggedToolParser):
    name = "deepseek_v3"
    needs_special_tokens = True
    call_start, call_end, drop = DS_CALL_BEGIN, DS_CALL_END, (DS_CALLS_BEGIN, DS_CALLS_END)

    def body(self, body, final):
        sep = body.find(DS_SEP)
        line = body.find("\n", sep + 1) if sep >= 0 else -1
        if line < 0:
            return None if final else PartialCall(None)
        name = body[sep + len(DS_SEP):line].strip()
        raw = body[line + 1:]
        raw = raw[raw.find("\n") + 1:] if raw.lstrip().startswith("```") else raw  # the ```json line
        fence = raw.rfind("```")
        if fence >= 0:
            raw = raw[:fence]
        elif not final:
            raw = raw[:len(raw) - held_back(raw, ("```",))]
        return PartialCall(name, _args(raw, final or fence >= 0))


class DeepSeekV31ToolParser(TaggedToolParser):
    name = "deepseek_v31"
    needs_special_tokens = True
    call_start, call_end, drop = DS_CALL_BEGIN, DS_CALL_END, (DS_CALLS_BEGIN, DS_CALLS_END)

    def body(self, body, final):
        sep = body.find(DS_SEP)
        if sep < 0:
            return None if final else PartialCall(None)
        return PartialCall(body[:sep].strip(), _args(body[sep + len(DS_SEP):], final))


class KimiK2ToolParser(TaggedToolParser):
    name = "kimi_k2"
    needs_special_tokens = True
    call_start, call_end = "<|tool_call_begin|>", "<|tool_call_end|>"
    drop = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")
    _ARG = "<|tool_call_argument_begin|>"

    def body(self, body, final):
        sep = body.find(self._ARG)
        if sep < 0:
            return None if final else PartialCall(None)
        call_id = body[:sep].strip()
        name = call_id.split(".", 1)[-1].rsplit(":", 1)[0]
        return PartialCall(name, _args(body[sep + len(self._ARG):], final), id=call_id)
