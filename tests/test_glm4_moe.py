"""GLM-4.5/4.7 (Glm4MoeForCausalLM) beyond tests/test_models.py (which runs its five checks on the ARCH_OVERRIDES
config: head_dim 32, partial rotary 0.5, q/k/v bias, q/k norm, grouped sigmoid routing, a shared expert).

Here: a second variant against transformers (no bias, no q/k norm, partial_rotary_factor 0.25, one group, a
non-zero e_score_correction_bias, no renormalisation, MTP tensors in the checkpoint), the router against
transformers' own, the KV pool against the planner's GQA formula, and the GLM-4.7 catalog config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_deepseek import NEW_TOKENS, PROMPT_LENS, _greedy, _prefill_logits, build_checkpoint
from tiny_checkpoints import tiny_config

from moeserve import LLM
from moeserve.layers.moe import Router
from moeserve.models.hf_config import HFConfig
from moeserve.models.registry import model_class
from moeserve.plan.arch import read_arch
from moeserve.plan.catalog import resolve_catalog

ARCH = "Glm4MoeForCausalLM"
VARIANT = dict(attention_bias=False, use_qk_norm=False, partial_rotary_factor=0.25, n_group=1, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.0, num_experts_per_tok=3)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("glm_variant"), ARCH, mtp_tensors=True, **VARIANT)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, hf.config.vocab_size, n).tolist() for n in PROMPT_LENS]
    return dict(path=path, hf=hf, prompts=prompts, llm=LLM(model=path, block_size=16))


def test_variant_logits_and_greedy_match_transformers(variant):
    hf, llm, prompts = variant["hf"], variant["llm"], variant["prompts"]
    assert json.loads(Path(variant["path"], "config.json").read_text())["num_nextn_predict_layers"] == 1
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().min() > 0  # the checkpoint's correction bias takes part
    with torch.no_grad():
        for ours, p in zip(_prefill_logits(llm, prompts[3:6]), prompts[3:6]):
            torch.testing.assert_close(ours, hf(torch.tensor([p])).logits[0], rtol=1e-4, atol=1e-4)
        tokens = _greedy(llm, prompts)
        for p, t in zip(prompts, tokens):  # teacher-forced greedy: transformers would pick exactly these
            assert len(t) == NEW_TOKENS
            assert hf(torch.tensor([p + t])).logits[0, len(p) - 1:-1].argmax(-1).tolist() == t


def test_rotary_covers_a_quarter_of_each_head(variant):
    attn = variant["llm"].llm_engine.model.model.layers[0].self_attn
    assert attn.rotary.rotary_dim == attn.head_dim // 4
    assert attn.rotary is variant["llm"].llm_engine.model.model.layers[1].self_attn.rotary  # one shared table


def test_kv_pool_matches_the_planner(variant):
    engine = variant["llm"].llm_engine
    cfg = json.loads(Path(variant["path"], "config.json").read_text())
    per_token = engine.runner.kv_bytes_per_block() // engine.config.block_size
    assert per_token == cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    assert per_token == read_arch(cfg).kv_bytes_per_token(4)


@pytest.mark.parametrize("overrides", [dict(n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5),
                                       dict(n_group=1, topk_group=1, norm_topk_prob=False)])
def test_router_matches_transformers(overrides):
    import transformers.models.glm4_moe.modeling_glm4_moe as glm

    cfg = tiny_config(ARCH, vocab_size=64, n_routed_experts=16, num_experts_per_tok=4, **overrides)
    hf = glm.Glm4MoeTopkRouter(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=g))
        hf.e_score_correction_bias.copy_(torch.randn(16, generator=g) - 1.0)
    router = model_class(ARCH)(HFConfig(cfg.to_dict() | {"architectures": [ARCH], "num_hidden_layers": 2,
                                                          "vocab_size": 64})).model.layers[1].mlp.gate
    router.load_state_dict(hf.state_dict())
    x = torch.randn(200, 64, generator=g)
    with torch.no_grad():
        _, ref_w, ref_ids = hf(x)
        w, ids = router(x)
    assert isinstance(router, Router)
    order, ref_order = ids.long().sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices))


def test_glm47_catalog_config_builds_with_the_planners_parameter_count():
    cfg = json.loads(Path(resolve_catalog("zai-org/GLM-4.7-FP8")).read_text())
    with torch.device("meta"):
        model = model_class(ARCH)(HFConfig(cfg))
    assert sum(p.numel() for p in model.parameters()) == read_arch(cfg).param_counts()["total"]
    attn = model.model.layers[0].self_attn
    assert attn.rotary.rotary_dim == 64  # partial_rotary_factor 0.5 by default, as transformers assumes
    assert model.kv_cache_shape(3, 16) == (2, 3, 16, 8, 128)
