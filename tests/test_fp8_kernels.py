"""kernels/fp8_linear (W8A8 block-scaled GEMM and dynamic activation quantization) against the CPU reference of
layers/quant/fp8. CUDA: compiled, at a real projection shape too. No CUDA: Triton's interpreter on tiny odd shapes,
the fp8 x fp8 tl.dot included (the interpreter emulates it)."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

fk = load_kernel("fp8_linear", "_gemm_kernel")

from moeserve.layers.quant.fp8 import _expand, quantize_act_groups, quantize_blocks  # noqa: E402

SHAPES = [(37, 40, (16, 32)), (20, 96, (8, 32)), (64, 33, (32, 32))] + ([(5120, 2048, (128, 128))] if CUDA else [])


@pytest.mark.parametrize("M", [1, 3, 17])
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
    ref = (xq.double().cpu() * xs.double().cpu()) @ (wq.double() * ws.double()).t() + b.to(dtype).double()
    assert ((out - ref).norm() / ref.norm()).item() < (1e-2 if CUDA else 2e-3)


def test_online_layer_dispatches_to_the_channel_kernel():
    from moeserve.layers.linear import MergedColumnParallelLinear
    from moeserve.layers.quant.fp8 import Fp8Config, Fp8LinearMethod

    layer = MergedColumnParallelLinear(48, [32, 32], bias=False)
    Fp8LinearMethod(Fp8Config(block=None)).create_weights(layer, "mlp.gate_up_proj")
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
