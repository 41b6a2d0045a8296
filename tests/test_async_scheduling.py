"""Async scheduling (step n+1 launched before the host reads step n's tokens) changes when the host learns a
token, never which token: on the CPU, where the engine defaults to synchronous steps, it is switched on and
every output must equal the synchronous engine's — through preemption, chunked prefill, prefix sharing, stops,
n > 1, seeds, logprobs, penalties and aborts — and no KV block may be left behind."""

from __future__ import annotations

import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"])
def path(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def _pair(path, **kw):
    return LLM(model=path, async_scheduling=False, **kw), LLM(model=path, async_scheduling=True, **kw)


def _outputs(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs] for o in outs]


def _all_blocks_free(llm):
    kv = llm.llm_engine.kv
    return kv.pool.num_free == kv.num_blocks


PROMPTS = [{"prompt_token_ids": [40 + i for i in range(12)] + [7 + k] * (1 + 5 * k)} for k in range(6)]


def test_same_tokens_through_preemption_chunking_and_prefix_sharing(path):
    sync, asy = _pair(path, num_gpu_blocks_override=16, block_size=8, max_num_batched_tokens=24)
    params = [SamplingParams(temperature=0, max_tokens=12 + 7 * k, ignore_eos=True) for k in range(6)]
    a, b = sync.generate(PROMPTS, params), asy.generate(PROMPTS, params)
    assert _outputs(b) == _outputs(a)
    assert asy.llm_engine.scheduler.num_preemptions_total > 0  # the pool was small enough to preempt
    assert _all_blocks_free(asy) and asy.llm_engine.inflight is None


def test_same_outputs_for_every_sampling_option(path):
    sync, asy = _pair(path)
    cases = [
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=5, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=16, n=3, seed=11),  # eos may stop some early
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[50, 60, 70, 80, 90]),
        SamplingParams(temperature=0, max_tokens=30, stop=["e", "a"], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=15, min_tokens=10, stop_token_ids=[50, 60]),
    ]
    prompts = ["The quick brown fox", "Paris is the capital of", "1 2 3 4 5", "Hello"]
    for p in cases:
        assert _outputs(asy.generate(prompts, p)) == _outputs(sync.generate(prompts, p)), p
    mixed = [cases[i % len(cases)] for i in range(len(prompts) * 2)]  # penalties beside plain requests
    assert _outputs(asy.generate(prompts * 2, mixed)) == _outputs(sync.generate(prompts * 2, mixed))
    assert _all_blocks_free(asy)


def test_steps_overlap_and_a_stopped_request_costs_one_wasted_token(path):
    eng = LLM(model=path, async_scheduling=True).llm_engine
    eng.add_request("a", list(range(5, 15)), SamplingParams(temperature=0, max_tokens=50, stop_token_ids=list(range(384))))
    eng.add_request("b", list(range(5, 12)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert eng.step() == []  # launched, nothing read back yet
    assert eng.inflight is not None and all(r.num_pending == 1 for r in eng.scheduler.running)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    a = [o for o in outs if o.request_id == "a"]
    assert len(a) == 1 and a[0].finished and len(a[0].outputs[0].token_ids) == 1  # its first token stops it
    b = [o for o in outs if o.request_id == "b"][-1]
    assert b.finished and len(b.outputs[0].token_ids) == 6
    assert eng.kv.pool.num_free == eng.kv.num_blocks and not eng.requests


def test_abort_while_a_step_is_in_flight_frees_its_blocks(path):
    eng = LLM(model=path, async_scheduling=True).llm_engine
    for i in range(3):
        eng.add_request(str(i), list(range(5, 25)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.inflight is not None
    eng.abort_request(["0", "2"])
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert {o.request_id for o in outs} == {"1"} and outs[-1].finished
    assert len(outs[-1].outputs[0].token_ids) == 40
    assert eng.kv.pool.num_free == eng.kv.num_blocks
