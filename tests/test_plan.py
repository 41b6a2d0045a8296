"""`moeserve plan`: fit verdicts that follow from the arithmetic, warnings, the --json schema, the start-up check."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from moeserve.plan.arch import load_config, read_arch
from moeserve.plan.cli import main
from moeserve.plan.fit import check_startup_fit
from moeserve.plan.hardware import GPUS, GiB, parse_gpus
from moeserve.plan.memory import PRECISIONS, kv_bytes_per_token_per_gpu, weight_bytes, weight_bytes_per_gpu, Shard
from moeserve.plan.planner import PlanRequest, make_plan

H100 = GPUS["H100-80GB"].memory_bytes


def plan(model, **kw):
    return make_plan(PlanRequest(model, **kw))


# ---------------------------------------------------------------- fit verdicts

def test_deepseek_v3_fp8_needs_two_h100_nodes_with_pp2():
    one = plan("deepseek-ai/DeepSeek-V3", max_model_len=4096)
    assert one.dtype == "fp8"  # the checkpoint's own precision
    assert not one.fits
    # the weights alone overflow the eight GPUs: 671B at ~1 byte > 8 x 79 GiB x 0.9
    assert one.weight_bytes["total"] > 8 * 0.9 * H100
    assert "2 nodes" in one.suggestion
    two = plan("deepseek-ai/DeepSeek-V3", nodes=2, max_model_len=32768)
    assert two.fits
    lay = two.placement.layout
    assert (lay.tp, lay.pp, lay.dp) == (8, 2, 1)
    assert two.placement.weights + two.placement.overhead.total + two.placement.kv_one_seq <= two.placement.budget


def test_kimi_k25_int4_fits_one_h100_node():
    p = plan("moonshotai/Kimi-K2.5", dtype="int4", max_model_len=32768, gpu_memory_utilization=0.95)
    assert p.fits
    assert (p.placement.layout.tp, p.placement.layout.pp) == (8, 1)
    # int4 routed experts (0.5625 B with scales) + bf16 rest: ~554 GiB, under 8 x 79 GiB
    assert 540 * GiB < p.weight_bytes["total"] < 570 * GiB
    assert p.placement.kv_capacity_tokens >= 32768
    # at the default 0.9 the weights leave too little: the plan says so and names the way out
    tight = plan("moonshotai/Kimi-K2.5", dtype="int4", max_model_len=32768)
    assert not tight.fits and "--gpu-memory-utilization 0.95" in tight.suggestion


def test_mixtral_8x7b_bf16_needs_two_h100s():
    one = plan("mistralai/Mixtral-8x7B-v0.1", gpus="1xH100-80GB", dtype="bf16")
    assert not one.fits
    assert one.weight_bytes["total"] > 0.9 * H100  # 46.7B x 2 B = 87 GiB
    two = plan("mistralai/Mixtral-8x7B-v0.1", gpus="2xH100-80GB", dtype="bf16")
    assert two.fits and two.placement.layout.tp == 2
    node = plan("mistralai/Mixtral-8x7B-v0.1", dtype="bf16")  # 8 GPUs: replicas of 2
    lay = node.placement.layout
    assert (lay.tp, lay.dp, lay.gpus) == (2, 4, 8)
    assert node.placement.kv_capacity_tokens == 4 * two.placement.kv_capacity_tokens


def test_llama3_8b_single_gpu_capacity_arithmetic():
    p = plan("meta-llama/Meta-Llama-3-8B", gpus="1xH100-80GB")
    pl = p.placement
    assert p.fits and pl.layout.tp == 1
    assert pl.weights == p.weight_bytes["total"] == 8_030_261_248 * 2
    free = int(0.9 * H100) - pl.weights - pl.overhead.total
    assert pl.kv_capacity_tokens == free // 131072 // 16 * 16
    assert pl.max_concurrency == pl.kv_capacity_tokens // 8192


def test_tp_splits_gqa_kv_but_not_mla_latent():
    q = read_arch(load_config("Qwen/Qwen3-235B-A22B"))
    assert kv_bytes_per_token_per_gpu(q, 2, attn_tp=4) == q.kv_bytes_per_token(2) // 4
    assert kv_bytes_per_token_per_gpu(q, 2, attn_tp=8) == q.kv_bytes_per_token(2) // 4  # 4 KV heads: replicated
    d = read_arch(load_config("deepseek-ai/DeepSeek-V3"))
    assert kv_bytes_per_token_per_gpu(d, 2, attn_tp=8) == d.kv_bytes_per_token(2)
    assert kv_bytes_per_token_per_gpu(d, 2, attn_tp=8, pp=2) == 31 * 576 * 2  # 61 layers -> stages of 31 and 30


def test_weights_per_gpu_split_and_precision_policy():
    s = read_arch(load_config("Qwen/Qwen3-30B-A3B"))
    bf16 = weight_bytes(s, PRECISIONS["bf16"])["total"]
    assert bf16 == 2 * s.param_counts()["total"]
    one = weight_bytes_per_gpu(s, PRECISIONS["bf16"], Shard())
    assert one == bf16
    four = weight_bytes_per_gpu(s, PRECISIONS["bf16"], Shard(attn_tp=4, ep=4))
    router_and_norms = 2 * (s.param_counts()["router"] + s.param_counts()["norms"])
    assert abs(four - (bf16 - router_and_norms) / 4 - router_and_norms) < 1e-6 * bf16
    fp8 = weight_bytes(s, PRECISIONS["fp8"])
    assert fp8["embeddings"] == 2 * s.param_counts()["embeddings"]  # embeddings stay bf16
    assert fp8["routed_experts"] < 1.001 * s.param_counts()["routed_experts"]
    int4 = weight_bytes(s, PRECISIONS["int4"])
    assert int4["attention"] == 2 * s.param_counts()["attention"]  # int4 touches only the routed experts


# ---------------------------------------------------------------- warnings

def test_warning_bf16_where_fp8_halves_gpus():
    p = plan("mistralai/Mixtral-8x7B-v0.1", dtype="bf16")
    assert any("BF16" in w and "fp8" in w for w in p.warnings)
    fp8 = plan("mistralai/Mixtral-8x7B-v0.1", dtype="fp8")
    assert not any("BF16" in w for w in fp8.warnings)


def test_warning_quantized_without_accuracy_gate():
    p = plan("mistralai/Mixtral-8x7B-v0.1", dtype="fp8")
    assert any("accuracy gate" in w for w in p.warnings)
    native = plan("deepseek-ai/DeepSeek-V3", nodes=2, max_model_len=8192)  # ships in FP8
    assert not any("accuracy gate" in w for w in native.warnings)


def test_warning_mla_kv_duplicated_on_tp_ranks():
    p = plan("deepseek-ai/DeepSeek-V3", nodes=2, max_model_len=32768)
    w = [w for w in p.warnings if "MLA" in w]
    assert w and "duplicated" in w[0] and "--attention-dp" in w[0]


def test_warning_ep_spanning_nodes():
    p = plan("deepseek-ai/DeepSeek-V3", nodes=2, attention_dp=True, max_model_len=32768)
    lay = p.placement.layout
    assert (lay.mode, lay.tp, lay.dp, lay.ep) == ("dp_attention", 1, 16, 16)
    assert p.fits
    assert any("spans 2 nodes" in w for w in p.warnings)
    single = plan("Qwen/Qwen3-30B-A3B", attention_dp=True)
    assert not any("spans" in w for w in single.warnings)


def test_warning_max_model_len_at_maximum_with_concurrency():
    p = plan("Qwen/Qwen3-235B-A22B", concurrency=64)
    assert p.settings.max_model_len == p.spec.max_position_embeddings
    w = [w for w in p.warnings if "model maximum" in w]
    assert w and "64 requested" in w[0]
    best = p.placement.max_len_for(64)
    assert f"--max-model-len {best:,}" in w[0]
    shorter = plan("Qwen/Qwen3-235B-A22B", concurrency=64, max_model_len=best)
    assert shorter.placement.max_concurrency >= 64
    assert not any("requested" in w for w in shorter.warnings)


# ---------------------------------------------------------------- commands, JSON, CLI

def test_commands_match_layout():
    p = plan("deepseek-ai/DeepSeek-V3", nodes=2, max_model_len=32768)
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in p.commands["vllm"]
    assert "--distributed-executor-backend ray" in p.commands["vllm"]
    assert p.commands["moeserve"].count("moeserve serve deepseek-ai/DeepSeek-V3") == 1
    m = plan("mistralai/Mixtral-8x7B-v0.1", dtype="fp8", gpus="2xH100-80GB")
    lines = [l for l in m.commands["vllm"].splitlines() if "vllm serve" in l]
    assert len(lines) == 2 and "CUDA_VISIBLE_DEVICES=1 " in lines[1] and "--quantization fp8" in lines[0]
    dense = plan("meta-llama/Meta-Llama-3-8B")
    assert "--data-parallel-size 8" in dense.commands["moeserve"]


def test_int4_plans_point_at_an_int4_checkpoint_and_int8_is_not_run_yet():
    """Neither engine quantizes to int4 on load; moeserve serves int4 checkpoints (AWQ, GPTQ, compressed-tensors),
    so its command runs as printed, behind a note to use one. int8 weights it does not serve yet: said so."""
    kimi = plan("moonshotai/Kimi-K2.5", dtype="int4", max_model_len=32768, gpu_memory_utilization=0.95)
    assert kimi.commands["moeserve"].startswith("moeserve serve moonshotai/Kimi-K2.5")  # ships int4: as printed
    k = plan("Qwen/Qwen3-30B-A3B", dtype="int4").commands
    for engine in ("moeserve", "vllm"):
        assert "--quantization" not in k[engine]
        assert "point it at a int4 checkpoint" in k[engine]
    assert "does not run" not in k["moeserve"] and "AWQ, GPTQ or compressed-tensors" in k["moeserve"]
    q = plan("Qwen/Qwen3-30B-A3B", dtype="int8").commands["moeserve"]
    assert q.startswith("# moeserve does not run int8 weights yet")


JSON_KEYS = {"params_total", "params_active", "weight_bytes", "kv_bytes_per_token", "layout", "gpus", "fits",
             "per_gpu", "kv_capacity_tokens", "max_concurrency", "commands", "warnings"}


def test_cli_json_schema(capsys):
    rc = main(["deepseek-ai/DeepSeek-V3", "--gpus", "8xH100-80GB", "--nodes", "2", "--max-model-len", "32768",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert JSON_KEYS <= set(out)
    assert set(out["layout"]) >= {"tp", "pp", "ep", "dp"}
    assert set(out["per_gpu"]) >= {"weights", "kv", "overhead", "capacity"}
    assert set(out["commands"]) == {"moeserve", "vllm"}
    assert out["fits"] is True and out["gpus"] == 16 and out["kv_bytes_per_token"] == 70272
    assert out["per_gpu"]["weights"] + out["per_gpu"]["kv"] + out["per_gpu"]["overhead"] == out["per_gpu"]["capacity"]
    assert isinstance(out["warnings"], list)


def test_cli_text_and_exit_codes(capsys, tmp_path):
    assert main(["mistralai/Mixtral-8x7B-v0.1", "--gpus", "1xH100-80GB", "--dtype", "bf16"]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "routed experts" in text and "vllm serve" in text
    assert main(["no/such-model"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["Qwen/Qwen3-30B-A3B", "--gpus", "8xH999"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert main(["Qwen/Qwen3-30B-A3B", "--max-model-len", "10000000"]) == 2
    assert main(["--list"]) == 0
    assert "deepseek-ai/DeepSeek-V3" in capsys.readouterr().out


def test_parse_gpus():
    f = parse_gpus("8xH100-80GB", nodes=2)
    assert (f.gpus_per_node, f.nodes, f.total_gpus, f.gpu.name) == (8, 2, 16, "H100-80GB")
    assert parse_gpus("4x80GB").gpu.memory_bytes == 80_000_000_000
    assert parse_gpus("h200").gpu.name == "H200"
    with pytest.raises(ValueError, match="unknown GPU"):
        parse_gpus("8xTPU")


def test_plan_is_fast_and_imports_no_torch():
    t0 = time.perf_counter()
    for name in ("deepseek-ai/DeepSeek-V3", "moonshotai/Kimi-K2.5", "zai-org/GLM-5"):
        plan(name, gpus="1xA100-40GB", dtype="bf16")  # the slow path: searches many nodes for a suggestion
    assert (time.perf_counter() - t0) / 3 < 0.5
    code = ("import sys, moeserve.plan.cli, moeserve.plan.fit, moeserve.plan.planner;"
            "from moeserve.plan.planner import make_plan, PlanRequest; make_plan(PlanRequest('Qwen/Qwen3-30B-A3B'));"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the engine's start-up check

def test_startup_fit_refuses_with_numbers_and_suggestion():
    spec = read_arch(load_config("mistralai/Mixtral-8x7B-v0.1"))
    t0 = time.perf_counter()
    v = check_startup_fit(spec, weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=32768,
                          device_memory_bytes=H100, memory_utilization=0.9, tp=1)
    assert time.perf_counter() - t0 < 0.1
    assert not v.fits
    assert v.weights == 2 * spec.param_counts()["total"]
    assert v.kv_one_seq == 32768 * 131072
    assert "GiB" in v.message and "does not fit" in v.message
    assert "--tensor-parallel-size 2" in v.suggestion and "fp8" in v.suggestion
    ok = check_startup_fit(spec, weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=32768,
                           device_memory_bytes=H100, memory_utilization=0.9, tp=2, enable_expert_parallel=True)
    assert ok.fits and ok.suggestion == "" and ok.kv_capacity_tokens > 32768


def test_startup_fit_spreads_experts_over_dp_ranks_with_expert_parallel():
    """DP attention + EP (`-dp 8 --enable-expert-parallel`, vLLM's flagship MoE layout): every rank checks that
    its 1/8 of the routed experts and the whole attention fit, as the engine places them; not all experts on one
    GPU (which refused DeepSeek-V3 on 8 x H200 before any weight loaded)."""
    spec = read_arch(load_config("deepseek-ai/DeepSeek-V3"))
    kw = dict(weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=8192, device_memory_bytes=int(141 * GiB),
              memory_utilization=0.9)
    one = check_startup_fit(spec, **kw, dp=1, enable_expert_parallel=True)
    dp8 = check_startup_fit(spec, **kw, dp=8, enable_expert_parallel=True)
    tp8 = check_startup_fit(spec, **kw, tp=8, enable_expert_parallel=True)
    assert not one.fits and dp8.fits and tp8.fits
    assert dp8.weights < one.weights / 6
    assert tp8.weights < dp8.weights  # TP also splits the attention; DP keeps it whole on each rank
    assert "dp=8" in dp8.message


def test_startup_fit_suggests_shorter_context():
    spec = read_arch(load_config("Qwen/Qwen3-30B-A3B"))
    v = check_startup_fit(spec, weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=40960,
                          device_memory_bytes=int(64 * GiB), memory_utilization=0.95)
    assert not v.fits and "--max-model-len" in v.suggestion
    longest = int(v.suggestion.split("--max-model-len ")[1].split()[0].rstrip(","))
    assert check_startup_fit(spec, weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=longest,
                             device_memory_bytes=int(64 * GiB), memory_utilization=0.95).fits
    assert not check_startup_fit(spec, weight_dtype_bytes=2, kv_dtype_bytes=2, max_model_len=longest + 16,
                                 device_memory_bytes=int(64 * GiB), memory_utilization=0.95).fits


def test_replicas_tensor_shard_experts_where_they_split_into_whole_blocks():
    """A TP replica suggests no --enable-expert-parallel when the experts' intermediate dim splits evenly (TP=4
    beat TP=4+EP at every batch size on 4xH200, both engines); EP where it does not split, and always under
    DP attention; the engine's own EP size with the flag is unchanged."""
    from dataclasses import replace

    from moeserve.plan.layout import dp_attention_layout, expert_parallel_size, suggested_expert_parallel

    qwen = read_arch(load_config("Qwen/Qwen3-235B-A22B"))  # 128 experts, intermediate 1536
    assert suggested_expert_parallel(qwen, 4) == 1 and expert_parallel_size(qwen, 4) == 4
    assert suggested_expert_parallel(replace(qwen, moe_intermediate_size=1538), 4) == 4  # 1538 / 4 is not whole
    fp8 = replace(qwen, native_precision="fp8")  # 1536 / 8 = 192: not whole 128-blocks
    assert suggested_expert_parallel(fp8, 4) == 1 and suggested_expert_parallel(fp8, 8) == 8
    from moeserve.plan.commands import launch_commands

    plan = make_plan(PlanRequest("Qwen/Qwen3-235B-A22B", gpus="4xH200-141GB"))
    assert (plan.placement.layout.tp, plan.placement.layout.ep) == (4, 1)
    assert "--enable-expert-parallel" not in launch_commands(plan)["moeserve"]
    assert dp_attention_layout(qwen, parse_gpus("4xH200-141GB")).ep == 4
