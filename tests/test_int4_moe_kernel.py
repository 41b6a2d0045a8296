"""kernels/int4_moe (W4A16 fused MoE, int4 expert weights unpacked and dequantized in the kernel) against the CPU
reference (layers/quant/int4 dequantize + experts_reference). No CUDA: Triton's interpreter on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

im = load_kernel("int4_moe", "_int4_gate_up_kernel")

from moeserve.layers.experts import experts_reference  # noqa: E402
from moeserve.layers.quant.int4 import dequantize, pack_int32  # noqa: E402


def _w4(lead, n, k, group, g, sym=False):
    q = torch.randint(0, 16, (*lead, n, k), generator=g)
    zeros = None if sym else torch.randint(0, 16, (*lead, n, k // group), generator=g).to(torch.uint8)
    scales = torch.rand(*lead, n, k // group, generator=g) / k ** 0.5 + 1e-3
    return pack_int32(q, -1), scales, zeros


def _dev(t):
    return None if t is None else t.to(DEVICE)


def test_k_tiles_stay_inside_one_group_where_they_can():
    assert im.scale_k_tile(128, 7168, 2) == (64, True)  # AWQ/GPTQ groups of 128
    assert im.scale_k_tile(7168, 7168, 2) == (64, True)  # one group over the row
    assert im.scale_k_tile(16, 40, 4) == (16, True)
    assert im.scale_k_tile(48, 96, 2) == (16, True)
    assert im.scale_k_tile(8, 40, 2) == (64, False)
    assert im.scale_k_tile(32, 7168, 2) == (32, True)  # Kimi K2.5's int4 groups
    assert im.scale_k_tile(128, 7168, 4) == (32, True)


@pytest.mark.parametrize("T", [1, 3, 19])
@pytest.mark.parametrize("group", [8, 16, 32])  # 8: element-wise scales; 16, 32: one scale per column per K tile
@pytest.mark.parametrize("mapped", [False, True])
def test_int4_fused_moe_matches_reference(T, group, mapped):
    E, H, I, K = 4, 96, 32, 2
    g = torch.Generator().manual_seed(T * 7 + mapped + group)
    sym = mapped  # symmetric (no zeros, compressed-tensors) with the map, zeros without
    w13, w2 = _w4((E,), 2 * I, H, group, g, sym), _w4((E,), H, I, group, g, sym)
    x = torch.randn(T, H, generator=g)
    num_ids = 6 if mapped else E  # mapped: 6 global experts, this rank holds global 1..4 as local 0..3
    ids = torch.stack([torch.randperm(num_ids, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, K, generator=g)
    emap = torch.tensor([-1, 0, 1, 2, 3, -1], dtype=torch.int32) if mapped else None
    dtype = torch.bfloat16 if CUDA else torch.float32
    out = im.int4_fused_moe(x.to(DEVICE, dtype), tuple(_dev(t) for t in w13), tuple(_dev(t) for t in w2),
                            group, weights.to(DEVICE), ids.to(DEVICE), None if emap is None else emap.to(DEVICE))
    w13d, w2d = dequantize(*w13, group, torch.float64), dequantize(*w2, group, torch.float64)
    ref = experts_reference(x.double(), w13d, w2d, weights.double(), ids, emap)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if CUDA else 1e-5), err


def test_experts_layer_dispatches_to_the_kernel():
    """A compressed-tensors Experts module picks kernels.int4_moe on CUDA (forced on CPU, interpreted)."""
    from moeserve.layers.experts import Experts
    from moeserve.layers.quant.int4 import Int4Config, Int4MoEMethod

    E, H, I, K, T, G = 4, 32, 16, 2, 5, 8
    with torch.device("meta"):
        experts = Experts(E, H, I)
        Int4MoEMethod(Int4Config("compressed-tensors", G, True)).create_weights(experts, "mlp.experts")
    experts = experts.to_empty(device=DEVICE)
    g = torch.Generator().manual_seed(1)
    (p13, s13, _), (p2, s2, _) = _w4((E,), 2 * I, H, G, g), _w4((E,), H, I, G, g)
    with torch.no_grad():
        for name, t in (("w13_weight_packed", p13), ("w13_weight_scale", s13), ("w2_weight_packed", p2),
                        ("w2_weight_scale", s2)):
            getattr(experts, name).copy_(t)
    experts.post_load()
    experts.quant_method.finalize(experts)
    assert experts.quant_method.use_kernel == CUDA and not hasattr(experts, "w13_zeros")  # symmetric: no zeros
    assert experts.w13_weight_scale.dtype == torch.bfloat16  # as the checkpoint holds them
    x = torch.randn(T, H, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32).to(DEVICE)
    w = torch.rand(T, K, generator=g).to(DEVICE)
    experts.quant_method.use_kernel = False
    ref = experts._local(x, w, ids).double()
    experts.quant_method.use_kernel = True
    out = experts._local(x, w, ids).double()
    assert ((out - ref).norm() / ref.norm()).item() < (2e-2 if CUDA else 1e-5)
