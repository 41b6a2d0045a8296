"""benchmarks/kernels/retune_shipped.py: from a fused_moe tuning key it rebuilds the shape, weights and candidates
that fused_moe itself would tune (checked by running the rebuilt shape through fused_moe in the interpreter and
recording the key and candidates it asks the tuner for), finds stale entries, and merges re-tuned ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))
import retune_shipped as rs  # noqa: E402

KEYS = ["fused_moe|T=4|E=4|K=2|H=40|I=24|bfloat16",
        "fused_moe|T=1|E=4|K=2|H=40|I=24|bfloat16|fp8=16x32",
        "fused_moe|T=2|E=4|K=2|H=40|I=24|bfloat16|of=6|fp8=1x40",
        "fused_moe|T=1|E=4|K=2|H=64|I=32|bfloat16|int4=16z",
        "fused_moe|T=4|E=4|K=2|H=64|I=32|bfloat16|of=8|int4=32"]


class _Recorder:
    def __init__(self):
        self.asked = []

    def choose(self, kernel, key, candidates, run, default):
        self.asked.append((f"{kernel}|{key}", candidates))
        return default


@pytest.mark.parametrize("key", KEYS)
def test_the_rebuilt_shape_asks_for_its_own_key_and_candidates(key, monkeypatch):
    fused = load_kernel("fused_moe", "_gate_up_kernel")
    if not CUDA:
        monkeypatch.setattr(fused, "align_pairs", load_kernel("moe_align", "_align_sorted_kernel").align_pairs)
    monkeypatch.setattr(rs, "fm", fused)
    tuner = _Recorder()
    monkeypatch.setattr(fused, "get_tuner", lambda: tuner)
    rs.run_shape(rs.parse(key), DEVICE)
    assert tuner.asked == [(key, rs.candidates(rs.parse(key)))]


def test_stale_entries_and_merge(tmp_path, monkeypatch):
    key = KEYS[1]
    cands = rs.candidates(rs.parse(key))
    covered = {"config": cands[0], "timings_ms": [[c, 1.0] for c in cands], "failed": []}
    short = {"config": cands[0], "timings_ms": [[c, 1.0] for c in cands[:-1]], "failed": []}
    assert rs.stale({key: covered, "linear|M=1": short}) == []
    assert rs.stale({key: short}, min_hidden=256) == []  # a test's shape (H = 40), below the default
    assert rs.stale({key: short}) == [key]
    shipped = tmp_path / "tuned" / "GPU_X.json"
    shipped.parent.mkdir()
    shipped.write_text(json.dumps({"gpu": "GPU X", "entries": {key: short, "a|b": {"config": {}}}}))
    monkeypatch.setattr(rs, "shipped_path", lambda slug=None: shipped.parent / f"{slug}.json")
    retuned = tmp_path / "retuned-GPU_X.json"
    retuned.write_text(json.dumps({"gpu": "GPU X", "entries": {key: covered}}))
    assert rs.merge(retuned) == 0
    entries = json.loads(shipped.read_text())["entries"]
    assert entries[key] == covered and list(entries) == sorted(entries) and "a|b" in entries
