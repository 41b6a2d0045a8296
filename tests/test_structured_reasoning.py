"""Structured outputs after thinking (vLLM's behaviour with a reasoning parser): the grammar holds only the answer
that follows the model's `</think>`; while the model thinks its tokens are free. The markers are token ids the
server finds from the prompt (reasoning_parsers.grammar_markers); here a tiny random model's own first greedy
token stands in for `</think>` so the thinking phase is deterministic."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.sampling_params import StructuredOutputsParams
from moeserve.server.reasoning_parsers import grammar_markers

CHOICES = ["yes", "no", "maybe not"]
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(model=make_tiny_checkpoint(tmp_path_factory.mktemp("think"), "LlamaForCausalLM"), device="cpu")


def _gen(llm, prompt, **so):
    params = SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(**so))
    return llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]


def _text(llm, ids) -> str:
    return llm.llm_engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_the_grammar_holds_after_the_end_marker(llm):
    for prompt in PROMPTS:
        free = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1))[0]
        end = free.outputs[0].token_ids[0]  # the model's own first token plays `</think>`
        out = _gen(llm, prompt, choice=CHOICES, reasoning_markers=("open", [], [end]))
        assert out.token_ids[0] == end  # thinking is unconstrained: the model's own choice
        assert _text(llm, out.token_ids[1:]) in CHOICES  # then the grammar holds the answer
        held = _gen(llm, prompt, choice=CHOICES)  # without markers the grammar holds from the first token
        assert _text(llm, held.token_ids) in CHOICES


def test_optional_thinking_allows_the_start_marker_or_the_answer(llm):
    prompt = PROMPTS[0]
    free = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=2))[0]
    start, end = free.outputs[0].token_ids  # the model opens "thinking" with its first token, closes with its second
    out = _gen(llm, prompt, choice=CHOICES, reasoning_markers=("optional", [start], [end]))
    assert out.token_ids[:2] == [start, end]
    assert _text(llm, out.token_ids[2:]) in CHOICES


def test_the_mask_of_optional_thinking(llm):
    """Before the first token: the grammar's first tokens and the start marker; after an answer token: the grammar
    alone from the first token; after the start marker: nothing masked until the end marker."""
    from types import SimpleNamespace

    from moeserve.engine.structured import GrammarMask, Grammars

    engine = llm.llm_engine
    grammars = Grammars(engine.tokenizer, engine.hf_config.vocab_size, engine.eos_token_ids)
    V = engine.hf_config.vocab_size
    plain = grammars.state(StructuredOutputsParams(choice=CHOICES))
    mask = GrammarMask(V, torch.device("cpu"))

    def allowed(state, out):
        logits = torch.zeros(1, V)
        mask.apply(logits, [SimpleNamespace(grammar=state, output_token_ids=out)])
        return set(torch.nonzero(logits[0] > -1e30).flatten().tolist())

    first = allowed(plain, [])
    start = next(t for t in range(V) if t not in first)
    end = next(t for t in range(V) if t not in first and t != start)
    spec = StructuredOutputsParams(choice=CHOICES, reasoning_markers=("optional", [start], [end]))
    assert allowed(grammars.state(spec), []) == first | {start}
    answer = grammars.state(spec)
    answer.catch_up([]), allowed(answer, [])
    t0 = min(first)
    assert allowed(answer, [t0]) == allowed(grammars.state(StructuredOutputsParams(choice=CHOICES)), [t0])
    thinking = grammars.state(spec)
    assert allowed(thinking, [start, 17]) == set(range(V))  # free while thinking
    assert allowed(thinking, [start, 17, end]) == first  # the grammar starts after the end marker


def test_markers_from_the_prompt():
    encode = {"<think>": [7], "</think>": [8]}.get
    assert grammar_markers("<|assistant|><think>\n", encode) == ("open", [7], [8])  # R1: thinking left open
    assert grammar_markers("<|assistant|><think>\n\n</think>\n\n", encode) is None  # enable_thinking: false
    assert grammar_markers("<|assistant|>\n", encode) == ("optional", [7], [8])  # may think first
    two = {"<think>": [7, 9], "</think>": [8]}.get  # not one token: no optional thinking, grammar from the start
    assert grammar_markers("<|assistant|>\n", two) is None
    assert grammar_markers("<|assistant|><think>\n", two) == ("open", [7, 9], [8])


def test_markers_stay_out_of_the_grammar_cache_key():
    a = StructuredOutputsParams(choice=CHOICES)
    b = StructuredOutputsParams(choice=CHOICES, reasoning_markers=("open", [], [3]))
    assert a.key() == b.key()
    assert torch.tensor(0).item() == 0
