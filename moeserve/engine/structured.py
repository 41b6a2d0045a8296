"""Structured outputs: a request's tokens held to a grammar (JSON schema, any JSON object, regex, choice, EBNF)
while they are drawn, with xgrammar.

    add_request -> Grammars.compile(spec) (cached by key) -> Request.grammar = GrammarState(compiled)
    Sampler.sample -> GrammarMask.apply: each grammared row's matcher catches up with the row's accepted tokens,
                      fills its row of a host bitmask; one upload, one xgrammar kernel masks the logits

The matcher lets EOS through exactly when the grammar may end, so a request stops at EOS once its output is
complete. A grammared request needs its newest token on the host before its next mask, so it is one of the
engine's sync requests (SamplingParams.reads_own_tokens). Batches without a grammar never reach this module,
and xgrammar is imported only when a request first asks for a grammar.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from functools import lru_cache

import torch

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[15:12:04] /project/cpp/x.cc:83: " in xgrammar's errors


def _message(e: Exception) -> str:
    return _LOG_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


def _choice_ebnf(choices: list[str]) -> str:
    # json.dumps quotes and escapes each string the way xgrammar's EBNF literals read them.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def check_compiles(spec, error) -> None:
    """Compile `spec` (StructuredOutputsParams) without a tokenizer; raise error(message) if the library cannot."""
    kind, text = spec.key()
    if kind == "choice":
        choices = spec.choice
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise error("choice must be a non-empty list of non-empty strings.")
    elif kind == "json_object":
        if spec.json_object is not True:
            raise error("json_object must be true.")
        return
    elif kind == "json" and not isinstance(spec.json, (str, dict)):
        raise error("json must be a JSON schema (an object, or a string holding one).")
    elif kind in ("regex", "grammar") and not isinstance(getattr(spec, kind), str):
        raise error(f"{kind} must be a string.")
    message = _compile_error(kind, text)
    if message is not None:
        raise error(f"The {kind} could not be compiled: {message}")


@lru_cache(maxsize=1024)
def _compile_error(kind: str, text: str) -> str | None:
    import xgrammar as xgr
    try:
        if kind == "json":
            json.loads(text)
            xgr.Grammar.from_json_schema(text, any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(text)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(text)))
    except Exception as e:  # json.JSONDecodeError, xgrammar's RuntimeError
        return _message(e)
    return None


class Grammars:
    """Compiles specs against one tokenizer and vocabulary; keeps the most recent compiled grammars by key."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], cache_size: int = 256):
        import xgrammar as xgr
        self.xgr = xgr
        if hasattr(tokenizer, "to_transformers"):  # loader/light_tokenizer.py: xgrammar reads transformers' own
            tokenizer = tokenizer.to_transformers()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(eos_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.cache_size = cache_size

    def compile(self, spec):
        key = spec.key()
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self._compile(*key)
            self.cache[key] = compiled
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        return compiled

    def _compile(self, kind: str, text: str):
        c = self.compiler
        try:
            if kind == "json":
                # Compact JSON: with free whitespace a weak model can emit newlines until max_tokens.
                return c.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                # An object (the built-in JSON grammar takes any value), any keys (strict mode would forbid them).
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "regex":
                return c.compile_regex(text)
            if kind == "grammar":
                return c.compile_grammar(text)
            return c.compile_grammar(_choice_ebnf(json.loads(text)))
        except RuntimeError as e:
            from moeserve.sampling_params import InvalidSamplingParam
            raise InvalidSamplingParam(f"structured_outputs.{kind}",
                                       f"The {kind} could not be compiled: {_message(e)}") from None

    def state(self, spec) -> "GrammarState":
        return GrammarState(self.xgr.GrammarMatcher(self.compile(spec)), getattr(spec, "reasoning_markers", None))


class GrammarState:
    """One request's matcher and how many of its output tokens the matcher has accepted.

    With reasoning markers the grammar holds only the answer after the model's thinking (vLLM's behaviour with a
    reasoning parser): `begin` is the output index where it starts, None while that is not known yet."""

    def __init__(self, matcher, reasoning_markers=None):
        self.matcher = matcher
        self.num_accepted = 0
        self.mode, self.start_ids, self.end_ids = reasoning_markers or (None, [], [])
        self.begin: int | None = 0 if self.mode is None else None
        self.num_drawn = 0  # output tokens seen at the last catch_up

    @property
    def may_open_thinking(self) -> bool:
        """Nothing drawn yet and the answer may start by thinking: the start marker is allowed beside the grammar."""
        return self.mode == "optional" and self.num_drawn == 0

    def catch_up(self, output_token_ids: list[int]) -> None:
        self.num_drawn = len(output_token_ids)
        if self.begin is None:
            self.begin = self._find_begin(output_token_ids)
            if self.begin is None:
                return
        for t in output_token_ids[self.begin + self.num_accepted:]:
            if not self.matcher.accept_token(t):
                raise ValueError(f"token {t} does not follow the request's grammar")
            self.num_accepted += 1

    def _find_begin(self, out: list[int]) -> int | None:
        thinking_from = 0
        if self.mode == "optional":
            if not out:
                return None
            if out[0] != self.start_ids[0]:
                return 0  # no thinking: the grammar holds from the first token (which it allowed)
            thinking_from = 1
        n = len(self.end_ids)
        for i in range(thinking_from, len(out) - n + 1):
            if out[i:i + n] == self.end_ids:
                return i + n
        return None

    @property
    def holds(self) -> bool:
        """Is the grammar masking this request's next token?"""
        return self.begin is not None

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


class GrammarMask:
    """The sampler's share: a host bitmask (32 tokens a word), grown as batches grow, reused every step."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.words = (vocab_size + 31) // 32
        self.host = torch.empty(0, self.words, dtype=torch.int32)

    def _rows(self, n: int) -> torch.Tensor:
        if self.host.shape[0] < n:
            size = max(n, 2 * self.host.shape[0], 8)
            self.host = torch.empty(size, self.words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        return self.host[:n]

    def apply(self, logits: torch.Tensor, reqs) -> None:
        """Mask, in place, the logits [len(reqs), V] of every row whose request has a grammar."""
        import xgrammar as xgr
        rows = []
        host = self._rows(len(reqs))
        for i, r in enumerate(reqs):
            state = r.grammar
            if state is None:
                continue
            state.catch_up(r.output_token_ids)
            if state.holds:
                state.matcher.fill_next_token_bitmask(host, i)
            elif state.may_open_thinking:  # the grammar's first tokens, or the start of thinking
                state.matcher.fill_next_token_bitmask(host, i)
                t = state.start_ids[0]
                word = host[i, t // 32].item() | (1 << (t % 32))
                host[i, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32 bit pattern
            else:
                continue  # thinking: unconstrained until the end marker
            rows.append(i)
        if not rows:
            return
        # A blocking copy: the host buffer is refilled next step (a grammared step is waited for anyway).
        mask = host.to(logits.device) if logits.is_cuda else host
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows)
