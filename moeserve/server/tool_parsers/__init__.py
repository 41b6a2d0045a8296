"""Tool-call parsers by vLLM's names (`--tool-call-parser NAME`): each reads one model family's own format."""

from __future__ import annotations

from moeserve.server.tool_parsers.base import ToolCallStreamer, ToolParser
from moeserve.server.tool_parsers.hermes import HermesToolParser
from moeserve.server.tool_parsers.llama import Llama3JsonToolParser, PythonicToolParser
from moeserve.server.tool_parsers.special import DeepSeekV3ToolParser, DeepSeekV31ToolParser, KimiK2ToolParser
from moeserve.server.tool_parsers.xml_params import Glm45ToolParser, Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,
    "pythonic": PythonicToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek_v31": DeepSeekV31ToolParser,
    "kimi_k2": KimiK2ToolParser,
    "glm45": Glm45ToolParser,
    "glm47": Glm45ToolParser,
}


def tool_parser_class(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"--tool-call-parser {name!r} is not known; choose one of: "
                         f"{', '.join(sorted(TOOL_PARSERS))}.") from None


__all__ = ["TOOL_PARSERS", "ToolCallStreamer", "ToolParser", "tool_parser_class"]
