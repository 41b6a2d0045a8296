"""Every architecture against HF transformers on a tiny random checkpoint the test builds itself (fp32, CPU).

Per architecture: prefill logits equal; greedy 32 tokens for 8 prompts of different lengths, run as one batch,
identical to transformers' generate run one by one; the same tokens one-by-one in our engine, with a KV pool so
small that preemption must happen, and with chunked prefill under a tiny token budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_probe import prefill_hidden
from tiny_checkpoints import ARCH_OVERRIDES, make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.engine.request import Request

ARCHS = list(ARCH_OVERRIDES)
PROMPT_LENS = [1, 3, 7, 12, 16, 17, 25, 40]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory):
    arch = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, max_shard_size="200KB")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, hf.config.vocab_size, n).tolist() for n in PROMPT_LENS]
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(p):]
               .tolist() for p in prompts]
    return dict(arch=arch, path=path, hf=hf, prompts=prompts, ref=ref)


def _greedy(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def test_prefill_logits_match_transformers(ckpt):
    llm = LLM(model=ckpt["path"], block_size=16)
    engine = llm.llm_engine
    prompts = ckpt["prompts"][3:6]
    reqs = []
    for i, p in enumerate(prompts):
        r = Request(str(i), str(i), 0, p, SamplingParams(), max_tokens=1)
        assert engine.kv.allocate(r, len(p))
        reqs.append(r)
    with torch.inference_mode():
        logits = engine.model.compute_logits(prefill_hidden(engine, reqs))
        start = 0
        for p in prompts:
            ref = ckpt["hf"](torch.tensor([p])).logits[0].float()
            ours = logits[start:start + len(p)]
            start += len(p)
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_greedy_batch_matches_transformers(ckpt):
    llm = LLM(model=ckpt["path"])
    assert _greedy(llm, ckpt["prompts"]) == ckpt["ref"]
    layers = llm.llm_engine.model.model.layers
    assert len({id(layer.self_attn.rotary) for layer in layers}) == 1  # one cos/sin table for the whole model


def test_batched_equals_one_by_one(ckpt):
    llm = LLM(model=ckpt["path"])
    one_by_one = [_greedy(llm, [p])[0] for p in ckpt["prompts"]]
    assert one_by_one == ckpt["ref"]


def test_preemption_keeps_tokens(ckpt):
    # Each sequence needs at most 5 blocks of 16 (40 + 32 tokens); 12 blocks cannot hold 8 of them at once.
    llm = LLM(model=ckpt["path"], block_size=16, num_gpu_blocks_override=12)
    assert _greedy(llm, ckpt["prompts"]) == ckpt["ref"]
    assert llm.llm_engine.scheduler.num_preemptions_total > 0
    assert llm.llm_engine.kv.pool.num_free == 12  # everything returned


def test_chunked_prefill_keeps_tokens(ckpt):
    llm = LLM(model=ckpt["path"], max_num_batched_tokens=8, enable_prefix_caching=False)
    assert _greedy(llm, ckpt["prompts"]) == ckpt["ref"]
