"""`moeserve bench serve --plot run.png` also writes `run-expert-load.png`, the heat map of GET /v1/expert_load,
when the server exposes the table (and nothing when it does not, e.g. a stub or vLLM)."""

from __future__ import annotations

import pytest
from bench_stub import StubServer

from moeserve.bench import cli as bench_cli
from moeserve.bench.plot import expert_load_path, plot_expert_load
from moeserve.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
TABLE = {"object": "expert_load", "model": "m", "enabled": True, "num_experts": 8, "window_s": 60.0,
         "layers": [{"layer": 0, "counts": [10, 0, 5, 5, 40, 0, 0, 4], "total": 64},
                    {"layer": 2, "counts": [8] * 8, "total": 64}]}


def test_heat_map_from_a_synthetic_table(tmp_path):
    pytest.importorskip("matplotlib")
    assert expert_load_path(str(tmp_path / "run.png")) == str(tmp_path / "run-expert-load.png")
    path = tmp_path / "heat.png"
    assert plot_expert_load(TABLE, str(path), title="m")
    assert path.read_bytes()[:8] == PNG
    off = tmp_path / "off.png"
    assert not plot_expert_load({"enabled": False, "layers": [], "num_experts": 0}, str(off))
    assert not plot_expert_load({"enabled": True, "layers": [], "num_experts": 0}, str(off))
    assert not off.exists()


def test_bench_plot_writes_the_heat_map_when_the_server_has_the_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    with StubServer(ttft_s=0.01, itl_s=0.002) as stub:
        assert bench_cli.expert_load_table(stub.base_url, None) is None   # the stub has no such endpoint
        args = ["bench", "serve", "--base-url", stub.base_url, "--model", "stub", "--num-prompts", "2",
                "--input-len", "4", "--output-len", "2", "--plot", str(png), "--no-progress"]
        assert main(args) == 0
        assert png.exists() and not (tmp_path / "run-expert-load.png").exists()
        seen = []
        monkeypatch.setattr(bench_cli, "expert_load_table", lambda url, key: seen.append(url) or TABLE)
        assert main(args) == 0
    assert seen == [stub.base_url]
    assert (tmp_path / "run-expert-load.png").read_bytes()[:8] == PNG
    assert "expert load heat map:" in capsys.readouterr().out
