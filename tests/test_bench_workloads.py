"""The traffic workloads of issue 16 (benchmarks/workloads.py, benchmarks/traffic.py): generators (seeded,
clipped, exact lengths), the report's tables, and the suite end to end on the CPU with a config-only tiny model:
moeserve's worker, and vLLM's worker driven through a stub `vllm` module (moeserve underneath, vLLM's metric
fields), so that the device run cannot die of a typo in either worker's plumbing."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import results_io  # noqa: E402
import workloads as wl  # noqa: E402

TINY = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 32,
        "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "eos_token_id": 1, "bos_token_id": 0}


def test_varlen_lengths_seeded_clipped_heavy_tailed():
    spec = wl.VarlenSpec(num_requests=4000)
    a, b = wl.varlen_lengths(spec), wl.varlen_lengths(spec)
    assert a == b and wl.varlen_lengths(wl.VarlenSpec(num_requests=4000, seed=9)) != a
    ins, outs = [x for x, _ in a], [y for _, y in a]
    assert min(ins) >= 16 and max(ins) <= 8192 and min(outs) >= 8 and max(outs) <= 2048
    assert 500 < statistics.median(ins) < 700 and 120 < statistics.median(outs) < 180
    assert statistics.mean(ins) > 1.4 * statistics.median(ins)  # heavy right tail
    assert max(ins) == 8192 and min(outs) == 8  # both clips reached at this many requests
    prompts, out_lens = wl.varlen_prompts(wl.VarlenSpec(num_requests=50), vocab_size=300)
    assert [len(p) for p in prompts] == [x for x, _ in wl.varlen_lengths(wl.VarlenSpec(num_requests=50))]
    assert out_lens == [y for _, y in wl.varlen_lengths(wl.VarlenSpec(num_requests=50))]
    assert all(0 <= t < 300 for p in prompts for t in p)
    assert wl.varlen_prompts(wl.VarlenSpec(num_requests=50), 300) == (prompts, out_lens)
    d = wl.spec_dict(wl.VarlenSpec())
    assert d["input_median"] == 600 and d["input_sigma"] == 1.0 and "lognormal" in d["distribution"]
    tight = wl.VarlenSpec(num_requests=100, input_min=10, input_max=12, output_min=3, output_max=3)
    assert all(10 <= x <= 12 and y == 3 for x, y in wl.varlen_lengths(tight))


def test_prefix_and_longctx_prompts_exact_and_shared():
    spec = wl.PrefixSpec(num_groups=3, group_size=4, prefix_len=20, suffix_len=5, output_len=2)
    ps = wl.prefix_prompts(spec, 100)
    assert len(ps) == 12 and all(len(p) == 25 for p in ps) and ps == wl.prefix_prompts(spec, 100)
    for i, p in enumerate(ps):
        assert p[:20] == ps[i % 3][:20]
        assert p[:20] != ps[(i + 1) % 3][:20]
    assert len({tuple(p[20:]) for p in ps}) == 12
    assert wl.spec_dict(spec)["num_requests"] == 12
    lc = wl.LongctxSpec(input_lens=(30, 50), batch_sizes=(1, 3), output_len=4)
    a = wl.longctx_prompts(lc, 50, 3, 0, 100)
    assert len(a) == 3 and all(len(p) == 50 for p in a) and a == wl.longctx_prompts(lc, 50, 3, 0, 100)
    assert a != wl.longctx_prompts(lc, 50, 3, 1, 100)  # the TTFT run and the full run use different prompts
    assert wl.spec_dict(lc)["input_lens"] == [30, 50]
    with pytest.raises(ValueError):
        wl.LongctxSpec(output_len=1)
    assert wl.percentile([1, 2, 3, 4], 50) == 2.5 and wl.percentile([5], 99) == 5
    assert wl.percentile(list(range(101)), 99) == 99


def _fake_vllm(site: Path) -> None:
    """A `vllm` package with LLM / SamplingParams over moeserve, filling vLLM's RequestStateStats fields."""
    pkg = site / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('''
import types
import moeserve

__version__ = "0.0.0-stub"
SamplingParams = moeserve.SamplingParams
_VLLM_ONLY = ("skip_tokenizer_init", "disable_log_stats", "trust_remote_code")


class LLM:
    def __init__(self, model, **kw):
        self._llm = moeserve.LLM(model=model, **{k: v for k, v in kw.items() if k not in _VLLM_ONLY})
        self.llm_engine = types.SimpleNamespace()

    def generate(self, reqs, params, use_tqdm=False):
        outs = self._llm.generate(reqs, params)
        for o in outs:
            m = o.metrics
            o.metrics = types.SimpleNamespace(first_token_latency=m.first_token_time - m.arrival_time,
                                              first_token_ts=m.first_token_time, last_token_ts=m.finished_time)
        return outs
''')


def _tiny_model_and_stub_vllm(tmp_path: Path) -> tuple[Path, Path]:
    """A config-only tiny model folder, and a site with the stand-in `vllm` package."""
    pytest.importorskip("transformers")
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    site = tmp_path / "site"
    _fake_vllm(site)
    return model, site


@pytest.mark.timeout(600)
def test_suite_traffic_workloads_tiny_cpu(tmp_path):
    model, site = _tiny_model_and_stub_vllm(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "bench_suite.py"), "--shape", "tiny", "--model", str(model),
           "--workloads", "varlen,longctx,prefix", "--engines", "moeserve,vllm,transformers",
           "--out-dir", str(out), "--bw-TBps", "3", "--peak-TFLOPs", "800", "--gpu-name", "NVIDIA Test GPU",
           "--varlen-requests", "6", "--varlen-input-median", "12", "--varlen-output-median", "3",
           "--varlen-input-max", "40", "--varlen-output-max", "8", "--longctx-lens", "24,40", "--longctx-batches",
           "1,2", "--longctx-output-len", "3", "--prefix-groups", "2", "--prefix-group-size", "3", "--prefix-len", "32",
           "--prefix-suffix-len", "4", "--prefix-output-len", "3", "--max-num-seqs", "4", "--budget-s", "500",
           "--hf-reserve-s", "60", "--worker-extra", "moeserve:--allow-cpu --dtype float32",
           "--worker-extra", f"vllm:--allow-cpu --dtype float32 --site {site}",
           "--vllm-engine-arg", "enable_prefix_caching=true"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    res = {p.stem.rsplit("-", 1)[1]: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(res) == {"varlen", "longctx", "prefix"}
    for name, r in res.items():
        results_io.validate(r)
        assert set(r["engines"]) == {"moeserve", "vllm"}, name  # transformers runs no traffic workload
        assert not any(m.get("error") for m in r["engines"].values()), r["engines"]
    for eng in ("moeserve", "vllm"):
        v = res["varlen"]["engines"][eng]
        lens = wl.varlen_lengths(wl.VarlenSpec(num_requests=6, input_median=12, output_median=3, input_max=40,
                                               output_max=8))
        assert v["num_requests"] == 6 and v["output_tokens"] == sum(y for _, y in lens)
        assert v["output_tok_s"] == pytest.approx(v["output_tokens"] / v["wall_s"])
        assert v["ttft_ms_p50"] > 0 and v["ttft_ms_p99"] >= v["ttft_ms_p50"] and v["tpot_ms_p99"] >= v["tpot_ms_p50"]
        pf = res["prefix"]["engines"][eng]
        assert pf["num_requests"] == 6 and pf["output_tokens"] == 18 and pf["ttft_ms_p50"] > 0
        lc = res["longctx"]["engines"][eng]
        assert set(lc["ttft_ms"]) == set(lc["tpot_ms"]) == {"24x1", "24x2", "40x1", "40x2"}
        assert all(x > 0 for x in lc["ttft_ms"].values()) and all(math.isfinite(x) for x in lc["tpot_ms"].values())
    spec = res["varlen"]["spec"]
    assert spec["input_median"] == 12 and spec["input_sigma"] == 1.0 and "lognormal" in spec["distribution"]
    assert res["vllm" if False else "varlen"]["engines"]["vllm"]["engine_args"]["enable_prefix_caching"] is True
    table = report.summary(list(res.values()))
    for title in ("Variable lengths", "Shared prefixes", "Long context"):
        assert title in table
    assert "| 40x2 |" in table and "moeserve / vllm (out tok/s)" in table
    assert "Variable lengths" in proc.stdout  # the suite prints the tables last


def test_random_checkpoint_has_init_scale_weights_and_is_reused(tmp_path):
    """benchmarks/random_checkpoint.py: weights at transformers' init scale (a router's logits O(1), unlike dummy
    weights' +-1e-3), loadable by moeserve with the same greedy tokens as transformers; rebuilt only when the config
    or seed changes; quantized shapes refused."""
    pytest.importorskip("transformers")
    import torch
    from safetensors import safe_open

    import random_checkpoint as rc
    from moeserve import LLM, SamplingParams

    out = tmp_path / "ckpt"
    assert rc.build(TINY, out, device="cpu")
    files = list(out.glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        gate = f.get_tensor("model.layers.0.mlp.gate.weight").float()
    assert 0.01 < gate.std().item() < 0.04  # initializer_range 0.02; dummy weights would be ~6e-4
    stamp = files[0].stat().st_mtime_ns
    assert not rc.build(TINY, out, device="cpu") and files[0].stat().st_mtime_ns == stamp
    assert rc.build(TINY, out, seed=1, device="cpu")
    with pytest.raises(SystemExit, match="quantized"):
        rc.build({**TINY, "quantization_config": {"quant_method": "fp8"}}, tmp_path / "q", device="cpu")

    from transformers import AutoModelForCausalLM

    prompt = [5, 17, 42, 99, 3]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt):].tolist()
    llm = LLM(model=str(out), load_format="auto", dtype="float32")
    got = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert got[0].outputs[0].token_ids == ref


@pytest.mark.timeout(600)
def test_suite_random_weights_are_what_both_engines_load(tmp_path):
    model, site = _tiny_model_and_stub_vllm(tmp_path)
    out, rw = tmp_path / "out", tmp_path / "rw"
    cmd = [sys.executable, str(BENCH / "bench_suite.py"), "--shape", "tiny", "--model", str(model),
           "--random-weights", str(rw), "--workloads", "prefix", "--engines", "moeserve,vllm",
           "--out-dir", str(out), "--bw-TBps", "3", "--peak-TFLOPs", "800", "--gpu-name", "NVIDIA Test GPU",
           "--prefix-groups", "2", "--prefix-group-size", "2", "--prefix-len", "32", "--prefix-suffix-len", "4",
           "--prefix-output-len", "3", "--max-num-seqs", "4", "--budget-s", "400",
           "--worker-extra", "moeserve:--allow-cpu --dtype float32",
           "--worker-extra", f"vllm:--allow-cpu --dtype float32 --site {site}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert list(rw.glob("*.safetensors"))
    (res,) = [json.loads(p.read_text()) for p in out.glob("*prefix.json")]
    assert res["load_format"] == "auto"
    for eng in ("moeserve", "vllm"):
        assert res["engines"][eng]["engine_args"]["load_format"] == "auto", eng
        assert not res["engines"][eng].get("error")
    assert res["engines"]["moeserve"]["engine_args"]["model"] == str(rw)
    assert any(str(rw) in " ".join(c) for c in res["engine_command_lines"].values())


def test_spread_routing_undoes_the_dummy_correction_bias_collapse(tmp_path):
    """DeepSeek-V3's router on dummy weights: the +-1e-3 correction bias outweighs ~1e-5 logits and every token
    takes the same top-k experts; profile_decode.spread_routing zeroes the bias, and the same tokens spread."""
    pytest.importorskip("transformers")
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(BENCH / "kernels"))
    from tiny_checkpoints import tiny_config

    import profile_decode
    from moeserve import LLM, SamplingParams

    cfg = tiny_config("DeepseekV3ForCausalLM", vocab_size=256, n_routed_experts=32, num_experts_per_tok=4,
                      n_group=4, topk_group=2).to_dict()
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, 256, 12).tolist()} for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def experts_used(llm) -> int:
        load = llm.llm_engine.executor.worker.expert_load
        before = load.totals()
        llm.generate(prompts, params)
        return int(((load.totals() - before) > 0).sum())

    llm = LLM(model=str(tmp_path / "config.json"), load_format="dummy", expert_load_telemetry=True)
    assert experts_used(llm) == 4  # the collapse: one MoE layer, the bias's top 4
    assert profile_decode.spread_routing(llm) == 1
    assert experts_used(llm) > 16


def test_random_checkpoint_block_fp8_as_published(tmp_path):
    """A DeepSeek-V3-style block-fp8 shape: projections in e4m3 with a weight_scale_inv per block, the router,
    embeddings and norms in bf16, the config's quantization_config kept; moeserve loads it as fp8, and its routing
    spreads over the experts (transformers' zero correction bias), unlike dummy weights'."""
    pytest.importorskip("transformers")
    import numpy as np
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_checkpoints import tiny_config

    import random_checkpoint as rc
    from moeserve import LLM, SamplingParams

    cfg = tiny_config("DeepseekV3ForCausalLM", vocab_size=256, n_routed_experts=16, num_experts_per_tok=2,
                      n_group=4, topk_group=2).to_dict()
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 16]}
    out = tmp_path / "fp8"
    assert rc.build(cfg, out, device="cpu")
    tensors = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    q_a = tensors["model.layers.1.self_attn.q_a_proj.weight"]
    assert q_a.dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].shape == (-(-q_a.shape[0] // 16),
                                                                                  -(-q_a.shape[1] // 16))
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    for name in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight"):  # left as built (bf16; transformers' V3 router fp32)
        assert tensors[name].dtype in (torch.bfloat16, torch.float32), name
        assert name.removesuffix(".weight") + ".weight_scale_inv" not in tensors, name
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert written["weight_block_size"] == [16, 16]
    # the bf16 routers are named unconverted: an engine reading "every linear not listed is fp8" finds no scale
    assert "model.layers.1.mlp.gate" in written["modules_to_not_convert"]
    assert not any("proj" in m for m in written["modules_to_not_convert"])

    llm = LLM(model=str(out), expert_load_telemetry=True)
    assert any(p.dtype == torch.float8_e4m3fn for p in llm.llm_engine.model.parameters())
    rng = np.random.default_rng(0)
    load = llm.llm_engine.executor.worker.expert_load
    llm.generate([{"prompt_token_ids": rng.integers(0, 256, 12).tolist()} for _ in range(16)],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert int((load.totals() > 0).sum()) > 8  # of 16 experts, top-2: a dummy bias would give exactly 2


def test_random_checkpoint_streamed_matches_save_pretrained(tmp_path, monkeypatch):
    """The streamed writer (one tensor at a time, what a 30B build on an 80 GiB GPU needs) writes the tensors
    transformers' save_pretrained writes for the architecture - names, shapes, dtypes, per-expert layout - with
    each projection of a block-fp8 config in e4m3 beside its weight_scale_inv, in several shards with an index
    that names each tensor's file."""
    pytest.importorskip("transformers")
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_checkpoints import tiny_config

    import random_checkpoint as rc

    def tensors(folder):
        found = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                found.update({k: (f.name, tuple(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype())
                              for k in sf.keys()})
        return found

    hf_cfg = tiny_config("Qwen3MoeForCausalLM", vocab_size=256, num_experts=8, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
    want = tensors(tmp_path / "hf")
    cfg = hf_cfg.to_dict()
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 16]}
    write = rc.write_streamed
    monkeypatch.setattr(rc, "write_streamed", lambda *a, **k: write(*a, **{**k, "shard_bytes": 20_000}))
    assert rc.build(cfg, tmp_path / "streamed", device="cpu")
    got = tensors(tmp_path / "streamed")
    scales = {k for k in got if k.endswith(".weight_scale_inv")}
    assert set(got) - scales == set(want)
    quantized = {k.removesuffix("_scale_inv") for k in scales}
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in quantized
    assert "model.layers.0.mlp.gate.weight" not in quantized and "lm_head.weight" not in quantized
    for name, (_, shape, dtype) in want.items():
        assert got[name][1] == shape, name
        assert got[name][2] == ("F8_E4M3" if name in quantized else dtype), name
    assert len({v[0] for v in got.values()}) > 2  # several shards
    listed = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    routers = sorted(k.removesuffix(".weight") for k in want if k.endswith(".mlp.gate.weight"))
    assert len(routers) >= 2 and sorted(listed["modules_to_not_convert"]) == routers
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", routers[0]]  # one listed already
    rc.build(cfg, tmp_path / "listed", device="cpu")
    listed = json.loads((tmp_path / "listed" / "config.json").read_text())["quantization_config"]
    assert listed["modules_to_not_convert"][:2] == ["lm_head", routers[0]]
    assert sorted(listed["modules_to_not_convert"][2:]) == routers[1:]
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {k: v[0] for k, v in got.items()}
