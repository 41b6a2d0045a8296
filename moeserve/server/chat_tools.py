"""Tools and reasoning in /v1/chat/completions: the checks on `tools` / `tool_choice`, the history's tool calls
made ready for the chat template, and one `AnswerParser` per choice that splits the model's text into
reasoning, content and tool calls (whole, or delta by delta while streaming)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from moeserve.server.errors import bad_request
from moeserve.server.reasoning_parsers import opens_thinking, reasoning_parser_class
from moeserve.server.tool_parsers import ToolParser, tool_parser_class
from moeserve.server.tool_parsers.forced import forced_parser, forced_schema


@dataclass
class ToolPlan:
    tools: list[dict] | None  # what the chat template gets
    parser: type[ToolParser] | None  # None: the text is not searched for calls
    parallel: bool = True
    # tool_choice "required" or a named function: the JSON schema the grammar holds the answer to (None: free)
    forced_schema: dict | None = None


def plan_tools(req, settings) -> ToolPlan:
    """Validate tools and tool_choice (OpenAI-style 400s naming the field) and decide how the answer is read."""
    tools, choice = req.tools, req.tool_choice
    if tools is not None:
        for i, t in enumerate(tools):
            fn = t.get("function")
            if t.get("type", "function") != "function" or not isinstance(fn, dict):
                raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.",
                                  param=f"tools.{i}")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise bad_request(f"tools[{i}].function.name is missing.", param=f"tools.{i}.function.name")
            if not isinstance(fn.get("parameters", {}), dict):
                raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object.",
                                  param=f"tools.{i}.function.parameters")
    names = [t["function"]["name"] for t in tools or []]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise bad_request(f"tools[{i}].function.name {name!r} is given twice.", param=f"tools.{i}.function.name")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")
        if name not in names:
            raise bad_request(f"tool_choice names the function {name!r}, which is not in tools.",
                              param="tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise bad_request(f"tool_choice {choice!r} is not one of 'none', 'auto', 'required' or a named function.",
                          param="tool_choice")
    elif choice != "none" and not tools:
        raise bad_request(f"tool_choice {choice!r} needs tools.", param="tool_choice")
    if choice == "none":
        return ToolPlan(tools or None, None)
    parallel = req.parallel_tool_calls is not False
    if choice == "required" or isinstance(choice, dict):
        # Enforced by the grammar, so the call always parses: no --tool-call-parser needed (as in vLLM).
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        if getattr(req, "response_format", None) and req.response_format.get("type", "text") != "text":
            raise bad_request(f"response_format cannot be combined with tool_choice {choice!r}: the call's own "
                              "schema already holds the answer.", param="response_format")
        for i, t in enumerate(tools):
            if name is None or t["function"]["name"] == name:
                _check_parameters_compile(t, i)
        return ToolPlan(tools, forced_parser(name), parallel, forced_schema(tools, name, parallel))
    if choice == "auto" and not settings.enable_auto_tool_choice:
        raise bad_request('"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                          '--tool-call-parser.', param="tool_choice")
    if settings.tool_call_parser is None:
        raise bad_request("Tool calls need the server started with --tool-call-parser.", param="tool_choice")
    parser = tool_parser_class(settings.tool_call_parser)
    return ToolPlan(tools, parser, parallel=parallel)


def _check_parameters_compile(tool: dict, index: int) -> None:
    from moeserve.sampling_params import InvalidSamplingParam, structured_outputs_params
    try:
        structured_outputs_params({"json": tool["function"].get("parameters") or {"type": "object"}})
    except InvalidSamplingParam as e:
        raise bad_request(f"tools[{index}].function.parameters is not a JSON schema the grammar can enforce: "
                          f"{e}", param=f"tools.{index}.function.parameters") from None


def history_for_template(msg: dict, index: int) -> dict:
    """An assistant message's tool_calls, as chat templates read them: `arguments` as an object."""
    calls = msg.get("tool_calls")
    if calls is None:
        return msg
    if not isinstance(calls, list):
        raise bad_request("tool_calls must be a list.", param=f"messages.{index}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("Each tool call needs function.name.",
                              param=f"messages.{index}.tool_calls.{j}.function.name")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # the template gets the text as it came
        out.append({**call, "function": {**fn, "arguments": args}})
    return {**msg, "tool_calls": out}


class AnswerParser:
    """One choice's text -> reasoning_content, content and tool_calls. Each choice of each request has its own."""

    def __init__(self, plan: ToolPlan, reasoning_parser: str | None, prompt_text: str):
        # A forced call's grammar holds the answer after any thinking (reasoning_parsers.grammar_markers).
        self.reasoning = (reasoning_parser_class(reasoning_parser)(opens_thinking(prompt_text))
                          if reasoning_parser else None)
        self.tools = plan.parser(plan.tools) if plan.parser else None
        self.parallel = plan.parallel
        self._r = self.reasoning.streamer() if self.reasoning else None
        self._t = self.tools.streamer() if self.tools else None
        self.called = False

    def message(self, text: str) -> dict:
        msg: dict = {"role": "assistant"}
        reasoning = None
        if self.reasoning:
            reasoning, text = self.reasoning.parse(text)
        content: str | None = text
        if self.tools:
            content, calls = self.tools.parse(text)
            if calls:
                msg["tool_calls"] = calls if self.parallel else calls[:1]
                self.called = True
        msg["content"] = content
        if self.reasoning:
            msg["reasoning_content"] = reasoning
        return msg

    def delta(self, text_delta: str, final: bool = False) -> dict:
        """The chunk's delta for the next piece of text (final: flush what was held back)."""
        reasoning, content = "", text_delta
        if self._r:
            reasoning, content = self._r.finish() if final else self._r.feed(text_delta)
        calls: list[dict] = []
        if self._t:
            content, calls = (self._t.feed(content) if content else ("", []))
            if final:
                more_content, more_calls = self._t.finish()
                content, calls = content + more_content, calls + more_calls
            if not self.parallel:
                calls = [c for c in calls if c["index"] == 0]
            self.called = self.called or bool(calls)
        out: dict = {}
        if reasoning:
            out["reasoning_content"] = reasoning
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        return out
