"""Reasoning parsers by vLLM's names (`--reasoning-parser NAME`): the thinking between `<think>` and `</think>`
goes to `reasoning_content`, the rest is content (where the tool parser then looks for calls).

DeepSeek-R1, Qwen3, GLM-4.5+ and Kimi K2 Thinking all write `<think>...</think>`. Whether the answer *starts*
inside thinking is read from the rendered prompt: R1's template (and Qwen3-Thinking-2507's, GLM-4.7's) ends
the generation prompt with an open `<think>`, while `enable_thinking: false` writes a closed `<think></think>`
there. So a request with thinking switched off never has its answer (or its tool call) taken for reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.server.tool_parsers.base import held_back

THINK_START, THINK_END = "<think>", "</think>"


def opens_thinking(prompt_text: str) -> bool:
    """Whether the prompt leaves a `<think>` open for the answer to continue."""
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


def grammar_markers(prompt_text: str, encode) -> tuple[str, list[int], list[int]] | None:
    """Where a structured output's grammar starts for a thinking model (SamplingParams' reasoning_markers):
    after `</think>` when the prompt left thinking open; from the first token when the prompt closed it
    (`enable_thinking: false`); otherwise the answer may open with `<think>` (one token in these models'
    vocabularies; if not, the grammar holds from the first token) and the grammar starts after `</think>`."""
    if prompt_text.rstrip().endswith(THINK_END):
        return None
    start, end = encode(THINK_START), encode(THINK_END)
    if opens_thinking(prompt_text):
        return ("open", start, end) if end else None
    return ("optional", start, end) if len(start) == 1 and end else None


class ThinkReasoningParser:
    """One instance per request."""

    def __init__(self, starts_in_thinking: bool = False):
        self.starts_in_thinking = starts_in_thinking

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content); with final=False every result is a prefix of the final one."""
        body = text
        if not self.starts_in_thinking:
            head = text.lstrip()
            if head.startswith(THINK_START):
                body = head[len(THINK_START):]
            elif not final and THINK_START.startswith(head):
                return "", ""  # may still become <think>
            else:
                return "", text if final else _hold(text, ())
        end = body.find(THINK_END)
        if end < 0:  # still thinking (or cut off while thinking)
            reasoning = body if final else body[:len(body) - held_back(body, (THINK_END,))]
            return reasoning.strip() if final else reasoning.strip(), ""
        content = body[end + len(THINK_END):].lstrip()
        return body[:end].strip(), content

    def parse(self, text: str) -> tuple[str | None, str]:
        reasoning, content = self.split(text, final=True)
        return (reasoning or None), content

    def streamer(self) -> ReasoningStreamer:
        return ReasoningStreamer(self)


def _hold(text: str, markers: tuple[str, ...]) -> str:
    return text[:len(text) - held_back(text, markers)] if markers else text


@dataclass
class ReasoningStreamer:
    parser: ThinkReasoningParser
    text: str = ""
    sent_reasoning: str = ""
    sent_content: str = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._diff(*self.parser.split(self.text, final=False))

    def finish(self) -> tuple[str, str]:
        return self._diff(*self.parser.split(self.text, final=True))

    def _diff(self, reasoning: str, content: str) -> tuple[str, str]:
        r = c = ""
        if len(reasoning) > len(self.sent_reasoning) and reasoning.startswith(self.sent_reasoning):
            r, self.sent_reasoning = reasoning[len(self.sent_reasoning):], reasoning
        if len(content) > len(self.sent_content) and content.startswith(self.sent_content):
            c, self.sent_content = content[len(self.sent_content):], content
        return r, c


REASONING_PARSERS = {name: ThinkReasoningParser for name in ("deepseek_r1", "qwen3", "glm45", "kimi_k2")}


def reasoning_parser_class(name: str) -> type[ThinkReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"--reasoning-parser {name!r} is not known; choose one of: "
                         f"{', '.join(sorted(REASONING_PARSERS))}.") from None
