"""benchmarks/routing_check.py: the routes it records from moeserve are the ones transformers' router picks for the
same greedy tokens, step by step (a capture one step off, or rows out of request order, fails), both through the
script's own engines, and its summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import random_checkpoint as rc  # noqa: E402
import routing_check as rk  # noqa: E402
from test_bench_workloads import TINY  # noqa: E402


@pytest.mark.timeout(600)
def test_moeserve_routes_match_transformers(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    rc.build(dict(TINY, num_experts=8), ckpt)
    batch, steps = 3, 5
    runs = {}
    for engine, extra in (("moeserve", '{"device": "cpu", "dtype": "float32"}'),
                          ("transformers", '{"device": "cpu", "dtype": "float32"}')):
        out = tmp_path / f"{engine}.json"
        assert rk.main(["run", "--engine", engine, "--model", str(ckpt), "--out", str(out), "--batch", str(batch),
                        "--steps", str(steps), "--max-model-len", "256", "--engine-args", extra]) == 0
        runs[engine] = json.loads(out.read_text())
        assert len(runs[engine]["routes"]) == batch and all(len(r) == steps - 1 for r in runs[engine]["routes"])
    ag = rk.agreement(runs["moeserve"], runs["transformers"])
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
