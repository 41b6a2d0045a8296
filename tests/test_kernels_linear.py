"""Skinny GEMM (decode projections) against F.linear in fp64, every tuning candidate, fresh random inputs.

CUDA: compiled kernels at real projection shapes. No CUDA: the Triton interpreter on small odd shapes.
"""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

lin = load_kernel("linear", "_skinny_kernel")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# (N, K): odd sizes (no block divides them), a router-like narrow N, and on CUDA the qwen3-30b-a3b projections.
SHAPES = [(37, 100), (8, 1030), (1, 64)] + ([(5120, 2048), (2048, 4096), (128, 2048)] if CUDA else [])
ROWS = [1, 2, 3, 4, 7, 16]


def check(M, N, K, dtype, bias, cfg):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs each run; the seed is in the failure message
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # poison: every element must be written
    lin.skinny_matmul(x, w, b, cfg, out)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert not torch.isnan(out).any(), f"unwritten output {cfg} (seed {seed})"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"{cfg}: relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", ROWS)
def test_every_candidate_matches_linear(M, dtype):
    rows = lin.bucket(M)
    for N, K in SHAPES:
        cands = lin.linear_candidates(rows, N, torch.tensor([], dtype=dtype).element_size())
        for i, cfg in enumerate(cands[1:]):  # [0] is cuBLAS
            check(M, N, K, dtype, bias=i % 2 == 1, cfg=cfg)


def test_candidates_cover_both_forms_and_split_k():
    cands = lin.linear_candidates(1, 2048)
    assert cands[0] == {"CUBLAS": 1}, "cuBLAS first: the default where nothing is timed"
    assert {c.get("DOT") for c in cands[1:]} == {0, 1}
    assert any(c["SPLIT_K"] > 1 for c in cands[1:])
    assert all(c["DOT"] == 1 for c in lin.linear_candidates(16, 2048)[1:]), "GEMV form holds at most 4 rows"
    assert lin.linear_candidates(16, 2048, elem_bytes=4) == [{"CUBLAS": 1}], "fp32: no tl.dot form"


def test_gemv_form_refuses_more_than_four_rows():
    x = torch.randn(5, 64).to(DEVICE)
    w = torch.randn(8, 64).to(DEVICE)
    with pytest.raises(ValueError, match="cannot run 5 rows"):
        lin.skinny_matmul(x, w, None, lin.linear_candidates(1, 8)[1])


@pytest.mark.skipif(not CUDA, reason="the tuned entry point runs kernels on CUDA tensors")
def test_linear_entry_point_tunes_and_falls_back(monkeypatch, tmp_path):
    from moeserve.kernels import autotune

    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    autotune.reset_tuner()
    try:
        for M in (1, 3, 16, 17):  # 17: past MAX_ROWS, plain F.linear
            x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(1000, 2048, device="cuda", dtype=torch.bfloat16) / 45
            torch.testing.assert_close(lin.linear(x, w), torch.nn.functional.linear(x, w), rtol=2e-2, atol=2e-2)
        assert any(k.startswith("linear|M=1|") for k in autotune.get_tuner().report())
    finally:
        autotune.reset_tuner()


def test_tuning_streams_copies_of_the_weight(monkeypatch):
    """The tuner's run(cfg) reads a rotating set of weight copies (> L2 in all), made only when it first runs."""
    from moeserve.kernels.autotune import StreamedRun

    monkeypatch.setattr(StreamedRun, "STREAM_BYTES", 4 * 64 * 37 * 4)  # four copies of a 37 x 64 fp32 weight
    x = torch.randn(2, 64).to(DEVICE)
    w = torch.randn(37, 64).to(DEVICE)
    run = StreamedRun(lambda c, weight: lin.apply_config(c, x, weight, None), w)
    assert run.copies == []
    outs = [run({"CUBLAS": 1}) for _ in range(6)]
    assert len(run.copies) == 4 and len({c[0].data_ptr() for c in run.copies}) == 4
    for out in outs:
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w))
