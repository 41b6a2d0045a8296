"""benchmarks/ on the CPU: roofline arithmetic, workloads, result files, the README report, and one tiny end-to-end
run of the suite (both engines, CPU, a config-only Qwen3-MoE) so the device scripts' plumbing is exercised in CI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import results_io  # noqa: E402
import roofline as rl  # noqa: E402
import shapes  # noqa: E402
import workloads  # noqa: E402


def facts(**kw) -> rl.ModelFacts:
    base = dict(w_dense_bytes=1e9, w_expert_bytes=1e7, n_moe_layers=10, n_experts=16, top_k=2,
                kv_bytes_per_token=1000.0, matmul_params=5e8, lm_head_params=1e8, attn_layers=10, attn_heads=8,
                qk_head_dim=64, v_head_dim=64, total_weight_bytes=5e9)
    return rl.ModelFacts(**{**base, **kw})


# ---------------------------------------------------------------- roofline arithmetic

def test_experts_hit_limits_and_monotone():
    assert rl.experts_hit(0, 128, 8) == 0
    assert rl.experts_hit(1, 128, 8) == pytest.approx(8)
    assert rl.experts_hit(10_000, 128, 8) == pytest.approx(128)
    vals = [rl.experts_hit(b, 64, 6) for b in range(0, 50)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    assert rl.experts_hit(2, 4, 2) == pytest.approx(4 * (1 - 0.25))  # 1 - (1/2)^2 of 4 experts


def test_decode_step_floor_by_hand():
    m = facts()
    bw, peak = 1e12, 1e15
    b, ctx = 4, 100.0
    hit = 16 * (1 - (1 - 2 / 16) ** 4)
    want_bytes = 1e9 + 10 * hit * 1e7 + 4 * 100 * 1000
    assert rl.decode_step_bytes(m, b, ctx) == pytest.approx(want_bytes)
    assert rl.decode_step_floor_s(m, b, ctx, bw, peak) == pytest.approx(want_bytes / bw)  # memory-bound here
    # a slow enough "peak" makes the compute term the floor
    flops = rl.decode_step_flops(m, b, ctx)
    assert flops == pytest.approx(2 * 6e8 * 4 + 2 * 10 * 8 * 4 * 100 * 128)
    assert rl.decode_step_floor_s(m, b, ctx, bw, 1e9) == pytest.approx(flops / 1e9)


def test_prefill_flops_causal_attention():
    m = facts()
    n = 10
    attn = 2 * 10 * 8 * n * ((n + 1) / 2) * 128  # each query i sees i+1 keys
    assert rl.prefill_flops(m, 3, n) == pytest.approx(3 * (2 * 5e8 * n + attn) + 2 * 1e8 * 3)


def test_throughput_floor_waves():
    m = facts()
    bw, peak = 1e12, 1e15
    f = rl.throughput_floor(m, 10, 8, 5, 4, bw, peak)  # waves of 4, 4, then 2
    step = lambda b: rl.decode_step_floor_s(m, b, rl.decode_mean_ctx(8, 5), bw, peak)  # noqa: E731
    assert f["decode_s"] == pytest.approx(2 * 4 * step(4) + 4 * step(2))
    assert f["total_s"] == pytest.approx(f["prefill_s"] + f["decode_s"])
    assert f["output_tok_s"] == pytest.approx(10 * 5 / f["total_s"])
    assert rl.throughput_floor(m, 10, 8, 5, 100, bw, peak)["concurrency"] == 10
    with pytest.raises(ValueError):
        rl.throughput_floor(m, 10, 8, 5, 0, bw, peak)


def test_kv_concurrency():
    assert rl.kv_concurrency(1e6, 100.0, 1000, 256) == 10
    assert rl.kv_concurrency(1e12, 100.0, 1000, 256) == 256
    assert rl.kv_concurrency(-5.0, 100.0, 1000, 256) == 1


def test_qwen3_30b_facts_and_floor():
    m = rl.facts_from_config(shapes.load_config(shapes.get_shape("qwen3-30b-a3b")))
    assert m.n_moe_layers == 48 and m.n_experts == 128 and m.top_k == 8
    assert m.w_expert_bytes == 3 * 2048 * 768 * 2
    assert m.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2
    assert 60e9 < m.total_weight_bytes < 62e9  # "61 GB" in BENCHMARKS.md
    # the memory floor at batch 1: non-expert weights + 8 experts per layer, ~2 ms at 3 TB/s
    assert 1.8 < 1e3 * rl.decode_step_floor_s(m, 1, 256, 3e12, 800e12) < 2.3
    lat = rl.latency_floor_ms(m, (1, 8, 32, 128), 128, 256, 3e12, 800e12)
    steps = [lat["decode_step_ms"][k] for k in ("1", "8", "32", "128")]
    assert steps == sorted(steps) and steps[-1] < 61.2e9 / 3e12 * 1e3 + 1  # never past reading everything once


def test_deepseek_v2_lite_mla_facts():
    m = rl.facts_from_config(shapes.load_config(shapes.get_shape("deepseek-v2-lite")))
    assert (m.n_moe_layers, m.n_experts, m.top_k) == (26, 64, 6)  # first layer dense
    assert (m.qk_head_dim, m.v_head_dim) == (192, 128)
    assert m.kv_bytes_per_token == 27 * (512 + 64) * 2


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(SystemExit, match="pinned shapes"):
        shapes.get_shape("gpt-2")


# ---------------------------------------------------------------- workloads

def test_prompts_reproducible_and_in_range():
    a = workloads.random_prompts(5, 7, 100, seed=3)
    assert a == workloads.random_prompts(5, 7, 100, seed=3)
    assert a != workloads.random_prompts(5, 7, 100, seed=4)
    assert len(a) == 5 and all(len(p) == 7 and all(0 <= t < 100 for t in p) for p in a)
    spec = workloads.LatencySpec()
    r0 = workloads.latency_prompts(spec, 8, 0, 1000)
    assert r0 != workloads.latency_prompts(spec, 8, 1, 1000)  # no prefix-cache reuse across repeats
    tp = workloads.throughput_prompts(workloads.ThroughputSpec(num_requests=3, input_len=4), 50)
    assert [len(p) for p in tp] == [4, 4, 4]
    with pytest.raises(ValueError):
        workloads.random_prompts(0, 4, 100, seed=0)
    with pytest.raises(ValueError):
        workloads.LatencySpec(repeats=0)
    assert workloads.median([3.0, 1.0, 2.0]) == 2.0 and workloads.median([4.0, 1.0]) == 2.5


# ---------------------------------------------------------------- result files and the report

def sample(workload: str) -> dict:
    base = {"date": "2026-11-23", "gpu": "NVIDIA H100 80GB HBM3", "commit": "abcdef1234567", "shape": "qwen3-30b-a3b",
            "workload": workload}
    if workload == "throughput":
        return {**base, "roofline": {"bw_TBps": 3.0, "peak_TFLOPs": 800.0, "throughput": {"output_tok_s": 4000.0}},
                "engines": {"moeserve": {"output_tok_s": 2000.0, "total_tok_s": 10000.0, "num_requests": 1000},
                            "transformers": {"output_tok_s": 250.0, "total_tok_s": 1250.0}}}
    return {**base, "roofline": {"bw_TBps": 3.0, "peak_TFLOPs": 800.0, "decode_step_ms": {"1": 2.0, "8": 8.0}},
            "engines": {"moeserve": {"tpot_ms": {"1": 4.0, "8": 10.0}, "ttft_ms": {"1": 30.0, "8": 40.0}},
                        "transformers": {"tpot_ms": {"1": 40.0, "8": 50.0}, "ttft_ms": {"1": 90.0, "8": 95.0}}}}


def test_gpu_slug_and_stem():
    assert results_io.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert results_io.result_stem("2026-11-23", "NVIDIA H200", "qwen3-30b-a3b", "latency") == \
        "2026-11-23-h200-qwen3-30b-a3b-latency"
    with pytest.raises(ValueError):
        results_io.result_stem("23/11/2026", "NVIDIA H200", "x", "latency")


def test_validate_rejects_what_the_issue_forbids():
    results_io.validate(sample("throughput"))
    results_io.validate(sample("latency"))
    bad = sample("latency")
    bad["engines"]["moeserve"]["tpot_ms"] = {1: 4.0}  # batch keys must be strings
    with pytest.raises(ValueError, match="string"):
        results_io.validate(bad)
    bad = sample("throughput")
    del bad["roofline"]["bw_TBps"]
    with pytest.raises(ValueError, match="bw_TBps"):
        results_io.validate(bad)
    bad = sample("latency")
    del bad["roofline"]["decode_step_ms"]
    with pytest.raises(ValueError, match="decode_step_ms"):
        results_io.validate(bad)
    ok = sample("throughput")
    ok["engines"]["transformers"] = {"error": "out of memory"}  # a failed engine says so and carries no figures
    results_io.validate(ok)


def test_report_rows_percent_and_ratios(tmp_path):
    text = report.summary([sample("throughput"), sample("latency")])
    # throughput: 2000 / 4000 roofline = 50%, 2000 / 250 = 8x
    assert "2,000 (50%)" in text and "8.00x" in text
    # latency batch 1: roofline 2 ms / TPOT 4 ms = 50%; transformers 40 / 4 = 10x; batch 8: 80%, 5x
    assert "4.00 (50%)" in text and "10.00x" in text and "10.00 (80%)" in text and "40.00 (5%)" in text and "5.00x" in text
    assert "3.00 TB/s" in text


def test_merge_engine_adds_vllm_columns(tmp_path):
    path = results_io.write_result(sample("throughput"), tmp_path)
    assert path.name == "2026-11-23-h100-80gb-hbm3-qwen3-30b-a3b-throughput.json"
    results_io.merge_engine(path, "vllm", {"output_tok_s": 1000.0, "total_tok_s": 5000.0})
    merged = json.loads(path.read_text())
    assert set(merged["engines"]) == {"moeserve", "transformers", "vllm"}
    text = report.summary(report.load_results(tmp_path))
    assert "vllm out tok/s" in text and "moeserve / vllm" in text and "2.00x" in text
    with pytest.raises(ValueError):
        results_io.merge_engine(path, "vllm", {"output_tok_s": 1.0})  # lacks total_tok_s


def test_readme_regenerated_between_markers(tmp_path):
    results_io.write_result(sample("latency"), tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    assert report.main(["--results-dir", str(tmp_path), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results-dir", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    assert "| 2026-11-23 | NVIDIA H100 80GB HBM3 | qwen3-30b-a3b | 1 |" in text
    assert report.main(["--results-dir", str(tmp_path), "--readme", str(readme), "--check"]) == 0


def test_repo_readme_matches_repo_results():
    assert report.main(["--check"]) == 0, "benchmarks/README.md is stale: run python benchmarks/report.py"


# ---------------------------------------------------------------- GPU scripts refuse the CPU loudly

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_scripts_fail_loudly_without_cuda():
    import worker_common

    with pytest.raises(SystemExit, match="CUDA"):
        worker_common.require_device(allow_cpu=False)
    with pytest.raises(SystemExit, match="CUDA"):
        rl.measure_ceilings()


# ---------------------------------------------------------------- the suite end to end, tiny, on the CPU

TINY = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 32,
        "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "eos_token_id": 1, "bos_token_id": 0}


@pytest.mark.timeout(400)
def test_suite_end_to_end_tiny_cpu(tmp_path):
    pytest.importorskip("transformers")
    try:
        from moeserve import LLM  # noqa: F401
    except ImportError:
        pytest.skip("moeserve.LLM not available")
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "bench_suite.py"), "--shape", "tiny", "--model", str(model),
           "--out-dir", str(out), "--bw-TBps", "3", "--peak-TFLOPs", "800", "--gpu-name", "NVIDIA Test GPU",
           "--num-requests", "4", "--input-len", "8", "--output-len", "4", "--latency-batches", "1,2",
           "--latency-input-len", "4", "--latency-output-len", "3", "--latency-repeats", "2", "--max-num-seqs", "2",
           "--hf-batch-sizes", "2", "--hf-cb-requests", "0", "--budget-s", "360", "--hf-reserve-s", "120",
           "--worker-extra", "transformers:--allow-cpu", "--worker-extra", "moeserve:--allow-cpu --dtype float32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=390)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    suffixes = ["-test-gpu-tiny-latency.json", "-test-gpu-tiny-latency.log", "-test-gpu-tiny-throughput.json",
                "-test-gpu-tiny-throughput.log"]
    assert [f[10:] for f in files] == suffixes, files  # <YYYY-MM-DD>-<gpu>-<shape>-<workload>
    assert len(files) == 4
    res = {p.stem.rsplit("-", 1)[1]: json.loads(p.read_text()) for p in out.glob("*.json")}
    tp, lat = res["throughput"], res["latency"]
    for r in (tp, lat):
        results_io.validate(r)
        assert r["gpu"] == "NVIDIA Test GPU" and r["commit"] and r["versions"]["torch"]
        assert set(r["engines"]) == {"moeserve", "transformers"}
        assert not any(m.get("error") for m in r["engines"].values()), r["engines"]
    ms, hf = tp["engines"]["moeserve"], tp["engines"]["transformers"]
    assert ms["num_requests"] == 4 and ms["output_tok_s"] == pytest.approx(4 * 4 / ms["wall_s"])
    assert hf["best_of"] == "generate batch 2" and hf["output_tok_s"] > 0
    assert tp["roofline"]["throughput"]["output_tok_s"] > 0
    for eng in ("moeserve", "transformers"):
        m = lat["engines"][eng]
        assert set(m["tpot_ms"]) == {"1", "2"} and all(v > 0 for v in m["ttft_ms"].values())
    assert lat["engines"]["moeserve"]["repeats_done"] == {"1": 2, "2": 2}
    assert set(lat["roofline"]["decode_step_ms"]) == {"1", "2"}
    log = (out / next(f for f in files if f.endswith("latency.log"))).read_text()
    assert "phase roofline" in log and "phase moeserve" in log and "phase transformers" in log
    assert "moeserve TPOT ms" in proc.stdout  # the summary table is printed last
    assert not math.isnan(lat["roofline"]["bw_TBps"])
