"""hermes: Qwen2.5 / Qwen3 (and Hermes) write each call as
`<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>`."""

from __future__ import annotations

from moeserve.server.tool_parsers.tagged import TaggedToolParser, json_call


class HermesToolParser(TaggedToolParser):
    name = "hermes"
    call_start, call_end = "<tool_call>", "</tool_call>"

    def body(self, body, final):
        return json_call(body, final)
