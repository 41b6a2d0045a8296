"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names and meanings)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

MAX_INT32 = 2**31 - 1  # integer fields go to the device as int32/int64 tensors: bounded, never a Python bigint
MAX_TEMPERATURE = 100.0  # far past anything useful (2 is OpenAI's own bound); a bound keeps logits finite
MAX_REPETITION_PENALTY = 100.0  # vLLM bounds it only below; any finite factor this large already bans


class InvalidSamplingParam(ValueError):
    """A sampling field out of its range; `param` names the field (the server's 400 carries it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _int(name: str, value, low: int, high: int, hint: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSamplingParam(name, f"{name} must be {hint or f'an integer in [{low}, {high}]'}, "
                                         f"got {value!r}.")


def _real(name: str, value, low: float, high: float, open_low: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if open_low else low <= value) and value <= high)
    if not ok:
        bracket = "(" if open_low else "["
        raise InvalidSamplingParam(name, f"{name} must be a finite number in {bracket}{low}, {high}], got {value!r}.")


@dataclass
class StructuredOutputsParams:
    """vLLM's shape: exactly one of json (a JSON schema, dict or string), json_object (any JSON object), regex,
    choice (one of these strings) or grammar (EBNF, GBNF-style). Plain data: it crosses to the workers as is."""

    json: str | dict | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # Set by the server with --reasoning-parser, not by users: the model may think before the grammar holds.
    # (mode, start marker ids, end marker ids): "open" = the prompt left thinking open, the grammar starts after
    # the end marker; "optional" = the answer may open with the (one-token) start marker and think first.
    reasoning_markers: tuple[str, list[int], list[int]] | None = None

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): what a compiled grammar is cached under."""
        import json
        value = getattr(self, self.kind)
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)  # key order kept: it is the properties' order
        return self.kind, str(value)


def structured_outputs_params(value) -> StructuredOutputsParams | None:
    """Checked for shape here, then compiled (without a tokenizer) by the grammar library: a schema, regex or
    grammar it cannot compile fails at construction, naming the field (structured_outputs.<kind>)."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = set(value) - set(StructuredOutputsParams.KINDS)
        if unknown:
            raise InvalidSamplingParam("structured_outputs", f"structured_outputs has unknown fields {sorted(unknown)}; "
                                       f"it takes one of {list(StructuredOutputsParams.KINDS)}.")
        value = StructuredOutputsParams(**value)
    if not isinstance(value, StructuredOutputsParams):
        raise InvalidSamplingParam("structured_outputs", "structured_outputs must be a StructuredOutputsParams or dict.")
    given = [k for k in StructuredOutputsParams.KINDS if getattr(value, k) not in (None, False)]
    if len(given) != 1:
        raise InvalidSamplingParam("structured_outputs", f"structured_outputs takes exactly one of "
                                   f"{list(StructuredOutputsParams.KINDS)}, got {given or 'none'}.")
    kind = given[0]
    from moeserve.engine.structured import check_compiles  # the grammar library is imported only when used
    check_compiles(value, lambda msg: InvalidSamplingParam(f"structured_outputs.{kind}", msg))
    return value


class RequestOutputKind(Enum):
    """What `LLMEngine.step` returns for a request: its output so far after every step, or only when it ends."""

    CUMULATIVE = 0
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per generated token (the sampled one is always included)
    skip_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | dict | None = None  # a grammar the tokens must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        """Every field checked for type, finiteness and range, so a bad value fails here, naming its field,
        rather than inside the batch it would have joined."""
        _int("n", self.n, 1, MAX_INT32)
        _real("temperature", self.temperature, 0, MAX_TEMPERATURE)
        _real("top_p", self.top_p, 0, 1, open_low=True)
        _int("top_k", self.top_k, 0, MAX_INT32, hint="-1, 0 (off) or a positive integer")
        _real("min_p", self.min_p, 0, 1)
        _real("repetition_penalty", self.repetition_penalty, 0, MAX_REPETITION_PENALTY, open_low=True)
        _real("presence_penalty", self.presence_penalty, -2, 2)
        _real("frequency_penalty", self.frequency_penalty, -2, 2)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, MAX_INT32)
        _int("min_tokens", self.min_tokens, 0, self.max_tokens if self.max_tokens is not None else MAX_INT32,
             hint="an integer in [0, max_tokens]")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_INT32)
        if self.seed is not None:
            _int("seed", self.seed, 0, 2**63 - 1)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidSamplingParam("stop", f"stop strings must be non-empty strings, got {s!r}.")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0, MAX_INT32, hint="token ids, integers >= 0")
        self.structured_outputs = structured_outputs_params(self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def reads_own_tokens(self) -> bool:
        """Does sampling a token need the request's previous tokens on the host (penalties, min_tokens, a
        grammar's matcher)?"""
        return self.has_penalties or self.min_tokens > 0 or self.structured_outputs is not None

    def clone(self, **changes) -> "SamplingParams":
        from dataclasses import replace
        return replace(self, **changes)
