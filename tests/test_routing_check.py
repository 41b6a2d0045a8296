"""benchmarks/routing_check.py: the routes it records from moeserve are the ones transformers' router picks for the
same greedy tokens, step by step (a capture one step off, or rows out of request order, fails), and its summaries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import random_checkpoint as rc  # noqa: E402
import routing_check as rk  # noqa: E402
from test_bench_workloads import TINY  # noqa: E402


def _hf_routes(model_dir: Path, prompts, steps: int) -> dict:
    """transformers, greedy, one full forward per step: each step's tokens and each layer's top-k of the router."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    k = TINY["num_experts_per_tok"]
    tokens, routes = [], []
    for p in prompts:
        seq, gen, rt = list(p), [], []
        for s in range(steps):
            with torch.no_grad():
                out = m(torch.tensor([seq]), output_router_logits=True)
            if s:  # the forward that produced token s processed token s-1: decode step s-1's routing
                rt.append([lg[-1].topk(k).indices.tolist() for lg in out.router_logits])
            nxt = int(out.logits[0, -1].argmax())
            gen.append(nxt)
            seq.append(nxt)
        tokens.append(gen)
        routes.append(rt)
    return {"engine": "transformers", "tokens": tokens, "routes": routes, "batch": len(prompts), "steps": steps,
            "top_k": k, "num_experts": TINY["num_experts"]}


@pytest.mark.timeout(600)
def test_moeserve_routes_match_transformers(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "tiny"
    rc.build(dict(TINY, num_experts=8), ckpt)
    batch, steps = 3, 5
    out = tmp_path / "moeserve.json"
    assert rk.main(["run", "--engine", "moeserve", "--model", str(ckpt), "--out", str(out), "--batch", str(batch),
                    "--steps", str(steps), "--max-model-len", "256",
                    "--engine-args", '{"device": "cpu", "dtype": "float32"}']) == 0
    import json

    mo = json.loads(out.read_text())
    assert len(mo["routes"]) == batch and all(len(r) == steps - 1 for r in mo["routes"])
    hf = _hf_routes(ckpt, rk._prompts(batch, TINY["vocab_size"]), steps)
    ag = rk.agreement(mo, hf)
    assert ag["prefix_tokens"] == [steps] * batch
    assert ag["same_expert_sets"] == 1.0 and ag["compared_sets"] == batch * (steps - 1) * TINY["num_hidden_layers"]
    assert "distinct experts a layer a decode step" in capsys.readouterr().out


def test_summaries():
    assert rk.uniform_distinct(128, 256) == pytest.approx(110.8, abs=0.1)  # qwen3-30b at batch 32, top-8
    a = {"tokens": [[1, 2, 3], [4, 5, 6]], "routes": [[[[0, 1]], [[2, 3]]], [[[0, 2]], [[1, 3]]]]}
    b = {"tokens": [[1, 2, 9], [7, 5, 6]], "routes": [[[[1, 0]], [[2, 4]]], [[[0, 2]], [[1, 3]]]]}
    assert rk.distinct_per_step(a["routes"]) == 3.0  # step 0: {0,1,2}; step 1: {1,2,3}
    ag = rk.agreement(a, b)
    assert ag["prefix_tokens"] == [2, 0] and ag["same_expert_sets"] == 0.5  # step 0 equal as sets, step 1 not
