"""Programmatic dependent launch (moeserve/kernels/pdl.py): a kernel launched with it may start before the kernel
ahead of it has finished, so every kernel must wait (pdl_begin) before it touches memory, and every launch must set
the kernel's PDL flag and Triton's launch_pdl together. Checked on the source here; tests/hopper_compile.py checks
that each compiled form carries the wait; on a GPU, a CUDA graph of kernels gives the same bits with PDL on and off.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from triton_kernels import CUDA, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

from moeserve.kernels import pdl, runtime  # noqa: E402

KERNELS = Path(__file__).resolve().parents[1] / "moeserve" / "kernels"


def _jit_kernels():
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
                    and any("triton.jit" in ast.unparse(d) for d in node.decorator_list)):
                yield path.name, node
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel"):
                yield path.name, node


def test_every_kernel_waits_before_touching_memory():
    kernels = [(f, n) for f, n in _jit_kernels() if isinstance(n, ast.FunctionDef)]
    assert len(kernels) >= 25
    for name, node in kernels:
        assert "PDL" in [a.arg for a in node.args.args], f"{name}:{node.name} takes no PDL"
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        assert ast.unparse(body[0]) == "pdl_begin(PDL)", f"{name}:{node.name} does not begin with pdl_begin(PDL)"


def test_every_launch_sets_pdl_and_launch_pdl_together():
    launches = [(f, n) for f, n in _jit_kernels() if isinstance(n, ast.Call)]
    assert len(launches) >= 25
    for name, call in launches:
        spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
        assert any(s.startswith("pdl.launch(") and s.count(",") == 1 for s in spread), \
            f"{name}: {call.func.value.id} launched without pdl.launch(device, rows)"
        assert not any(k.arg in ("PDL", "launch_pdl") for k in call.keywords), name


def test_on_for_hopper_decode_sized_launches_only(monkeypatch):
    assert pdl.launch(torch.device("cpu"), 1) == {"PDL": 0, "launch_pdl": False}
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    for capability, env, rows, mode in (((9, 0), None, 1, 1), ((10, 0), None, pdl.MAX_ROWS, 1),
                                        ((9, 0), None, pdl.MAX_ROWS + 1, 0), ((8, 0), None, 1, 0),
                                        ((9, 0), "0", 1, 0), ((9, 0), "2", 8, 2)):
        monkeypatch.setattr(pdl, "_on", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        if env is None:
            monkeypatch.delenv("MOESERVE_PDL", raising=False)
        else:
            monkeypatch.setenv("MOESERVE_PDL", env)
        assert pdl.launch(cuda, rows) == {"PDL": mode, "launch_pdl": mode > 0}, (capability, env, rows)


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs a GPU")
def test_graph_of_kernels_same_bits_with_and_without_pdl(monkeypatch):
    """RMSNorm, the skinny GEMM (split-K, last-arriver reduce) and RMSNorm again, 24 times over, in one CUDA graph:
    each kernel reads what the one before it wrote."""
    norm = load_kernel("norm", "_rms_norm_kernel")
    linear = load_kernel("linear", "_skinny_kernel")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90")
    torch.manual_seed(0)
    ws = [torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16) / 32 for _ in range(24)]
    nw = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 4, "W": 4, "S": 3, "DOT": 0}

    def chain():
        h = x
        for w in ws:
            h = norm.rms_norm(linear.skinny_matmul(norm.rms_norm(h, nw, 1e-6), w, None, cfg), nw, 1e-6)
        return h

    outs = {}
    for on in (0, 1, 2):
        monkeypatch.setattr(pdl, "_on", {torch.cuda.current_device(): on})
        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        outs[on] = out.clone()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_prefill_ab_variants_reach_the_launches(monkeypatch):
    """benchmarks/kernels/pdl_prefill_ab.py's variants: what each sets is what a prefill-sized (4096-token) and a
    decode-sized (8-token) launch then get."""
    import sys

    sys.path.insert(0, str(KERNELS.parents[1] / "benchmarks" / "kernels"))
    import pdl_prefill_ab

    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(pdl, "_on", {})
    monkeypatch.setattr(pdl, "MAX_ROWS", pdl.MAX_ROWS)
    monkeypatch.setenv("MOESERVE_PDL", "1")
    cuda = torch.device("cuda", 0)
    for variant, large, small in (("off", 0, 0), ("release-all", 1, 1), ("landed", 0, 1), ("wait-all", 2, 2)):
        pdl_prefill_ab.apply(variant)
        assert (pdl.launch(cuda, 4096)["PDL"], pdl.launch(cuda, 8)["PDL"]) == (large, small), variant


def test_prefill_ab_runs_end_to_end_on_the_cpu(tmp_path):
    """The script's plumbing (engines built per variant, TTFT, TPOT, the profiled kernels, the JSON), on a tiny
    config, so that a device call cannot die of a typo in it."""
    import json
    import subprocess
    import sys

    from test_bench_workloads import TINY

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    script = KERNELS.parents[1] / "benchmarks" / "kernels" / "pdl_prefill_ab.py"
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "config.json"), "--lengths", "16,40",
                           "--batches", "1,3", "--steps", "3", "--repeats", "1", "--max-model-len", "160",
                           "--llm-args", "{}", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["off", "landed", "wait-all", "release-all"]
    for r in results:
        assert set(r["ttft_ms"]) == {"16", "40"} and set(r["tpot_ms"]) == {"1", "3"}, r
        assert all(v > 0 for v in r["ttft_ms"].values()) and sum(r["kernels_us"].values()) > 0, r
    assert "TTFT ms (ratio to off)" in proc.stdout
