"""kernels/int4_linear (W4A16 GEMM and its skinny decode form) against the CPU reference of layers/quant/int4
(dequantize, dense matmul). CUDA: compiled, at a real projection shape too. No CUDA: Triton's interpreter on tiny
shapes."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

ik = load_kernel("int4_linear", "_gemm_kernel")

from moeserve.layers.quant.int4 import dequantize, pack_int32  # noqa: E402

SHAPES = [(24, 64, 16), (40, 96, 32), (72, 128, 64)] + ([(5120, 2048, 128)] if CUDA else [])


def _weight(n, k, group, seed, sym=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = None if sym else torch.randint(0, 16, (n, k // group), generator=g).to(torch.uint8)
    scales = torch.rand(n, k // group, generator=g) / k ** 0.5 + 1e-3
    return pack_int32(q, 1), scales, zeros


@pytest.mark.parametrize("N,K,group", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 5, 17])  # 1, 3: the skinny form; 5, 17: the GEMM (16- and 64-row tiles)
@pytest.mark.parametrize("bias", [False, True])
def test_int4_gemm_matches_reference(M, N, K, group, bias):
    packed, scales, zeros = _weight(N, K, group, M + N + K, sym=bias)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    dtype = torch.bfloat16 if CUDA else torch.float32
    xd = x.to(dtype)
    if bias:  # and symmetric: scales as compressed-tensors holds them
        scales = scales.to(torch.bfloat16)
    out = ik.int4_linear(xd.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), None if zeros is None else zeros.to(DEVICE), group,
                         None if b is None else b.to(DEVICE, dtype)).double().cpu()
    w = dequantize(packed, scales, zeros, group, torch.float64)
    ref = xd.double() @ w.t() + (0 if b is None else b.to(dtype).double())
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if CUDA else 1e-5), err


def test_bf16_activations_through_the_gemm():
    """bf16 in, bf16 out: the dot runs on bf16 operands (fp32 under the interpreter), fp32 accumulation."""
    packed, scales, zeros = _weight(32, 64, 32, 7)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = ik.int4_linear(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), 32)
    assert out.dtype == torch.bfloat16
    ref = x.double() @ dequantize(packed, scales, zeros, 32, torch.float64).t()
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2


def test_misshaped_inputs_are_refused():
    packed, scales, zeros = _weight(16, 64, 16, 0)
    with pytest.raises(ValueError, match="do not fit group"):
        ik.int4_linear(torch.zeros(2, 64, device=DEVICE), packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), 32)


def test_layer_dispatches_to_the_kernel_once():
    """A merged (gate | up) AWQ layer: finalize picks the kernel on CUDA (forced here on CPU, run by the
    interpreter); its output matches the layer's dequantizing reference path."""
    from moeserve.layers.linear import MergedColumnParallelLinear
    from moeserve.layers.quant.int4 import Int4Config, Int4LinearMethod

    cfg = Int4Config("awq", 16, False)
    with torch.device("meta"):
        layer = MergedColumnParallelLinear(64, [24, 24], bias=False)
        Int4LinearMethod(cfg).create_weights(layer, "mlp.gate_up_proj")
    layer = layer.to_empty(device=DEVICE)
    packed, scales, zeros = _weight(48, 64, 16, 3)
    layer.qweight.data.copy_(packed)
    layer.scales.data.copy_(scales)  # fp16, as AWQ holds them
    scales = layer.scales.float()
    layer.qzeros.data.copy_(zeros)
    qm = layer.quant_method
    qm.finalize(layer)
    assert qm.use_kernel == CUDA
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref = layer(x)
    qm.use_kernel = True
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x[:1]), ref[:1], rtol=1e-4, atol=1e-5)  # the skinny form


def test_activation_order_layer_through_the_kernel():
    """GPTQ desc_act: a merged (gate | up) layer whose inputs' groups follow a random order (shared by both parts).
    finalize sorts the stored columns by group; the dequantizing path and the kernel (forced here on CPU, run by
    the interpreter) both equal x @ W.T of the weight as the checkpoint means it."""
    from moeserve.layers.linear import MergedColumnParallelLinear
    from moeserve.layers.quant.int4 import Int4Config, Int4LinearMethod

    n, k, group = 48, 64, 16
    cfg = Int4Config("gptq", group, False, zero_offset=1, act_order=True)
    with torch.device("meta"):
        layer = MergedColumnParallelLinear(k, [24, 24], bias=False)
        Int4LinearMethod(cfg).create_weights(layer, "mlp.gate_up_proj")
    layer = layer.to_empty(device=DEVICE)
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (n, k // group), generator=g).to(torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) / k ** 0.5 + 1e-3).half()
    g_idx = (torch.randperm(k, generator=g) // group).to(torch.int32)  # the group of each input
    layer.qweight.data.copy_(pack_int32(q, 1))
    layer.scales.data.copy_(scales)
    layer.qzeros.data.copy_(zeros)
    layer.g_idx.data.copy_(g_idx.expand(2, k))
    w = (q.float() - zeros.float()[:, g_idx.long()]) * scales.float()[:, g_idx.long()]
    qm = layer.quant_method
    qm.finalize(layer)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref = x @ w.to(DEVICE).t()
    qm.use_kernel = False
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)
    qm.use_kernel = True
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x[:1]), ref[:1], rtol=1e-4, atol=1e-5)  # the skinny form
    torch.testing.assert_close(qm.dequantize(layer), w.to(DEVICE))


@pytest.mark.parametrize("M", [1, 3, 5, 17])
def test_every_candidate_config_matches_reference(M):
    """What the autotuner may pick on a GPU, each config forced: GEMV slabs of all rows (K tiles cut to divide the
    group, split K with the partials added in the same launch) and tl.dot tiles; K = 96 over split ranges that do
    not divide it (a split may get no tile at all)."""
    N, K, group = 40, 96, 32
    packed, scales, zeros = _weight(N, K, group, 11 + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    b = torch.randn(N, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ dequantize(packed, scales, zeros, group, torch.float64).t() + b.double()
    cands = ik.int4_candidates(M, N, group)
    if M <= ik.SKINNY_ROWS:
        assert any(c["SPLIT_K"] > 1 for c in cands)
    for cfg in cands:
        if "BLOCK_M" not in cfg:  # tiny shape: a smaller slab, the same code paths
            cfg = dict(cfg, BLOCK_N=min(cfg["BLOCK_N"], 16), BLOCK_K=min(cfg["BLOCK_K"], 128))
        out = torch.empty(M, N, device=DEVICE)
        ik.apply_config(cfg, x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group,
                        b.to(DEVICE), out)
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (cfg, err)
