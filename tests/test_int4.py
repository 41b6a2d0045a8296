"""INT4 weight-only checkpoints (issue 19.5): AWQ, GPTQ (sym and asym) and compressed-tensors pack-quantized, on the
CPU reference path (dequantize per call, then the dense matmul).

tests/int4_checkpoints.py quantizes a tiny random checkpoint and packs it in each format's published layout (its own
packing code, not moeserve's), and writes a second checkpoint holding the dequantized weights in fp32: moeserve
loading the int4 one must give the logprobs of the dequantized one and the same greedy tokens, at TP=1 and TP=2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from int4_checkpoints import make_int4_pair, qconfig
from safetensors.torch import load_file, save_file

from moeserve import LLM, SamplingParams
from moeserve.layers.quant import resolve_quantization
from moeserve.layers.quant.int4 import Int4Config

KIMI_IGNORE = ["re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
NEW_TOKENS = 6
PROMPTS = [[5, 17, 42], list(range(3, 40, 3))]


def _generate(path: str, **kw):
    llm = LLM(model=path, block_size=8, max_num_seqs=4, device="cpu", **kw)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs])
            for o in outs]


def _assert_same(got, ref, tol=1e-4):
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, ref):
        assert tokens == ref_tokens
        for step, ref_step in zip(lps, ref_lps):
            assert step.keys() == ref_step.keys()
            for t, lp in step.items():
                assert math.isclose(lp, ref_step[t], rel_tol=tol, abs_tol=tol), (t, lp, ref_step[t])


# ---- config ----------------------------------------------------------------------------------------------------

def test_resolve_int4_configs():
    awq = resolve_quantization(None, {"quantization_config": qconfig("awq", 128, ignored=["o_proj"])})
    assert isinstance(awq, Int4Config) and (awq.method, awq.group, awq.sym) == ("awq", 128, False)
    assert awq.skips("model.layers.0.self_attn.o_proj") and not awq.skips("model.layers.0.mlp.down_proj")
    gptq = resolve_quantization("gptq", {"quantization_config": qconfig("gptq", 64, sym=True)})
    assert (gptq.method, gptq.group, gptq.sym, gptq.zero_offset) == ("gptq", 64, True, 1)
    ct = resolve_quantization("compressed-tensors",
                              {"text_config": {"quantization_config": qconfig("compressed-tensors", 32,
                                                                              ignored=["re:.*self_attn.*"])}})
    assert ct.kinds == ("weight_packed", "weight_scale", "weight_shape") and ct.sym
    assert ct.skips("model.layers.3.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"])
    assert not ct.skips("model.layers.3.mlp.experts")
    # a merged layer whose parts are listed partly: refused
    part = resolve_quantization(None, {"quantization_config": qconfig("awq", 128, ignored=["k_proj"])})
    with pytest.raises(ValueError, match="all or none"):
        part.skips("model.layers.0.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"])


@pytest.mark.parametrize("flag,q,match", [
    ("awq", {}, "does not quantize to int4 on load"),
    ("gptq", qconfig("awq", 128), "quant_method='awq'"),
    ("fp8", qconfig("awq", 128), "conflicts with --quantization fp8"),
    (None, dict(qconfig("gptq", 128), bits=8), "bits=8"),
    (None, dict(qconfig("gptq", 128), group_size=-1), "group_size=-1"),
    (None, dict(qconfig("awq", 128), version="gemv"), "version='gemv'"),
    (None, dict(qconfig("compressed-tensors", 128), format="int-quantized"), "format='int-quantized'"),
])
def test_unsupported_variants_are_refused_naming_the_field(flag, q, match):
    with pytest.raises(ValueError, match=match):
        resolve_quantization(flag, {"quantization_config": q} if q else {})
    ct = qconfig("compressed-tensors", 128)
    ct["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(ValueError, match="symmetric=false"):
        resolve_quantization(None, {"quantization_config": ct})
    ct = qconfig("compressed-tensors", 128)
    ct["config_groups"]["group_0"]["weights"]["strategy"] = "channel"
    with pytest.raises(ValueError, match="strategy='channel'"):
        resolve_quantization(None, {"quantization_config": ct})


def test_engine_config_and_cli_accept_int4_methods():
    from moeserve.cli import build_parser, engine_args_from
    from moeserve.config import EngineConfig

    for m in ("awq", "gptq", "compressed-tensors"):
        assert EngineConfig(model="x", quantization=m).quantization == m
        args = build_parser().parse_args(["serve", "some/model", "--quantization", m])
        assert engine_args_from(args)["quantization"] == m


# ---- checkpoints, TP=1 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,method,group,sym,ignored", [
    ("LlamaForCausalLM", "awq", 16, False, None),
    ("LlamaForCausalLM", "gptq", 16, True, None),
    ("LlamaForCausalLM", "gptq", 32, False, ["o_proj"]),  # asymmetric; an unquantized (fp32) layer
    ("LlamaForCausalLM", "compressed-tensors", 16, True, ["re:.*self_attn.*"]),  # Kimi's style of ignore list
    ("Qwen3MoeForCausalLM", "awq", 16, False, None),  # experts w13/w2 per expert
    ("Qwen3MoeForCausalLM", "gptq", 16, False, None),
    ("Qwen3MoeForCausalLM", "compressed-tensors", 16, True, None),
    # Kimi K2 Thinking / K2.5's layout: MLA + routed experts in int4, attention, shared experts and dense MLPs bf16
    ("DeepseekV3ForCausalLM", "compressed-tensors", 16, True, KIMI_IGNORE),
    ("DeepseekV3ForCausalLM", "awq", 8, False, None),  # every projection, MLA's kv_b_proj dequantized after load
])
def test_int4_checkpoint_matches_dequantized(tmp_path, arch, method, group, sym, ignored):
    q, deq = make_int4_pair(tmp_path, arch, method, group, sym, ignored)
    # --quantization may name the checkpoint's method (vLLM semantics) or be left out
    _assert_same(_generate(q, **({"quantization": method} if arch == "LlamaForCausalLM" else {})), _generate(deq))


def test_int4_weights_are_packed_in_memory(tmp_path):
    from moeserve.config import EngineConfig
    from moeserve.loader.model_loader import load_model

    q, _ = make_int4_pair(tmp_path, "Qwen3MoeForCausalLM", "awq", 16, ignored=["o_proj"])
    m = load_model(EngineConfig(model=q), torch.device("cpu"), torch.float32).model
    params = dict(m.named_parameters())
    qkv = "model.layers.0.self_attn.qkv_proj."
    assert params[qkv + "qweight"].dtype == torch.int32 and params[qkv + "qweight"].shape == (128 + 64 + 64, 64 // 8)
    assert params[qkv + "scales"].shape == (256, 64 // 16) and params[qkv + "qzeros"].dtype == torch.uint8
    assert params[qkv + "scales"].dtype == torch.float16  # as AWQ ships them: 2 bytes per group
    assert params["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32  # not converted
    w13 = next(n for n in params if n.endswith("experts.w13_qweight"))
    assert params[w13].shape == (8, 96, 64 // 8) and params[w13.replace("w13_", "w2_")].shape == (8, 64, 48 // 8)
    assert not any(n.endswith("experts.w13") for n in params)


def test_bad_tensor_is_named(tmp_path):
    q, _ = make_int4_pair(tmp_path, "LlamaForCausalLM", "gptq", 16)
    f = Path(q) / "model.safetensors"
    tensors = load_file(str(f))
    bad = "model.layers.0.self_attn.k_proj.scales"
    tensors[bad] = torch.ones(3, 4, dtype=torch.float16)
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        LLM(model=q, device="cpu")
    tensors = load_file(str(f))
    tensors[bad] = tensors[bad.replace("k_proj", "v_proj")].clone()
    gidx = "model.layers.1.mlp.up_proj.g_idx"
    tensors[gidx] = tensors[gidx].flip(0).contiguous()  # act-order
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=gidx.replace(".", r"\.") + ".*desc_act"):
        LLM(model=q, device="cpu")


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_activation_order_matches_dequantized(tmp_path, sym):
    """desc_act=true: each input's group follows a random order (q/k/v and gate/up share theirs); the stored
    columns are sorted by group once and the activations gathered alike, so the logits equal the dequantized
    model's."""
    q, deq = make_int4_pair(tmp_path, "LlamaForCausalLM", "gptq", 16, sym=sym, act_order=True)
    llm = LLM(model=q, device="cpu")
    layer = llm.llm_engine.model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert not torch.equal(layer.act_perm, torch.arange(layer.act_perm.numel()))  # a real reordering
    w = layer.quant_method.dequantize(layer)  # back in the checkpoint's input order
    ref_w = torch.cat([load_file(str(Path(deq) / "model.safetensors"))[f"model.layers.0.self_attn.{p}_proj.weight"]
                       for p in "qkv"])
    torch.testing.assert_close(w, ref_w)
    _assert_same(_generate(q), _generate(deq))


def test_gptq_activation_order_refusals(tmp_path):
    """Merged parts with different orders, and experts, are refused naming the layer."""
    q, _ = make_int4_pair(tmp_path / "a", "LlamaForCausalLM", "gptq", 16, act_order=True)
    f = Path(q) / "model.safetensors"
    tensors = load_file(str(f))
    k = "model.layers.1.self_attn.k_proj.g_idx"
    tensors[k] = tensors[k].flip(0).contiguous()  # still a valid order, not q_proj's
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj.*different activation orders"):
        LLM(model=q, device="cpu")
    moe, _ = make_int4_pair(tmp_path / "b", "Qwen3MoeForCausalLM", "gptq", 16, act_order=True)
    with pytest.raises(ValueError, match="activation-order .*experts are not supported"):
        LLM(model=moe, device="cpu")


def test_gptq_activation_order_under_tp2_refuses_row_parallel_layers(tmp_path):
    """A row-parallel layer's TP split cuts its input, whose order spans both ranks: refused on every rank."""
    from dist_harness import run_ranks

    q, _ = make_int4_pair(tmp_path, "LlamaForCausalLM", "gptq", 16, act_order=True)
    errors = run_ranks(2, _tp_rank_error, q)
    assert all(e and "o_proj" in e and "row-parallel" in e for e in errors), errors


def test_dummy_load_of_int4_config(tmp_path):
    from moeserve.config import EngineConfig
    from moeserve.loader.model_loader import load_model

    q, _ = make_int4_pair(tmp_path, "Qwen3MoeForCausalLM", "compressed-tensors", 16)
    cfg = str(Path(q) / "config.json")
    m = load_model(EngineConfig(model=cfg, load_format="dummy"), torch.device("cpu"), torch.float32).model
    p = dict(m.named_parameters())
    assert p["model.layers.1.mlp.gate_up_proj.weight_packed"].dtype == torch.int32
    w = m.get_submodule("model.layers.1.mlp.gate_up_proj").quant_method.dequantize(
        m.get_submodule("model.layers.1.mlp.gate_up_proj"))
    assert 0 < w.abs().max() <= 1e-3 + 1e-9
    out = LLM(model=cfg, load_format="dummy", block_size=8, device="cpu").generate(
        [{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


# ---- TP=2 --------------------------------------------------------------------------------------------------------

def _tp_rank(rank: int, path: str, ep: bool = False):
    from moeserve.distributed.parallel_state import ParallelLayout, initialize_model_parallel

    initialize_model_parallel(ParallelLayout(tp=2, enable_expert_parallel=ep))
    return _generate(path)


def _tp_rank_error(rank: int, path: str):
    from moeserve.distributed.parallel_state import ParallelLayout, initialize_model_parallel

    initialize_model_parallel(ParallelLayout(tp=2))
    try:
        LLM(model=path, device="cpu")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("arch,method,group,ep", [("LlamaForCausalLM", "awq", 16, False),
                                                  ("Qwen3MoeForCausalLM", "compressed-tensors", 8, False),
                                                  ("Qwen3MoeForCausalLM", "gptq", 16, True)])  # experts whole
def test_int4_tp2_matches_dequantized(tmp_path, arch, method, group, ep):
    from dist_harness import run_ranks

    q, deq = make_int4_pair(tmp_path, arch, method, group, sym=False)
    ref = _generate(deq)
    ranks = run_ranks(2, _tp_rank, q, ep)
    assert ranks[0] == ranks[1]
    _assert_same(ranks[0], ref)


def _tp_rank_dummy(rank: int, cfg: str):
    from moeserve.distributed.parallel_state import ParallelLayout, initialize_model_parallel

    initialize_model_parallel(ParallelLayout(tp=2))
    llm = LLM(model=cfg, load_format="dummy", block_size=8, device="cpu")
    model = llm.llm_engine.model
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "experts" in n or "qkv" in n}
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    return shapes, out[0].outputs[0].token_ids


def test_dummy_int4_tp2_builds_each_ranks_shard(tmp_path):
    from dist_harness import run_ranks

    q, _ = make_int4_pair(tmp_path, "Qwen3MoeForCausalLM", "compressed-tensors", 8)
    (shapes, tokens), (shapes1, tokens1) = run_ranks(2, _tp_rank_dummy, str(Path(q) / "config.json"))
    assert tokens == tokens1 and len(tokens) == 3 and shapes == shapes1
    w13 = next(n for n in shapes if n.endswith("experts.w13_weight_packed"))
    assert shapes[w13] == (8, 2 * 24, 64 // 8)  # this rank's half of the moe intermediate
    assert shapes["model.layers.0.self_attn.qkv_proj.weight_packed"] == (64 + 32 + 32, 64 // 8)


def test_tp_split_inside_a_group_is_refused(tmp_path):
    from dist_harness import run_ranks

    q, _ = make_int4_pair(tmp_path, "LlamaForCausalLM", "gptq", 32)  # o_proj 64 -> 32 ok; down 96 -> 48 cuts 32
    errors = run_ranks(2, _tp_rank_error, q)
    assert errors[0] and "cuts a 32-wide int4 quantization group" in errors[0]


# ---- planner -----------------------------------------------------------------------------------------------------

_QWEN3_30B = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
              "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
              "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_planner_and_startup_fit_size_int4_checkpoints_as_int4(method):
    from moeserve.plan.arch import read_arch
    from moeserve.plan.fit import check_startup_fit

    q = dict(_QWEN3_30B, quantization_config=qconfig(method, 128))
    assert read_arch(q).native_precision == "int4"
    kw = dict(weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=4096, device_memory_bytes=80 * 2 ** 30,
              memory_utilization=0.9)
    w_bf16 = check_startup_fit(read_arch(_QWEN3_30B), **kw).weights
    w_int4 = check_startup_fit(read_arch(q), **kw).weights
    assert w_int4 < 0.4 * w_bf16


def test_compressed_tensors_weight_shape_is_checked(tmp_path):
    q, _ = make_int4_pair(tmp_path, "Qwen3MoeForCausalLM", "compressed-tensors", 16)
    f = Path(q) / "model.safetensors"
    tensors = load_file(str(f))
    for bad in ("model.layers.0.self_attn.v_proj.weight_shape", "model.layers.0.mlp.experts.3.down_proj.weight_shape"):
        t = dict(tensors)
        t[bad] = torch.tensor([7, 64])
        save_file(t, str(f))
        with pytest.raises(ValueError, match=bad.replace(".", r"\.") + r"' says \(7, 64\)"):
            LLM(model=q, device="cpu")
    missing = "model.layers.2.mlp.experts.5.up_proj.weight_scale"
    save_file({k: v for k, v in tensors.items() if k != missing}, str(f))
    with pytest.raises(ValueError, match=r"no weights for parameter .*experts\.w13_weight_scale"):
        LLM(model=q, device="cpu")


def test_scales_that_the_held_dtype_cannot_represent_are_refused(tmp_path):
    """GPTQ scales are held in fp16 (the format's dtype); a checkpoint whose bf16 scales fp16 cannot hold exactly
    is refused, naming the tensor, rather than rounded silently."""
    q, _ = make_int4_pair(tmp_path, "LlamaForCausalLM", "gptq", 16)
    f = Path(q) / "model.safetensors"
    tensors = load_file(str(f))
    bad = "model.layers.1.self_attn.o_proj.scales"
    tensors[bad] = tensors[bad].to(torch.bfloat16)  # exact in fp16: loads
    save_file(tensors, str(f))
    LLM(model=q, device="cpu")
    tensors[bad][0, 0] = 1e-9
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=bad.replace(".", r"\.") + ".*not represent exactly"):
        LLM(model=q, device="cpu")
