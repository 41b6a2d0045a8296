"""FP8 weights (issue 19.1/19.2/19.4): block-scaled fp8 checkpoints as DeepSeek-V3 / Qwen3-*-FP8 ship them, and
online fp8 of a bf16 checkpoint, on the CPU reference path (dequantize, then the dense matmul).

The test quantizes a tiny random checkpoint to block fp8 itself (layers/quant/fp8.quantize_blocks) and writes a
second checkpoint holding the dequantized weights in fp32: moeserve loading the fp8 one must give the logprobs of
the dequantized one and the same greedy tokens, at TP=1 and TP=2 (gloo).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.layers.quant.fp8 import FP8, _expand, quantize_blocks, quantize_rows, resolve_quantization

NEW_TOKENS = 6
PROMPTS = [[5, 17, 42], list(range(3, 40, 3))]


def _quantizable(name: str, t: torch.Tensor) -> bool:
    """What the published fp8 checkpoints quantize: every projection; not embeddings, head, norms or the router."""
    return (t.dim() == 2 and name.endswith(".weight") and ".mlp.gate." not in name
            and not any(s in name for s in ("embed_tokens", "lm_head", "norm")))


def make_fp8_pair(tmp: Path, arch: str, block: tuple[int, int], ignored: list[str] | None = None, ct: bool = False,
                  **overrides):
    """(fp8 checkpoint dir, dequantized fp32 checkpoint dir) of one tiny random model; ct: as compressed-tensors
    writes block fp8 (strategy block, scales named weight_scale)."""
    src = Path(make_tiny_checkpoint(tmp / "src", arch, **overrides))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if _quantizable(name, t) and not any(f".{i}." in f".{name}" for i in ignored or []):
            q, s = quantize_blocks(t, block)
            fp8[name], fp8[name.replace(".weight", ".weight_scale" if ct else ".weight_scale_inv")] = q, s
            deq[name] = _expand(q, s, *block)
        else:
            fp8[name] = deq[name] = t
    cfg = json.loads((src / "config.json").read_text())
    out = []
    qcfg = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(block),
                **({"modules_to_not_convert": ignored} if ignored else {}))
    if ct:
        qcfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ignored or [],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "strategy": "block", "block_structure": list(block)},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "group",
                                          "group_size": block[1], "dynamic": True}}}}
    for sub, weights, qcfg in (("fp8", fp8, qcfg), ("deq", deq, None)):
        d = tmp / sub
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
        c = dict(cfg, **({"quantization_config": qcfg} if qcfg else {}))
        (d / "config.json").write_text(json.dumps(c))
        out.append(str(d))
    return out


def _generate(path: str, **kw):
    llm = LLM(model=path, block_size=8, max_num_seqs=4, device="cpu", **kw)  # the reference path, on any machine
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


def _model_of(llm):
    return llm.llm_engine.model if hasattr(llm, "llm_engine") else None


# ---- config ----------------------------------------------------------------------------------------------------

def test_resolve_quantization():
    fp8 = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128], "ignored_layers": ["lm_head"]}}
    q = resolve_quantization(None, fp8)
    assert q.block == (128, 128) and not q.online and q.skips("lm_head")
    assert resolve_quantization("fp8", fp8).block == (128, 128)  # the flag agrees with the checkpoint
    assert resolve_quantization("fp8", {}).online
    assert resolve_quantization(None, {}) is None
    with pytest.raises(ValueError, match="conflicts with --quantization fp8"):
        resolve_quantization("fp8", {"quantization_config": {"quant_method": "awq"}})
    with pytest.raises(ValueError, match="only fp8"):
        resolve_quantization("int4", {})
    with pytest.raises(ValueError, match="activation_scheme"):
        resolve_quantization(None, {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static",
                                                            "weight_block_size": [128, 128]}})


def test_quantize_blocks_round_trip():
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(0))
    q, s = quantize_blocks(w, (16, 32))
    assert q.dtype == FP8 and s.shape == (3, 3)
    # e4m3: 3 mantissa bits, 1/16 relative at most for normal values (the smallest of a block may be subnormal)
    assert ((_expand(q, s, 16, 32) - w).norm() / w.norm()).item() < 0.04
    assert s.amax() == w.abs().amax() / 448
    q, s = quantize_rows(w)
    assert s.shape == (40, 1)
    assert ((q.float() * s - w).norm() / w.norm()).item() < 0.04


# ---- block fp8 checkpoints, TP=1 -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,block,ignored,ct", [
    ("LlamaForCausalLM", (16, 16), None, False),
    ("LlamaForCausalLM", (32, 48), ["o_proj"], False),  # partial blocks at the edges; an ignored (bf16) layer
    ("Qwen3MoeForCausalLM", (8, 8), None, False),  # experts w13/w2 with per-expert scale blocks
    ("DeepseekV3ForCausalLM", (8, 8), None, False),  # MLA: kv_b_proj dequantized after load (the attention reads it)
    ("Qwen3MoeForCausalLM", (8, 8), ["o_proj"], True),  # compressed-tensors' block strategy, scales as weight_scale
])
def test_fp8_checkpoint_matches_dequantized(tmp_path, arch, block, ignored, ct):
    fp8, deq = make_fp8_pair(tmp_path, arch, block, ignored, ct=ct)
    _assert_same(_generate(fp8), _generate(deq))


def test_fp8_weights_are_fp8_in_memory(tmp_path):
    from moeserve.config import EngineConfig
    from moeserve.loader.model_loader import load_model

    fp8, _ = make_fp8_pair(tmp_path, "Qwen3MoeForCausalLM", (8, 8), ["o_proj"])
    m = load_model(EngineConfig(model=fp8), torch.device("cpu"), torch.float32).model
    params = dict(m.named_parameters())
    assert params["model.layers.0.self_attn.qkv_proj.weight"].dtype == FP8
    assert params["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].shape == ((128 + 64 + 64) // 8, 64 // 8)
    assert params["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32  # not converted
    experts = [n for n in params if n.endswith("experts.w13")]
    assert experts and params[experts[0]].dtype == FP8
    assert params[experts[0] + "_weight_scale_inv"].shape == (8, 2 * 48 // 8, 64 // 8)


def test_missing_or_misshaped_scale_names_the_tensor(tmp_path):
    fp8, _ = make_fp8_pair(tmp_path, "LlamaForCausalLM", (16, 16))
    f = Path(fp8) / "model.safetensors"
    tensors = load_file(str(f))
    missing = "model.layers.1.mlp.up_proj.weight_scale_inv"
    bad = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    save_file({k: v for k, v in tensors.items() if k != missing}, str(f))
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        LLM(model=fp8, device="cpu")
    tensors[bad] = torch.ones(3, 4)
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        LLM(model=fp8, device="cpu")


def test_dummy_load_of_fp8_config(tmp_path):
    from moeserve.config import EngineConfig
    from moeserve.loader.model_loader import load_model

    fp8, _ = make_fp8_pair(tmp_path, "Qwen3MoeForCausalLM", (8, 8))
    m = load_model(EngineConfig(model=str(Path(fp8) / "config.json"), load_format="dummy"),
                   torch.device("cpu"), torch.float32).model
    w = dict(m.named_parameters())["model.layers.1.mlp.gate_up_proj.weight"]  # the dense (mlp_only) layer
    assert w.dtype == FP8 and w.float().abs().max() > 1  # real fp8 codes, scaled down by the scales
    out = LLM(model=str(Path(fp8) / "config.json"), load_format="dummy", block_size=8, device="cpu").generate(
        [{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


# ---- online fp8 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3MoeForCausalLM"])
def test_online_fp8_matches_per_channel_dequantized(tmp_path, arch):
    """--quantization fp8 on a bf16/fp32 checkpoint: every projection and expert quantized per output row on load."""
    src = Path(make_tiny_checkpoint(tmp_path / "src", arch))
    tensors = load_file(str(src / "model.safetensors"))
    deq = {k: (lambda q, s: q.float() * s)(*quantize_rows(v)) if _quantizable(k, v) else v for k, v in tensors.items()}
    d = tmp_path / "deq"
    shutil.copytree(src, d)
    save_file(deq, str(d / "model.safetensors"))
    _assert_same(_generate(str(src), quantization="fp8"), _generate(str(d)))


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


@pytest.mark.parametrize("arch,block,ep", [("LlamaForCausalLM", (16, 16), False),
                                           ("Qwen3MoeForCausalLM", (8, 8), False),
                                           ("Qwen3MoeForCausalLM", (8, 8), True),  # experts whole, 4 per rank
                                           ("DeepseekV3ForCausalLM", (8, 8), False)])
def test_fp8_tp2_matches_tp1(tmp_path, arch, block, ep):
    from dist_harness import run_ranks

    fp8, deq = make_fp8_pair(tmp_path, arch, block)
    ref = _generate(deq)
    ranks = run_ranks(2, _tp_rank, fp8, ep)
    assert ranks[0] == ranks[1]
    _assert_same(ranks[0], ref)


def test_tp_split_inside_a_block_is_refused(tmp_path):
    from dist_harness import run_ranks

    fp8, _ = make_fp8_pair(tmp_path, "LlamaForCausalLM", (64, 64))  # intermediate 96 -> 48 per rank
    errors = run_ranks(2, _tp_rank_error, fp8)
    assert errors[0] and "cuts a 64-wide fp8 scale block" in errors[0]


# ---- per-channel and per-tensor fp8 checkpoints ---------------------------------------------------------------

CT_IGNORE = ["lm_head", "re:.*mlp\\.gate$"]


def _quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor: (e4m3 weight, fp32 scale of shape [])."""
    s = (w.float().abs().amax() / 448).clamp(min=1e-12)
    return (w.float() / s).clamp(-448, 448).to(FP8), s


def make_fp8_rows_pair(tmp: Path, arch: str, strategy: str, style: str):
    """(fp8 checkpoint dir, dequantized fp32 dir): every projection fp8 with a `weight_scale` per output channel
    ([N, 1]) or per tensor ([]), as compressed-tensors (`style="ct"`) or AutoFP8 (`"autofp8"`: quant_method fp8
    with no block size, static activations: an `input_scale` beside each weight) write them."""
    src = Path(make_tiny_checkpoint(tmp / "src", arch))
    tensors = load_file(str(src / "model.safetensors"))
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if _quantizable(name, t):
            q, sc = quantize_rows(t) if strategy == "channel" else _quantize_tensor(t)
            fp8[name], fp8[name.replace(".weight", ".weight_scale")] = q, sc
            if style == "autofp8":
                fp8[name.replace(".weight", ".input_scale")] = torch.tensor(0.02)
            deq[name] = q.float() * sc
        else:
            fp8[name] = deq[name] = t
    if style == "ct":
        qcfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": CT_IGNORE,
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
                                "dynamic": False},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
    else:
        qcfg = {"quant_method": "fp8", "activation_scheme": "static"}
    out = []
    for sub, weights, q in (("fp8", fp8, qcfg), ("deq", deq, None)):
        d = tmp / sub
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
        cfg = json.loads((src / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, **({"quantization_config": q} if q else {}))))
        out.append(str(d))
    return out


def test_resolve_per_channel_and_per_tensor_fp8():
    from moeserve.layers.quant import resolve_quantization as resolve_any
    from moeserve.layers.quant.fp8 import Fp8Config

    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": CT_IGNORE,
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                     "strategy": "tensor"}}}}
    q = resolve_any(None, {"quantization_config": ct})
    assert isinstance(q, Fp8Config) and q.block is None and q.scale_name == "weight_scale" and not q.online
    assert q.skips("lm_head") and q.skips("model.layers.3.mlp.gate") and not q.skips("model.layers.3.mlp.gate_up_proj")
    assert resolve_any("compressed-tensors", {"quantization_config": ct}) == q
    autofp8 = resolve_quantization(None, {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}})
    assert not autofp8.online and autofp8.block is None and autofp8.scale_name == "weight_scale"
    block = dict(ct, config_groups={"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                                      "block_structure": [128, 128]}}})
    assert resolve_any(None, {"quantization_config": block}).block == (128, 128)
    group = dict(ct, config_groups={"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group"}}})
    with pytest.raises(ValueError, match="strategy='group'"):
        resolve_any(None, {"quantization_config": group})


@pytest.mark.parametrize("arch,strategy,style", [
    ("LlamaForCausalLM", "channel", "ct"),
    ("LlamaForCausalLM", "tensor", "autofp8"),  # q/k/v and gate/up each with its own scale, merged
    ("Qwen3MoeForCausalLM", "channel", "ct"),  # experts with per-expert row scales
    ("Qwen3MoeForCausalLM", "tensor", "ct"),
    ("DeepseekV3ForCausalLM", "tensor", "autofp8"),  # MLA: kv_b_proj dequantized after load
])
def test_per_channel_and_per_tensor_fp8_match_dequantized(tmp_path, arch, strategy, style):
    fp8, deq = make_fp8_rows_pair(tmp_path, arch, strategy, style)
    _assert_same(_generate(fp8), _generate(deq))


def test_per_tensor_fp8_is_fp8_in_memory_and_names_a_missing_or_misshaped_scale(tmp_path):
    from moeserve.config import EngineConfig
    from moeserve.loader.model_loader import load_model

    fp8, _ = make_fp8_rows_pair(tmp_path, "Qwen3MoeForCausalLM", "tensor", "ct")
    m = load_model(EngineConfig(model=fp8), torch.device("cpu"), torch.float32).model
    params = dict(m.named_parameters())
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert params[f"{qkv}.weight"].dtype == FP8 and params[f"{qkv}.weight_scale_inv"].shape == (128 + 64 + 64, 1)
    scales = params[f"{qkv}.weight_scale_inv"][:, 0]
    assert len(set(scales[:128].tolist())) == 1 and scales[0] != scales[128]  # q's one scale, then k's
    experts = next(n for n in params if n.endswith("experts.w13"))
    assert params[experts].dtype == FP8 and params[experts + "_weight_scale_inv"].shape == (8, 2 * 48, 1)
    f = Path(fp8) / "model.safetensors"
    tensors = load_file(str(f))
    missing = "model.layers.1.self_attn.v_proj.weight_scale"
    bad = "model.layers.0.mlp.experts.3.down_proj.weight_scale"
    save_file({k: v for k, v in tensors.items() if k != missing}, str(f))
    with pytest.raises(ValueError, match=missing.replace(".", r"\.") + "'"):
        LLM(model=fp8, device="cpu")
    tensors[bad] = torch.ones(3)
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=bad.replace(".", r"\.") + "'"):
        LLM(model=fp8, device="cpu")


@pytest.mark.parametrize("arch,strategy,ep", [("LlamaForCausalLM", "channel", False),
                                              ("Qwen3MoeForCausalLM", "channel", False),  # each rank 1/2 of I
                                              ("Qwen3MoeForCausalLM", "tensor", True)])
def test_per_row_fp8_tp2_matches_tp1(tmp_path, arch, strategy, ep):
    from dist_harness import run_ranks

    fp8, deq = make_fp8_rows_pair(tmp_path, arch, strategy, "ct")
    ref = _generate(deq)
    ranks = run_ranks(2, _tp_rank, fp8, ep)
    assert ranks[0] == ranks[1]
    _assert_same(ranks[0], ref)


# ---- planner -----------------------------------------------------------------------------------------------------

def test_planner_sizes_fp8_checkpoint_at_one_byte_per_param():
    from moeserve.plan.arch import read_arch
    from moeserve.plan.memory import native_precision, precision, weight_bytes

    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
           "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
           "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
           "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}}
    assert native_precision(cfg) == "fp8"
    spec = read_arch(cfg)
    fp8, bf16 = weight_bytes(spec, precision("fp8")), weight_bytes(spec, precision("bf16"))
    counts = spec.param_counts()
    for comp, n in counts.items():
        if comp in ("total", "active") or comp not in fp8:
            continue
        if fp8[comp] != bf16[comp]:  # a quantized component: 1 byte per weight + one fp32 per 128x128 block
            assert fp8[comp] == math.ceil(n * (1 + 4 / 128 ** 2))
    assert fp8["total"] < 0.6 * bf16["total"]


def test_online_fp8_storage(tmp_path):
    """What --quantization fp8 keeps: fp8 weights, per-row scales (buffers: not checkpoint tensors), experts too;
    dummy weights with the flag are fp8 as well."""
    from moeserve.config import EngineConfig
    from moeserve.loader.model_loader import load_model

    src = make_tiny_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM")
    for fmt in ("auto", "dummy"):
        m = load_model(EngineConfig(model=src, quantization="fp8", load_format=fmt), torch.device("cpu"),
                       torch.float32).model
        state = dict(m.named_parameters()) | dict(m.named_buffers())
        assert state["model.layers.0.self_attn.qkv_proj.weight"].dtype == FP8
        assert state["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].shape == (128 + 64 + 64, 1)
        w13 = next(k for k in state if k.endswith("experts.w13"))
        assert state[w13].dtype == FP8 and state[w13 + "_weight_scale_inv"].shape == (8, 96, 1)
        assert not any(hasattr(mod, "_fp8_staging") for mod in m.modules())


def test_plan_prints_runnable_fp8_command():
    """`moeserve plan` suggests --quantization fp8: the command runs as printed (no 'does not run' note) and the
    serve parser accepts it."""
    import shlex

    from moeserve.cli import build_parser, engine_args_from
    from moeserve.plan.planner import PlanRequest, make_plan

    cmd = make_plan(PlanRequest("mistralai/Mixtral-8x7B-v0.1", gpus="2xH100-80GB", dtype="fp8")).commands["moeserve"]
    assert "--quantization fp8" in cmd and "does not run" not in cmd
    line = next(l for l in cmd.splitlines() if "moeserve serve" in l)
    argv = shlex.split(line.split("moeserve ", 1)[1].rstrip(" &"))
    assert engine_args_from(build_parser().parse_args(argv))["quantization"] == "fp8"


def test_startup_fit_sizes_an_fp8_checkpoint_as_fp8():
    """The engine's pre-load check passes the model dtype (bf16: 2 bytes); an fp8 checkpoint still weighs
    1 byte/param + scales there, as the planner's reading of its config.json says."""
    from moeserve.plan.arch import read_arch
    from moeserve.plan.fit import check_startup_fit

    base = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}
    fp8 = dict(base, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    kw = dict(weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=4096, device_memory_bytes=80 * 2 ** 30,
              memory_utilization=0.9)
    assert read_arch(fp8).native_precision == "fp8" and read_arch(base).native_precision == "bf16"
    w_bf16, w_fp8 = check_startup_fit(read_arch(base), **kw).weights, check_startup_fit(read_arch(fp8), **kw).weights
    assert 0.45 < w_fp8 / w_bf16 < 0.6
