"""Request bodies of the OpenAI API (the fields moeserve honours), validated strictly: a wrong type is a 400,
not a silent coercion. vLLM's extra sampling fields (top_k, min_p, ignore_eos, ...) are accepted too.

Every number is bounded and finite (JSON's `NaN`, `Infinity` and `1e999` are refused), and integer fields take
an integer-valued float such as `4.0`, as OpenAI does. Limits that depend on the server (vocabulary, counts of
stop strings and prompts, max_model_len) are checked in serving.py. `invalid_unicode_at` finds lone surrogates
("\\ud800" is valid JSON but not text) anywhere in a body before it reaches the tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from moeserve.sampling_params import MAX_INT32, MAX_REPETITION_PENALTY, MAX_TEMPERATURE

MAX_N = 128  # OpenAI's own limit on choices per request


def _integral_float_to_int(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def IntIn(low: int, high: int):  # noqa: N802 (a type)
    """An int in [low, high] that also takes 4.0 (not 4.5, not true): strict mode refuses every other coercion.
    The bounds sit inside the Annotated (before the float conversion) so that the JSON schema shows them."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integral_float_to_int)]


TokenIds = list[Annotated[int, BeforeValidator(_integral_float_to_int)]]  # checked against the vocabulary in serving.py

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields common to both endpoints."""

    model_config = _STRICT

    model: str | None = None  # missing: the served model
    n: IntIn(1, MAX_N) = 1
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: IntIn(-(2**63), 2**63 - 1) | None = None  # int64, as OpenAI's
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling parameters (openai SDK: extra_body={...})
    top_k: IntIn(-1, MAX_INT32) | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    min_tokens: IntIn(0, MAX_INT32) = 0
    ignore_eos: bool = False
    stop_token_ids: list[IntIn(0, MAX_INT32)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs, vLLM's way (response_format is OpenAI's; server/structured.py reads them all)
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id, ... pass through to the template
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: IntIn(1, MAX_INT32) | None = None
    max_completion_tokens: IntIn(1, MAX_INT32) | None = None
    logprobs: bool = False
    top_logprobs: IntIn(0, MAX_INT32) | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: IntIn(1, MAX_INT32) | None = 16  # OpenAI's default for completions
    logprobs: IntIn(0, MAX_INT32) | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: IntIn(1, MAX_N) | None = None
    response_format: dict[str, Any] | None = None  # vLLM's extension: structured outputs for completions too


def invalid_unicode_at(body: Any) -> str | None:
    """The dotted path ("messages.0.content") of the first string or key in a parsed JSON body that is not valid
    Unicode (a lone surrogate), or None. Iterative, so a deeply nested body cannot exhaust the stack."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return path or None
        elif isinstance(value, dict):
            for k, v in value.items():
                child = f"{path}.{k}" if path else str(k)
                if not _is_text(k):
                    return path or "body"
                todo.append((child, v))
        elif isinstance(value, list):
            todo.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
