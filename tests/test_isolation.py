"""One request's failure ends that request only; a fault of the whole step fails the step; admission refuses
what can never fit the KV pool."""

from __future__ import annotations

import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import SamplingParams
from moeserve.engine.engine import LLMEngine
from moeserve.engine.errors import RequestRejected

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = {"a": list(range(5, 14)), "bad": list(range(20, 26)), "c": list(range(30, 51))}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM")


@pytest.fixture
def engine(path):
    return LLMEngine.from_engine_args(model=path, num_gpu_blocks_override=64)


def run(engine, prompts, params=GREEDY) -> dict:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture(scope="module")
def solo(path):
    engine = LLMEngine.from_engine_args(model=path, num_gpu_blocks_override=64)
    return {rid: run(engine, {rid: ids})[rid].outputs[0].token_ids for rid, ids in PROMPTS.items()}


def test_a_request_whose_sampling_raises_fails_alone(engine, solo):
    real = engine.sampler.sample

    def sample(logits, reqs, eos):
        if any(r.request_id == "bad" for r in reqs) and len(reqs[0].output_token_ids) >= 3:
            raise IndexError("injected: this request's parameters break the draw")
        return real(logits, reqs, eos)

    engine.sampler.sample = sample
    done = run(engine, PROMPTS)
    assert done["bad"].error and "injected" in done["bad"].error
    assert done["bad"].outputs[0].finish_reason == "error" and len(done["bad"].outputs[0].token_ids) == 3
    for rid in ("a", "c"):
        assert done[rid].error is None and done[rid].outputs[0].token_ids == solo[rid]
    assert engine.kv.usage() == 0.0 and not engine.scheduler.running


def test_a_request_whose_output_processing_raises_fails_alone(engine, solo):
    real = engine._append

    def append(req, token, *rest):
        if req.request_id == "bad" and len(req.output_token_ids) == 5:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(req, token, *rest)

    engine._append = append
    done = run(engine, PROMPTS)
    assert "injected" in done["bad"].error
    for rid in ("a", "c"):
        assert done[rid].outputs[0].token_ids == solo[rid]
    assert engine.kv.usage() == 0.0


def test_a_fault_of_the_whole_step_raises(engine):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.runner.execute = broken
    engine.add_request("a", PROMPTS["a"], GREEDY)
    with pytest.raises(RuntimeError, match="CUDA error"):
        engine.step()


def test_a_request_larger_than_the_whole_pool_is_refused(path):
    engine = LLMEngine.from_engine_args(model=path, num_gpu_blocks_override=8, block_size=16)  # 128 tokens
    with pytest.raises(RequestRejected) as e:
        engine.add_request("big", list(range(100)), SamplingParams(max_tokens=400, ignore_eos=True))
    assert e.value.code == "kv_cache_exceeded"
    assert not engine.has_unfinished_requests()
    engine.add_request("fits", list(range(100)), SamplingParams(max_tokens=28, ignore_eos=True))
    engine.add_request("open", list(range(10)), SamplingParams(ignore_eos=True))  # no max_tokens: up to the pool
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(done["fits"].outputs[0].token_ids) == 28
