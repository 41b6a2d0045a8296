"""DeepSeek-V2/V3 beyond tests/test_models.py (which runs its five checks on the ARCH_OVERRIDES configs: V2 with
q_lora_rank null and group-limited softmax routing, V3 with q_lora_rank set, YaRN and sigmoid group routing).

Here: two more variants against transformers (V2 with q_lora_rank and YaRN; V3 with q_lora_rank null, a non-zero
e_score_correction_bias, rotate-half rope and multi-token-prediction tensors in the checkpoint), the routers
against transformers' own, absorbed decode == expanded prefill, the latent-only KV pool against the planner's
formula, loader name mapping and refusals, and the real catalog configs (parameter counts, a dummy build).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_probe import prefill_hidden
from tiny_checkpoints import make_tokenizer, tiny_config

from moeserve import LLM, SamplingParams
from moeserve.engine.request import Request
from moeserve.layers import mla
from moeserve.layers.moe import Router, RouterConfig
from moeserve.models.hf_config import HFConfig
from moeserve.models.registry import model_class
from moeserve.plan.arch import read_arch
from moeserve.plan.catalog import resolve_catalog

PROMPT_LENS = [1, 3, 7, 12, 16, 17, 25, 40]
NEW_TOKENS = 32

VARIANTS = {
    "v2_qlora_yarn": ("DeepseekV2ForCausalLM", dict(
        q_lora_rank=24, topk_method="greedy", n_shared_experts=1, norm_topk_prob=False,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
                          mscale=0.9, mscale_all_dim=0.7),
    )),
    "v3_bias_mtp": ("DeepseekV3ForCausalLM", dict(
        num_hidden_layers=2, q_lora_rank=None, rope_interleave=False, n_group=2, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, rope_scaling=None,  # transformers writes num_nextn_predict_layers=1
    )),
}


def build_checkpoint(out: Path, arch: str, mtp_tensors: bool = False, **overrides) -> str:
    """A tiny random checkpoint; V3's e_score_correction_bias is made non-zero (transformers initialises zeros)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.3)  # large enough to change choices
    model.save_pretrained(str(out))
    if mtp_tensors:  # what DeepSeek-V3 / GLM-4.5 checkpoints append after the last decoder layer
        tensors = load_file(str(out / "model.safetensors"))
        n, h = cfg.num_hidden_layers, cfg.hidden_size
        tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(h, 2 * h)
        tensors[f"model.layers.{n}.enorm.weight"] = torch.ones(h)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def _greedy(llm, prompts, **kw):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, **kw)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def _prefill_logits(llm, prompts):
    engine = llm.llm_engine
    reqs = []
    for i, p in enumerate(prompts):
        r = Request(str(i), str(i), 0, p, SamplingParams(), max_tokens=1)
        assert engine.kv.allocate(r, len(p))
        reqs.append(r)
    with torch.inference_mode():
        logits = engine.model.compute_logits(prefill_hidden(engine, reqs))
    for r in reqs:
        engine.kv.free(r)
    return torch.split(logits, [len(p) for p in prompts])


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), arch, mtp_tensors="mtp" in request.param,
                            **overrides)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, hf.config.vocab_size, n).tolist() for n in PROMPT_LENS]
    return dict(path=path, hf=hf, prompts=prompts, llm=LLM(model=path, block_size=16))


def test_variant_logits_and_greedy_match_transformers(variant):
    hf, llm, prompts = variant["hf"], variant["llm"], variant["prompts"]
    with torch.no_grad():
        for ours, p in zip(_prefill_logits(llm, prompts[3:6]), prompts[3:6]):
            torch.testing.assert_close(ours, hf(torch.tensor([p])).logits[0], rtol=1e-4, atol=1e-4)
        tokens = _greedy(llm, prompts)  # 8 prompts as one batch
        # Teacher-forced: transformers' argmax after every prefix of ours is our next token, i.e. its greedy
        # decoding would produce exactly these tokens.
        for p, t in zip(prompts, tokens):
            assert len(t) == NEW_TOKENS
            ref = hf(torch.tensor([p + t])).logits[0, len(p) - 1:-1].argmax(-1).tolist()
            assert ref == t
    variant["tokens"] = tokens


def test_variant_chunked_mixed_batches_keep_tokens(variant, monkeypatch):
    """Prefill chunks and decodes share steps (both MLA paths in one batch); tokens stay the same."""
    if "tokens" not in variant:
        pytest.skip("needs the greedy tokens of the test above")
    llm = LLM(model=variant["path"], max_num_batched_tokens=8, enable_prefix_caching=False, block_size=16)
    from moeserve.layers import mla

    plans = []
    original = mla.MixedPlan.__init__

    def counted(self, meta, *args):
        plans.append(meta)
        original(self, meta, *args)

    monkeypatch.setattr(mla.MixedPlan, "__init__", counted)
    assert _greedy(llm, variant["prompts"]) == variant["tokens"]
    # planned once per step (by its first MLA layer), not once per layer
    assert plans and len({id(m) for m in plans}) == len(plans)


def test_kv_pool_holds_only_the_latent(variant):
    engine = variant["llm"].llm_engine
    cfg = json.loads(Path(variant["path"], "config.json").read_text())
    latent = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    per_token = engine.runner.kv_bytes_per_block() // engine.config.block_size
    assert per_token == cfg["num_hidden_layers"] * latent * 4  # fp32
    assert per_token == read_arch(cfg).kv_bytes_per_token(4)
    assert engine.memory_report()["kv_bytes_per_token"] == per_token
    assert all(c.shape == (engine.kv.num_blocks, 16, latent) for c in engine.runner.kv_caches)


# ---------------------------------------------------------------------------------------------- routers
def _hf_router(arch: str, **overrides):
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as v2
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as v3

    cfg = tiny_config(arch, vocab_size=64, **overrides)
    return (v2.DeepseekV2TopkRouter if "V2" in arch else v3.DeepseekV3TopkRouter)(cfg), cfg


@pytest.mark.parametrize("arch, overrides", [
    ("DeepseekV2ForCausalLM", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    ("DeepseekV2ForCausalLM", dict(topk_method="greedy", routed_scaling_factor=16.0)),
    ("DeepseekV3ForCausalLM", dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    ("DeepseekV3ForCausalLM", dict(n_group=1, topk_group=1, norm_topk_prob=False)),
])
def test_router_matches_transformers(arch, overrides):
    """Same experts, same weights as transformers' router, incl. a correction bias that flips choices and is
    negative (masked groups must not win against kept experts with negative biased scores)."""
    hf, cfg = _hf_router(arch, n_routed_experts=16, num_experts_per_tok=3, **overrides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=g))
        if hasattr(hf, "e_score_correction_bias"):
            hf.e_score_correction_bias.copy_(torch.randn(16, generator=g) - 1.5)
    ours_cfg = model_class(arch).router_config(HFConfig(cfg.to_dict() | {"architectures": [arch]}))
    router = Router(64, ours_cfg)
    router.load_state_dict(hf.state_dict())
    x = torch.randn(200, 64, generator=g)
    with torch.no_grad():
        _, ref_w, ref_ids = hf(x)
        w, ids = router(x)
    order, ref_order = ids.long().sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices))


def test_correction_bias_chooses_but_does_not_weigh():
    cfg = RouterConfig(num_experts=4, top_k=2, scoring="sigmoid", renormalize=False, correction_bias=True,
                       routed_scaling_factor=2.0)
    router = Router(2, cfg)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[3.0, 0], [2.0, 0], [1.0, 0], [0.0, 0]]))
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))
        w, ids = router(torch.tensor([[1.0, 0.0]]))
    assert sorted(ids[0].tolist()) == [2, 3]  # the bias picked the two weakest experts
    expect = 2.0 * torch.sigmoid(torch.tensor([1.0, 0.0]))  # weighed by their unbiased scores
    torch.testing.assert_close(w[0].sort().values, expect.sort().values)


# ---------------------------------------------------------------------------------------------- MLA maths
def test_absorbed_decode_equals_expanded_attention():
    g = torch.Generator().manual_seed(3)
    H, N, P, V, R, page, n = 4, 16, 8, 24, 32, 4, 11
    w_uk, w_uv = mla.split_kv_b(torch.randn(H * (N + V), R, generator=g), H, N)
    cache = torch.randn(5, page, R + P, generator=g)
    table = torch.tensor([[3, 0, 4]], dtype=torch.int32)
    q_nope, q_pe = torch.randn(1, H, N, generator=g), torch.randn(1, H, P, generator=g)
    context = cache[table[0].long()].flatten(0, 1)[:n]
    expanded = mla.expanded_attention(q_nope, q_pe, context, w_uk, w_uv, scale=0.2)
    q_lat = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)
    o_lat = mla.mla_decode_reference(q_lat, q_pe, cache, seq_lens=torch.tensor([n]), block_tables=table, scale=0.2)
    absorbed = torch.einsum("bhr,hvr->bhv", o_lat, w_uv)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("v2_loader"), "DeepseekV2ForCausalLM", num_hidden_layers=2)


def _rewrite(path: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = Path(path, "model.safetensors")
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_fused_expert_tensors_load_like_per_expert(v2_ckpt, tmp_path):
    import shutil

    fused = shutil.copytree(v2_ckpt, tmp_path / "fused")

    def fuse(t):
        prefix, n = "model.layers.1.mlp.experts", 8
        gate_up = [torch.cat([t.pop(f"{prefix}.{e}.gate_proj.weight"), t.pop(f"{prefix}.{e}.up_proj.weight")])
                   for e in range(n)]
        t[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)  # [E, 2I, H], as transformers >= 5 stores them
        t[f"{prefix}.down_proj"] = torch.stack([t.pop(f"{prefix}.{e}.down_proj.weight") for e in range(n)])

    _rewrite(str(fused), fuse)
    a, b = LLM(model=v2_ckpt).llm_engine.model, LLM(model=str(fused)).llm_engine.model
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_loader_refuses_mismatches(v2_ckpt, tmp_path):
    import shutil

    cfg = json.loads(Path(v2_ckpt, "config.json").read_text())
    wrong = shutil.copytree(v2_ckpt, tmp_path / "wrong_rank")
    Path(wrong, "config.json").write_text(json.dumps(cfg | {"kv_lora_rank": 16}))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.kv_a_\w+\.weight' has shape .*"
                                         r"config implies"):
        LLM(model=str(wrong))
    extra = shutil.copytree(v2_ckpt, tmp_path / "extra_layer")  # no MTP layers declared: layer 2 is an error
    _rewrite(str(extra), lambda t: t.update({"model.layers.2.enorm.weight": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.enorm\.weight.*matches no parameter"):
        LLM(model=str(extra))
    missing = shutil.copytree(v2_ckpt, tmp_path / "missing")
    _rewrite(str(missing), lambda t: t.pop("model.layers.1.mlp.shared_experts.up_proj.weight"))
    with pytest.raises(ValueError, match=r"no weights for parameter 'model\.layers\.1\.mlp\.shared_experts\.up_proj"):
        LLM(model=str(missing))


# ---------------------------------------------------------------------------------------------- real configs
@pytest.mark.parametrize("name", ["deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V3",
                                  "moonshotai/Kimi-K2-Instruct"])
def test_catalog_model_builds_with_the_planners_parameter_count(name):
    cfg = json.loads(Path(resolve_catalog(name)).read_text())
    with torch.device("meta"):
        model = model_class(cfg["architectures"][0])(HFConfig(cfg))
    assert sum(p.numel() for p in model.parameters()) == read_arch(cfg).param_counts()["total"]
    assert model.kv_cache_shape(3, 16) == (3, 16, 576)


def test_shrunk_v2_lite_config_generates_with_dummy_weights(tmp_path):
    """The real V2-Lite config (YaRN factor 40, 163840 positions, greedy softmax routing), fewer layers/experts."""
    cfg = json.loads(Path(resolve_catalog("deepseek-ai/DeepSeek-V2-Lite")).read_text())
    cfg.update(num_hidden_layers=2, n_routed_experts=8, hidden_size=256, intermediate_size=512,
               moe_intermediate_size=64, vocab_size=1000)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    llm = LLM(model=str(path), load_format="dummy", max_model_len=256)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=4,
                                                                          ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deepseek_v2_lite_dummy_builds_on_cuda():
    llm = LLM(model="deepseek-ai/DeepSeek-V2-Lite", load_format="dummy", dtype="bfloat16", max_model_len=4096,
              max_num_seqs=8)
    engine = llm.llm_engine
    assert engine.runner.kv_caches[0].shape[1:] == (16, 576)
    assert engine.runner.kv_bytes_per_block() // 16 == 27 * 576 * 2
    out = llm.generate([{"prompt_token_ids": list(range(5, 70))}] * 3,
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
