"""Whole engines under tensor parallelism (TP=2, gloo, CPU) against the single-process engine, fp32.

Each of 2 ranks runs the same LLMEngine on its shard of a tiny checkpoint (logits all-gathered, so every rank
samples the same tokens); greedy tokens must equal the single-process engine's, token for token, and the
logprobs of the top tokens must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dist_harness import run_ranks
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams

NEW_TOKENS = 8
PROMPT_LENS = [3, 11, 20]
CASES = {
    # one KV head over two ranks: each rank holds a replica of it
    "llama-1kv": ("LlamaForCausalLM", dict(num_key_value_heads=1)),
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True)),  # q/k norm, tied embeddings
    "mixtral": ("MixtralForCausalLM", {}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {}),
    "deepseek-v2": ("DeepseekV2ForCausalLM", {}),  # MLA, shared experts
    "glm4-moe": ("Glm4MoeForCausalLM", {}),  # partial rotary, q/k/v bias, sigmoid gate groups, shared expert
}


def _generate(prompts: list[list[int]], path: str) -> list[tuple[list[int], list[dict[int, float]]]]:
    llm = LLM(model=path, block_size=8, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


def _tp_rank(rank: int, prompts, path: str):
    from moeserve.distributed.parallel_state import ParallelLayout, initialize_model_parallel

    initialize_model_parallel(ParallelLayout(tp=2))
    return _generate(prompts, path)


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_engine_matches_single_process(case, tmp_path):
    arch, overrides = CASES[case]
    path = make_tiny_checkpoint(tmp_path, arch, **overrides)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n).tolist() for n in PROMPT_LENS]
    ref = _generate(prompts, path)
    ranks = run_ranks(2, _tp_rank, prompts, path)
    assert ranks[0] == ranks[1]  # every rank sampled the same tokens (and saw the same gathered logits)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(ranks[0], ref):
        assert tokens == ref_tokens
        for step, ref_step in zip(logprobs, ref_logprobs):
            assert step.keys() == ref_step.keys()
            for t, lp in step.items():
                assert math.isclose(lp, ref_step[t], rel_tol=1e-4, abs_tol=1e-4), (t, lp, ref_step[t])
