"""Expert-load telemetry (issue 18.2): the device counts equal a reference bincount of the routers' choices, and
the server exposes them (GET /v1/expert_load, /metrics gauges) for a MoE model and not for a dense one."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeserve.engine.engine import LLMEngine
from moeserve.layers.expert_load import ExpertLoad, count_routed
from moeserve.layers.moe import Router
from moeserve.sampling_params import SamplingParams
from moeserve.server.process import ServerProcess
from tests.tiny_checkpoints import make_tiny_checkpoint

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("moe"), "Qwen3MoeForCausalLM",
                                max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dense"), "LlamaForCausalLM",
                                max_position_embeddings=MAX_MODEL_LEN)


def test_count_routed_skips_padding_rows():
    counts = torch.zeros(4, dtype=torch.int64)
    ids = torch.tensor([[0, 1], [1, 3], [2, 2]], dtype=torch.int32)  # the last row is padding
    count_routed(counts, ids, torch.tensor(2))
    assert counts.tolist() == [1, 2, 0, 1]


def test_counts_equal_reference_bincount(moe_ckpt):
    engine = LLMEngine.from_engine_args(model=moe_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN,
                                        expert_load_telemetry=True, max_num_batched_tokens=32)
    routers = [(name, m) for name, m in engine.model.named_modules() if isinstance(m, Router)]
    assert len(routers) == 2  # 3 layers, layer 1 dense (mlp_only_layers)
    reference = {name: torch.zeros(m.cfg.num_experts, dtype=torch.int64) for name, m in routers}

    def hook(name):
        def record(module, inputs, output):
            reference[name] += torch.bincount(output[1].reshape(-1).long(), minlength=module.cfg.num_experts)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in routers]
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        for i, prompt in enumerate(["hello world " * 20, "the quick brown fox", "a b c d e f g"]):
            engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        for h in handles:
            h.remove()
    snap = engine.expert_load()
    assert snap.layers == [0, 2]
    expected = [reference[name].tolist() for name, _ in routers]
    assert snap.counts == expected
    top_k = routers[0][1].cfg.top_k
    tokens = engine.prompt_tokens_total + engine.generation_tokens_total - 3  # the last tokens are never fed
    assert all(sum(row) == tokens * top_k for row in snap.counts)
    # the next window starts where this one ended (window_s 0 keeps only the newest snapshot as the base)
    engine.executor.worker.expert_load.window_s = 0.0
    assert all(sum(row) == 0 for row in engine.expert_load().counts)
    engine.shutdown()


def test_off_by_default_and_dense_has_none(moe_ckpt):
    engine = LLMEngine.from_engine_args(model=moe_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    assert engine.expert_load() is None
    assert all(m.expert_counts is None for m in engine.model.modules() if isinstance(m, Router))
    engine.shutdown()
    assert ExpertLoad.attach(torch.nn.Linear(2, 2), torch.device("cpu")) is None


def serve_and_read(ckpt: str) -> tuple[dict, dict]:
    pytest.importorskip("fastapi")  # the server's own dependencies (absent from the bare GPU image)
    pytest.importorskip("uvicorn")
    args = [ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN),
            "--expert-load-telemetry"]
    with ServerProcess(args) as s:
        body = {"model": "tiny", "prompt": "hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        assert httpx.post(s.base_url + "/completions", json=body, timeout=60).status_code == 200
        table = httpx.get(s.base_url + "/expert_load", timeout=10).json()
        text = httpx.get(s.url + "/metrics", timeout=10).text
    gauges = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name.startswith("moeserve:expert_load"):
                gauges[(sample.name, sample.labels["layer"])] = sample.value
                assert sample.labels["model_name"] == "tiny"
    return table, gauges


def test_server_moe_exposes_table_and_gauges(moe_ckpt):
    table, gauges = serve_and_read(moe_ckpt)
    assert table["enabled"] and table["num_experts"] == 8
    assert [row["layer"] for row in table["layers"]] == [0, 2]
    # the prompt's tokens plus 3 fed generated tokens, 2 experts each
    assert all(row["total"] == sum(row["counts"]) > 0 and row["total"] % 2 == 0 for row in table["layers"])
    for layer in ("0", "2"):
        assert 1.0 <= gauges[("moeserve:expert_load_imbalance", layer)] <= 8.0
        assert 1 / 8 <= gauges[("moeserve:expert_load_hottest_share", layer)] <= 1.0
    assert len(gauges) == 4  # bounded: two gauges per MoE layer, nothing per expert


def test_server_dense_has_none(dense_ckpt):
    table, gauges = serve_and_read(dense_ckpt)
    assert table["enabled"] is False and table["layers"] == []
    assert gauges == {}


def test_per_rank_load_with_expert_parallelism():
    """With EP the table also sums each rank's experts (expert_range's placement: 5 experts over 2 ranks = 3 + 2),
    and /metrics gets one share series per EP rank."""
    from moeserve.layers.expert_load import ExpertLoadSnapshot

    snap = ExpertLoadSnapshot(layers=[0, 2], counts=[[1, 2, 3, 4, 10], [0, 0, 6, 0, 0]], window_s=1.0, ep_size=2)
    assert snap.rank_counts() == [[6, 14], [6, 0]]
    assert snap.rank_shares() == [12 / 26, 14 / 26]
    assert [layer["ranks"] for layer in snap.to_json()["layers"]] == [[6, 14], [6, 0]]
    assert ExpertLoadSnapshot([0], [[1, 2]], 1.0).rank_shares() == []  # no EP: no per-rank series
    from moeserve.server.metrics import _ExpertLoadCollector
    shares = {s.labels["ep_rank"]: s.value for f in _ExpertLoadCollector(lambda: snap, "m").collect()
              for s in f.samples if f.name == "moeserve:expert_load_rank_share"}
    assert shares == {"0": 12 / 26, "1": 14 / 26}
