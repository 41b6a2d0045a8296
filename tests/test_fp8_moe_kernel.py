"""kernels/fp8_moe (W8A16 fused MoE, fp8 block-scaled expert weights scaled per tile or per element) against the CPU
reference (layers/quant/fp8 dequantize + experts_reference). No CUDA: Triton's interpreter on tiny odd shapes."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

fm = load_kernel("fp8_moe", "_fp8_gate_up_kernel")

from moeserve.layers.experts import experts_reference  # noqa: E402
from moeserve.layers.quant.fp8 import _expand, quantize_blocks  # noqa: E402


def _experts(E, H, I, blocks, g):
    """fp8 w13/w2 with scales in the layout of Fp8MoEMethod, and their dequantized fp32 values."""
    (bn1, bk1), (bn2, bk2) = blocks["w13"], blocks["w2"]
    w13q, w13s, w2q, w2s, w13d, w2d = [], [], [], [], [], []
    for _ in range(E):
        gate, up = (quantize_blocks(torch.randn(I, H, generator=g) / H ** 0.5, (bn1, bk1)) for _ in range(2))
        down = quantize_blocks(torch.randn(H, I, generator=g) / I ** 0.5, (bn2, bk2))
        w13q.append(torch.cat([gate[0], up[0]]))
        w13s.append(torch.cat([gate[1], up[1]]))
        w13d.append(torch.cat([_expand(*gate, bn1, bk1), _expand(*up, bn1, bk1)]))
        w2q.append(down[0])
        w2s.append(down[1])
        w2d.append(_expand(*down, bn2, bk2))
    return [torch.stack(t) for t in (w13q, w13s, w2q, w2s, w13d, w2d)]


BLOCKS = [{"w13": (8, 16), "w2": (8, 16)},  # K tiles of 16 inside each scale block
          {"w13": (1, 40), "w2": (1, 24)},  # online per-row: one scale block spans K
          {"w13": (16, 32), "w2": (16, 32)},  # two K tiles over H = 40, the second one masked
          {"w13": (8, 8), "w2": (4, 8)}]  # scale blocks narrower than tl.dot's K: element by element


def test_k_tiles_stay_inside_one_scale_block_where_they_can():
    from moeserve.kernels.fused_moe import scale_k_tile

    assert scale_k_tile(128, 7168, 2) == (64, True)  # DeepSeek-V3/R1, Kimi K2, Qwen3-FP8 checkpoints
    assert scale_k_tile(7168, 7168, 2) == (64, True)  # online per-row
    assert scale_k_tile(16, 40, 4) == (16, True)
    assert scale_k_tile(48, 96, 2) == (16, True)
    assert scale_k_tile(8, 40, 2) == (64, False)
    assert scale_k_tile(32, 7168, 2) == (32, True)  # Kimi K2.5's int4 groups
    assert scale_k_tile(128, 7168, 4) == (32, True)


@pytest.mark.parametrize("T", [1, 3, 19])
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("mapped", [False, True])
def test_fp8_fused_moe_matches_reference(T, blocks, mapped):
    E, H, I, K = 4, 40, 24, 2
    g = torch.Generator().manual_seed(T * 7 + mapped)
    w13q, w13s, w2q, w2s, w13d, w2d = _experts(E, H, I, blocks, g)
    x = torch.randn(T, H, generator=g)
    num_ids = 6 if mapped else E  # mapped: 6 global experts, this rank holds global 1..4 as local 0..3
    ids = torch.stack([torch.randperm(num_ids, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, K, generator=g)
    emap = torch.tensor([-1, 0, 1, 2, 3, -1], dtype=torch.int32) if mapped else None
    dtype = torch.bfloat16 if CUDA else torch.float32
    out = fm.fp8_fused_moe(x.to(DEVICE, dtype), w13q.to(DEVICE), w13s.to(DEVICE), w2q.to(DEVICE), w2s.to(DEVICE),
                           blocks, weights.to(DEVICE), ids.to(DEVICE), None if emap is None else emap.to(DEVICE))
    ref = experts_reference(x.double(), w13d.double(), w2d.double(), weights.double(), ids, emap)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if CUDA else 1e-5), err


def test_experts_layer_dispatches_to_the_kernel():
    """An fp8 Experts module (block checkpoint layout) picks kernels.fp8_moe on CUDA (forced on CPU, interpreted)."""
    from moeserve.layers.experts import Experts
    from moeserve.layers.quant.fp8 import Fp8Config, Fp8MoEMethod

    E, H, I, K, T = 4, 32, 16, 2, 5
    experts = Experts(E, H, I)
    Fp8MoEMethod(Fp8Config(block=(8, 8))).create_weights(experts, "mlp.experts")
    g = torch.Generator().manual_seed(1)
    w13q, w13s, w2q, w2s, _, _ = _experts(E, H, I, {"w13": (8, 8), "w2": (8, 8)}, g)
    with torch.no_grad():
        for name, t in (("w13", w13q), ("w13_weight_scale_inv", w13s), ("w2", w2q), ("w2_weight_scale_inv", w2s)):
            getattr(experts, name).copy_(t)
    experts.to(DEVICE)
    experts.post_load()
    experts.quant_method.finalize(experts)
    assert experts.quant_method.use_kernel == CUDA
    x = torch.randn(T, H, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32).to(DEVICE)
    w = torch.rand(T, K, generator=g).to(DEVICE)
    experts.quant_method.use_kernel = False
    ref = experts._local(x, w, ids).double()
    experts.quant_method.use_kernel = True
    out = experts._local(x, w, ids).double()
    assert ((out - ref).norm() / ref.norm()).item() < (2e-2 if CUDA else 1e-5)
