"""The planner's reading of config.json: parameter counts against transformers and published sizes, KV bytes."""

from __future__ import annotations

import copy
import json

import pytest

from moeserve.plan.arch import SUPPORTED_ARCHITECTURES, load_config, read_arch, text_config
from moeserve.plan.catalog_index import catalog_entries, resolve_catalog


def spec_of(name: str):
    return read_arch(load_config(name))


# ---------------------------------------------------------------- published sizes

# (catalog id, published total, published active). Kimi K2: 1.04T per its technical report.
PUBLISHED = [
    ("deepseek-ai/DeepSeek-V3", 671e9, 37e9),
    ("deepseek-ai/DeepSeek-R1", 671e9, 37e9),
    ("moonshotai/Kimi-K2-Instruct", 1.04e12, 32e9),
    ("moonshotai/Kimi-K2.5", 1.04e12, 32e9),
    ("Qwen/Qwen3-235B-A22B", 235e9, 22e9),
    ("Qwen/Qwen3-30B-A3B", 30.5e9, 3.3e9),
    ("mistralai/Mixtral-8x7B-v0.1", 46.7e9, 12.9e9),
    ("mistralai/Mixtral-8x22B-v0.1", 141e9, 39e9),
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct", 400e9, 17e9),
    ("meta-llama/Meta-Llama-3-8B", 8.03e9, 8.03e9),
    ("Qwen/Qwen1.5-MoE-A2.7B", 14.3e9, 2.7e9),
    ("openai/gpt-oss-120b", 116.8e9, None),
    ("zai-org/GLM-5", 744e9, None),
]


@pytest.mark.parametrize("name,total,active", PUBLISHED)
def test_published_sizes(name, total, active):
    c = spec_of(name).param_counts()
    assert abs(c["total"] / total - 1) < 0.02, (name, c["total"])
    if active is not None:
        assert abs(c["active"] / active - 1) < 0.05, (name, c["active"])


def test_glm_47_size_and_its_active_convention():
    """Zhipu's "32B active" leaves out the embedding and lm_head (33.6B with them, as our "active" counts)."""
    c = spec_of("zai-org/GLM-4.7-FP8").param_counts()
    assert abs(c["total"] / 355e9 - 1) < 0.02
    assert abs((c["active"] - c["embeddings"] - c["lm_head"]) / 32e9 - 1) < 0.05
    assert c["active"] > 32e9  # the convention counts embeddings in


def test_components_sum_and_active_is_total_less_unused_experts():
    s = spec_of("deepseek-ai/DeepSeek-V3")
    c = s.param_counts()
    parts = sum(v for k, v in c.items() if k not in ("total", "active"))
    assert parts == c["total"]
    assert c["total"] - c["active"] == c["routed_experts"] * (256 - 8) // 256
    assert len(s.moe_layers) == 58 and s.moe_layers[0] == 3


# ---------------------------------------------------------------- KV bytes per token, exact

KV = [  # name, bytes/token at bf16, by the formulas
    ("deepseek-ai/DeepSeek-V3", 61 * (512 + 64) * 2),
    ("moonshotai/Kimi-K2.5", 61 * (512 + 64) * 2),
    ("deepseek-ai/DeepSeek-V2-Lite", 27 * (512 + 64) * 2),
    ("Qwen/Qwen3-30B-A3B", 2 * 48 * 4 * 128 * 2),
    ("Qwen/Qwen3-235B-A22B", 2 * 94 * 4 * 128 * 2),
    ("mistralai/Mixtral-8x7B-v0.1", 2 * 32 * 8 * 128 * 2),
    ("mistralai/Mixtral-8x22B-v0.1", 2 * 56 * 8 * 128 * 2),
    ("meta-llama/Meta-Llama-3-8B", 2 * 32 * 8 * 128 * 2),
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct", 2 * 48 * 8 * 128 * 2),
    ("zai-org/GLM-4.7-FP8", 2 * 92 * 8 * 128 * 2),
    ("Qwen/Qwen1.5-MoE-A2.7B", 2 * 24 * 16 * 128 * 2),
    ("openai/gpt-oss-120b", 2 * 36 * 8 * 64 * 2),
    # DeepSeek sparse attention also caches one 128-wide indexer key per token per layer
    ("deepseek-ai/DeepSeek-V3.2", 61 * (512 + 64 + 128) * 2),
]


@pytest.mark.parametrize("name,expected", KV)
def test_kv_bytes_per_token_exact(name, expected):
    s = spec_of(name)
    assert s.kv_bytes_per_token(2) == expected
    assert s.kv_bytes_per_token(1) * 2 == expected  # fp8 KV halves it


def test_mla_fields():
    s = spec_of("deepseek-ai/DeepSeek-V3")
    assert (s.attention, s.kv_lora_rank, s.qk_rope_head_dim) == ("mla", 512, 64)
    assert s.kv_values_per_token_per_layer() == 576
    g = spec_of("Qwen/Qwen3-30B-A3B")
    assert (g.attention, g.kv_lora_rank, g.num_kv_heads, g.head_dim) == ("gqa", None, 4, 128)


# ---------------------------------------------------------------- against transformers' own parameter count

SHRINK = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
              moe_intermediate_size=32, shared_expert_intermediate_size=48, vocab_size=256, num_hidden_layers=4,
              kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              qk_head_dim=24, index_n_heads=4, index_head_dim=16, intermediate_size_mlp=128,
              first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=512, n_group=1,
              topk_group=1)
_MODEL_TYPE = {"kimi_k2": "deepseek_v3", "llama4": "llama4_text"}
_ARCH = {"Llama4ForConditionalGeneration": "Llama4ForCausalLM"}


def tiny(cfg: dict, **overrides) -> dict:
    """A tiny text-model config of the same family: every sizing field shrunk, structure kept."""
    tc = copy.deepcopy(text_config(cfg))
    for k in list(tc):
        if k in SHRINK:
            tc[k] = SHRINK[k]
    for k in ("num_experts", "num_local_experts", "n_routed_experts"):
        if tc.get(k):
            tc[k] = 8
    for k in ("num_experts_per_tok", "experts_per_token"):
        if tc.get(k) and tc[k] > 2:
            tc[k] = 2
    if tc.get("layer_types"):
        tc["layer_types"] = tc["layer_types"][:4]
    for k in ("quantization_config", "auto_map", "_source", "transformers_version"):
        tc.pop(k, None)
    tc.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    tc["architectures"] = [_ARCH.get(a, a) for a in tc.get("architectures") or cfg["architectures"]]
    tc["model_type"] = _MODEL_TYPE.get(tc.get("model_type") or cfg["model_type"], tc.get("model_type"))
    tc.update(overrides)
    return tc


def hf_param_count(tc: dict) -> int:
    """What a checkpoint of this config holds: transformers' state_dict (persistent buffers such as
    e_score_correction_bias included), the tied lm_head once."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in tc.items() if k not in ("model_type", "architectures")}
    hf_cfg = AutoConfig.for_model(tc["model_type"], **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    seen, n = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel()
    return n


CATALOG_IDS = list(catalog_entries())

VARIANTS = [  # structure the catalog does not exercise: (base, overrides)
    ("meta-llama/Meta-Llama-3-8B", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    ("meta-llama/Meta-Llama-3-8B", dict(architectures=["MistralForCausalLM"], model_type="mistral")),
    ("meta-llama/Meta-Llama-3-8B", dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2")),
    ("meta-llama/Meta-Llama-3-8B", dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=24)),
    ("Qwen/Qwen1.5-MoE-A2.7B", dict(decoder_sparse_step=2, mlp_only_layers=[1])),
    ("Qwen/Qwen3-30B-A3B", dict(mlp_only_layers=[0, 2], num_key_value_heads=4)),
    ("deepseek-ai/DeepSeek-V2-Lite", dict(q_lora_rank=48, n_shared_experts=1)),
    ("deepseek-ai/DeepSeek-V3", dict(q_lora_rank=None, first_k_dense_replace=2)),
    ("zai-org/GLM-4.7-FP8", dict(attention_bias=True, use_qk_norm=True, first_k_dense_replace=2)),
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct", dict(interleave_moe_layer_step=1)),
]


@pytest.mark.parametrize("name", CATALOG_IDS)
def test_param_count_matches_transformers_catalog(name):
    tc = tiny(load_config(name))
    assert read_arch(tc).param_counts()["total"] == hf_param_count(tc)


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[f"{b.split('/')[1]}-{i}" for i, (b, _) in enumerate(VARIANTS)])
def test_param_count_matches_transformers_variants(name, overrides):
    tc = tiny(load_config(name), **overrides)
    assert read_arch(tc).param_counts()["total"] == hf_param_count(tc)


# ---------------------------------------------------------------- reading and errors

def test_moe_layer_selection():
    """DeepSeek's own modelling code (and vLLM) also honour moe_layer_freq; transformers ignores it."""
    cfg = dict(load_config("deepseek-ai/DeepSeek-V2-Lite"), num_hidden_layers=8, first_k_dense_replace=1,
               moe_layer_freq=2)
    assert read_arch(cfg).moe_layers == (2, 4, 6)
    q = dict(load_config("Qwen/Qwen1.5-MoE-A2.7B"), num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert read_arch(q).moe_layers == (1, 5)


def test_text_config_is_unwrapped_and_inherits_architecture():
    cfg = load_config("meta-llama/Llama-4-Maverick-17B-128E-Instruct")
    s = read_arch(cfg)
    assert s.architecture == "Llama4ForConditionalGeneration" and s.hidden_size == 5120
    assert s.moe_layers == tuple(range(1, 48, 2))
    k25 = read_arch(load_config("moonshotai/Kimi-K2.5"))
    assert k25.architecture == "DeepseekV3ForCausalLM" and k25.num_experts == 384
    assert text_config({"a": 1}) == {"a": 1}


def test_load_config_sources(tmp_path):
    cfg = json.loads(resolve_catalog("llama-3-8b").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path)["hidden_size"] == 4096
    assert load_config(tmp_path / "config.json")["hidden_size"] == 4096
    assert load_config(cfg) is cfg
    assert load_config("meta-llama/Meta-Llama-3-8B")["hidden_size"] == 4096


def test_resolve_catalog_names():
    p = resolve_catalog("deepseek-ai/DeepSeek-V3")
    assert p is not None and p.name == "deepseek-ai--DeepSeek-V3.json"
    assert resolve_catalog("deepseek-ai--DeepSeek-V3") == p
    assert resolve_catalog("DeepSeek-V3") == p
    assert resolve_catalog("qwen3-30b-a3b").name == "Qwen--Qwen3-30B-A3B.json"
    assert resolve_catalog("no-such/model") is None
    from moeserve.plan.catalog import resolve_catalog as via_package

    assert via_package("Qwen/Qwen3-30B-A3B") == resolve_catalog("Qwen/Qwen3-30B-A3B")


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)


def test_missing_field_is_named():
    cfg = dict(load_config("Qwen/Qwen3-30B-A3B"))
    del cfg["moe_intermediate_size"]
    with pytest.raises(ValueError, match="moe_intermediate_size") as e:
        read_arch(cfg)
    assert "Qwen3MoeForCausalLM" in str(e.value) and "Qwen--Qwen3-30B-A3B.json" in str(e.value)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match="MambaForCausalLM") as e:
        read_arch({"architectures": ["MambaForCausalLM"], "hidden_size": 8})
    for arch in ("LlamaForCausalLM", "DeepseekV3ForCausalLM", "MixtralForCausalLM"):
        assert arch in str(e.value) and arch in SUPPORTED_ARCHITECTURES
    with pytest.raises(ValueError, match="architectures"):
        read_arch({"hidden_size": 8})


@pytest.mark.parametrize("name", CATALOG_IDS)
def test_engine_normalized_config_reads_the_same(name):
    """The engine holds configs through models.hf_config (text_config unwrapped); the reading must agree."""
    from moeserve.models.hf_config import HFConfig

    cfg = load_config(name)
    assert read_arch(HFConfig(cfg).to_dict()) == read_arch(cfg)
