"""kernels/fp8_linear (W8A8 block-scaled GEMM and dynamic activation quantization) against the CPU reference of
layers/quant/fp8. CUDA: compiled, at a real projection shape too. No CUDA: Triton's interpreter on tiny odd shapes,
the fp8 x fp8 tl.dot included (the interpreter emulates it)."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

load_kernel("linear", "_split_reduce")  # fp8_linear's split-K reduce
fk = load_kernel("fp8_linear", "_gemm_kernel")

from moeserve.kernels.autotune import bucket  # noqa: E402
from moeserve.layers.quant.fp8 import _expand, quantize_act_groups, quantize_blocks  # noqa: E402

SHAPES = [(37, 40, (16, 32)), (20, 96, (8, 32)), (64, 33, (32, 32))] + ([(5120, 2048, (128, 128))] if CUDA else [])


@pytest.mark.parametrize("M", [1, 3, 17, 16 * 8 * 2 + 5])  # the last: several rows a program, a ragged last block
@pytest.mark.parametrize("group", [16, 32])
def test_act_quant_matches_reference(M, group):
    g = torch.Generator().manual_seed(M * group)
    x = (torch.randn(M, 70, generator=g) * 5).to(DEVICE)
    q, s = fk.quantize_act(x, group)
    q_ref, s_ref = quantize_act_groups(x.cpu(), group)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-6, atol=0)
    same = q.cpu().float() == q_ref.float()
    if CUDA:
        assert same.all()
    else:
        # Triton 3.9's interpreter casts fp32 -> e4m3 wrongly where rounding carries into the exponent (-7.75 gives
        # -4, not -8): those codes only; the compiled cast is checked on the GPU
        ref = q_ref.float().abs()
        assert (same | (ref == 2 ** torch.log2(ref).round())).all()
        assert same.float().mean() > 0.9


@pytest.mark.parametrize("N,K,block", SHAPES)
@pytest.mark.parametrize("M", [1, 5, 16, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_block_gemm_matches_reference(M, N, K, block, bias):
    g = torch.Generator().manual_seed(M + N + K)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    wq, ws = quantize_blocks(w, block)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    dtype = torch.bfloat16 if CUDA else torch.float32
    out = fk.fp8_block_linear(x.to(DEVICE, dtype), wq.to(DEVICE), ws.to(DEVICE), block,
                              None if b is None else b.to(DEVICE, dtype)).double().cpu()
    # exact W8A8 arithmetic: dequantized fp8 activations (the kernel's own codes, checked on their own above)
    # times the dequantized weight, fp64
    xq, xs = fk.quantize_act(x.to(DEVICE, dtype), block[1])
    xq, xs = xq.cpu(), xs.cpu()
    x_deq = _expand(xq.unsqueeze(0), xs.unsqueeze(0), 1, block[1])[0]
    ref = x_deq.double() @ _expand(wq, ws, *block).double().t() + (0 if b is None else b.to(dtype).double())
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if CUDA else 2e-3), err
    # against the unquantized product: the precision fp8 costs (weights and activations ~ 2^-4 each)
    full = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert ((out - full).norm() / full.norm()).item() < 0.1


def test_non_power_of_two_k_block_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        fk.fp8_block_linear(torch.zeros(1, 48, device=DEVICE), torch.zeros(16, 48, device=DEVICE).to(torch.float8_e4m3fn),
                            torch.ones(1, 1, device=DEVICE), (16, 48))
    with pytest.raises(ValueError, match=">= 32"):
        fk.fp8_block_linear(torch.zeros(1, 48, device=DEVICE), torch.zeros(16, 48, device=DEVICE).to(torch.float8_e4m3fn),
                            torch.ones(1, 3, device=DEVICE), (16, 16))


def test_layer_dispatches_to_the_kernel_once():
    """A merged (gate | up) fp8 layer: finalize picks the kernel on CUDA (forced here on CPU, run by the
    interpreter); its output matches the layer's dequantizing reference path within fp8 activation error."""
    from moeserve.layers.linear import MergedColumnParallelLinear
    from moeserve.layers.quant.fp8 import Fp8Config, Fp8LinearMethod

    block = (16, 32)
    layer = MergedColumnParallelLinear(48, [32, 32], bias=False)
    Fp8LinearMethod(Fp8Config(block=block)).create_weights(layer, "mlp.gate_up_proj")
    g = torch.Generator().manual_seed(0)
    for i in (0, 1):
        wq, ws = quantize_blocks(torch.randn(32, 48, generator=g), block)
        layer.weight.weight_loader(layer.weight, wq, i)
        layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, ws, i)
    qm = layer.quant_method
    layer.to(DEVICE)
    qm.finalize(layer)
    assert qm.use_kernel == CUDA and qm._kernel_fits(layer)
    x = torch.randn(5, 48, generator=g).to(DEVICE)
    qm.use_kernel = False
    ref = layer(x).double()
    qm.use_kernel = True
    out = layer(x).double()  # W8A8 against W8A16: the activations' e4m3 rounding (exact arithmetic: above)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("M", [1, 7, 20])
@pytest.mark.parametrize("N,K", [(24, 40), (33, 64)])
def test_channel_gemm_matches_reference(M, N, K):
    """Online fp8: per-row weight scales, one activation scale per token."""
    from moeserve.layers.quant.fp8 import quantize_rows

    g = torch.Generator().manual_seed(M * N + K)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    wq, ws = quantize_rows(w)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g)
    dtype = torch.bfloat16 if CUDA else torch.float32
    out = fk.fp8_channel_linear(x.to(DEVICE, dtype), wq.to(DEVICE), ws.to(DEVICE), b.to(DEVICE, dtype),
                                block_k=32).double().cpu()
    xq, xs = fk.quantize_act(x.to(DEVICE, dtype), K)
    x_ref = xq.double().cpu() * xs.double().cpu()
    ref = x_ref @ (wq.double() * ws.double()).t() + b.to(dtype).double()
    assert ((out - ref).norm() / ref.norm()).item() < (1e-2 if CUDA else 2e-3)


def test_online_layer_dispatches_to_the_channel_kernel():
    from moeserve.layers.linear import MergedColumnParallelLinear
    from moeserve.layers.quant.fp8 import Fp8Config, Fp8LinearMethod

    layer = MergedColumnParallelLinear(48, [32, 32], bias=False)
    Fp8LinearMethod(Fp8Config(block=None, online=True)).create_weights(layer, "mlp.gate_up_proj")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    for i in (0, 1):  # bf16 parts arrive one by one; quantized once the layer is whole
        layer.weight.weight_loader(layer.weight, w[32 * i: 32 * (i + 1)].to(torch.bfloat16), i)
    assert layer.weight.dtype == torch.float8_e4m3fn and not hasattr(layer, "_fp8_staging")
    qm = layer.quant_method
    layer.to(DEVICE)
    qm.finalize(layer)
    x = torch.randn(3, 48, generator=g).to(DEVICE)
    qm.use_kernel = False
    ref = layer(x).double()
    assert ((ref.cpu() - x.cpu().double() @ w.double().t()).norm() / ref.norm()).item() < 0.05
    qm.use_kernel = True
    out = layer(x).double()  # W8A8 against W8A16: the activations' e4m3 rounding (exact arithmetic: above)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


# ---------------------------------------------------------------------------------------------- split-K configs
# K = 4 and 5 tiles of 32 (100: a partial last tile), so ranges of 2 + 2, 3 + 2, 2 + 2 + 1 ...; N below every
# BLOCK_N's multiple. CUDA: a real decode shape too (R1's kv_a_proj, 7168 -> 576).
SPLIT_SHAPES = [(37, 100, (16, 32)), (20, 160, (8, 32))] + ([(576, 7168, (128, 128))] if CUDA else [])


def _block_problem(M, N, K, block, bias, seed):
    """Weights and activations whose scale blocks differ by up to 2^6 in magnitude, so that a K tile multiplied
    by a neighbour's scale is far outside the tolerance."""
    bn, bk = block
    g = torch.Generator().manual_seed(seed)
    w_mag = 2.0 ** torch.randint(-3, 4, (-(-N // bn), -(-K // bk)), generator=g).float()
    w = torch.randn(N, K, generator=g) / K ** 0.5 * _expand(torch.ones(N, K), w_mag, bn, bk)
    wq, ws = quantize_blocks(w, block)
    x_mag = 2.0 ** torch.randint(-3, 4, (M, -(-K // bk)), generator=g).float()
    x = torch.randn(M, K, generator=g) * _expand(torch.ones(M, K), x_mag, 1, bk)
    b = torch.randn(N, generator=g) if bias else None
    return x, wq, ws, b


def _block_reference(xq, xs, wq, ws, block, b, dtype):
    """fp64 W8A8 product of the given activation codes and scales with the dequantized weight."""
    x_deq = _expand(xq.cpu().unsqueeze(0), xs.cpu().unsqueeze(0), 1, block[1])[0]
    return x_deq.double() @ _expand(wq, ws, *block).double().t() + (0 if b is None else b.to(dtype).double())


def _rel(out, ref) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("M", [1, 3, 16])
def test_every_candidate_matches_reference(M):
    """Each tuning candidate, and split counts beyond them (ranges of one tile, more splits than tiles), with and
    without bias, through the launch helper with that config, against the fp64 W8A8 product."""
    dtype = torch.bfloat16 if CUDA else torch.float32
    tol = 1e-2 if CUDA else 2e-3
    for N, K, block in SPLIT_SHAPES:
        cands = fk.fp8_candidates(bucket(M), N, K, block[1], sms=132 if CUDA else 4)
        assert any(c["SPLIT_K"] > 1 for c in cands)
        # beside them: no split (twice, so that one runs with bias and one without), 3 and 8 splits
        configs = cands + [fk._c(16, 16, 1, 4, 3), fk._c(16, 64, 1, 4, 3), fk._c(16, 32, 3, 4, 3),
                           fk._c(16, 16, 8, 2, 2)]
        cases = {}
        for bias in (False, True):
            x, wq, ws, b = _block_problem(M, N, K, block, bias, seed=M + N + K)
            xq, xs = (t.to(DEVICE) for t in quantize_act_groups(x.to(dtype), block[1]))  # any codes will do here
            ref = _block_reference(xq, xs, wq, ws, block, b, dtype)
            # the check sees a K tile scaled by its neighbour's scale (what a wrong split offset would do)
            wrong = _block_reference(xq, xs, wq, ws.roll(1, dims=1), block, b, dtype)
            cases[bias] = (xq, xs, wq.to(DEVICE), ws.to(DEVICE), None if b is None else b.to(DEVICE, dtype), ref,
                           wrong)
        for i, cfg in enumerate(configs):
            xq, xs, w_d, ws_d, b_d, ref, wrong = cases[i % 2 == 1]
            out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
            fk.fp8_gemm(xq, xs, w_d, ws_d, b_d, out, cfg, block[0], block[1])
            err = _rel(out, ref)
            assert err < tol, (N, K, cfg, b_d is not None, err)
            assert _rel(out, wrong) > 20 * tol


def test_split_ranges_cover_whole_scale_blocks():
    """At R1's decode shapes (H100: 132 SMs) every candidate cuts K into ranges of >= 2 whole 128-blocks, and some
    candidate puts >= 2 programs on every SM; with fewer tiles than SMs, the default splits K."""
    for N, K in [(1536, 7168), (24576, 1536), (576, 7168), (7168, 16384), (4096, 7168), (7168, 2048)]:
        for rows in (1, 16, 64):
            cands = fk.fp8_candidates(rows, N, K, 128, sms=132)
            assert len({tuple(c.items()) for c in cands}) == len(cands)
            programs = []
            for c in cands:
                assert c["BLOCK_M"] == max(16, rows) and c["SPLIT_K"] & (c["SPLIT_K"] - 1) == 0
                assert 2 * c["SPLIT_K"] <= K // 128
                programs.append(-(-N // c["BLOCK_N"]) * c["SPLIT_K"])
            assert max(programs) >= 2 * 132
            if -(-N // cands[0]["BLOCK_N"]) < 132:
                assert cands[0]["SPLIT_K"] > 1
    assert fk._large_config(8192, 576, 7168, 128, 132)["SPLIT_K"] == 1, "prefill: tiles enough, no split"
    assert fk._large_config(128, 576, 7168, 128, 132)["SPLIT_K"] > 1


def test_tuner_key_and_large_rows(monkeypatch, tmp_path):
    """The entry point asks the tuner under fp8_linear|M=<bucket>|N|K|block|dtype (the interpreter: the default,
    untimed); more than MAX_TUNED_ROWS rows (lowered here to 2) take the heuristic config, split-K included."""
    from moeserve.kernels import autotune

    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    autotune.reset_tuner()
    try:
        N, K, block = SPLIT_SHAPES[0]
        dtype = torch.bfloat16 if CUDA else torch.float32
        x, wq, ws, b = _block_problem(3, N, K, block, True, seed=3)
        xq, xs = fk.quantize_act(x.to(DEVICE, dtype), block[1])
        ref = _block_reference(xq, xs, wq, ws, block, b, dtype)
        default = fk.fp8_candidates(4, N, K, block[1], 4)[0]
        for max_rows in (fk.MAX_TUNED_ROWS, 2):
            monkeypatch.setattr(fk, "MAX_TUNED_ROWS", max_rows)
            out = fk.fp8_block_linear(x.to(DEVICE, dtype), wq.to(DEVICE), ws.to(DEVICE), block, b.to(DEVICE, dtype))
            assert _rel(out, ref) < (1e-2 if CUDA else 2e-3)
        if not CUDA:
            assert fk._large_config(3, N, K, block[1], 4)["SPLIT_K"] > 1
        report = autotune.get_tuner().report()
        key = f"fp8_linear|M=4|N={N}|K={K}|block={block[0]}x{block[1]}|{str(dtype)[6:]}"
        assert [k for k in report if k.startswith("fp8_linear|")] == [key]
        if not CUDA:
            assert report[key]["config"] == default
    finally:
        autotune.reset_tuner()


@pytest.mark.parametrize("M", [1, 7])
def test_channel_gemm_split_k(M):
    """Online fp8 with K cut into ranges: each range scales its own partial (scales are per row and per token)."""
    from moeserve.layers.quant.fp8 import quantize_rows

    N, K = 33, 100
    g = torch.Generator().manual_seed(M)
    wq, ws = quantize_rows(torch.randn(N, K, generator=g) / K ** 0.5)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g)
    dtype = torch.bfloat16 if CUDA else torch.float32
    xq, xs = fk.quantize_act(x.to(DEVICE, dtype), K)
    ref = (xq.double().cpu() * xs.double().cpu()) @ (wq.double() * ws.double()).t() + b.to(dtype).double()
    for cfg in (fk._c(16, 16, 2, 4, 3), fk._c(16, 32, 4, 4, 3)):
        out = fk.fp8_channel_linear(x.to(DEVICE, dtype), wq.to(DEVICE), ws.to(DEVICE), b.to(DEVICE, dtype),
                                    block_k=32, config=cfg)
        assert _rel(out, ref) < (1e-2 if CUDA else 2e-3), cfg
