"""kernels/fused_moe with int4 experts (W4A16: codes unpacked in the kernels, minus their zero, scaled per column or
per element) against the CPU reference (layers/quant/int4 dequantize + experts_reference). No CUDA: Triton's
interpreter on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

moe_align = load_kernel("moe_align", "_align_sorted_kernel")
fm = load_kernel("fused_moe", "_gate_up_kernel")
if not CUDA:
    fm.align_pairs = moe_align.align_pairs  # the reloaded one

from moeserve.layers.experts import experts_reference  # noqa: E402
from moeserve.layers.quant.int4 import dequantize, pack_int32  # noqa: E402


def _w4(lead, n, k, group, g, sym=False):
    q = torch.randint(0, 16, (*lead, n, k), generator=g)
    zeros = None if sym else torch.randint(0, 16, (*lead, n, k // group), generator=g).to(torch.uint8)
    scales = torch.rand(*lead, n, k // group, generator=g) / k ** 0.5 + 1e-3
    return pack_int32(q, -1), scales, zeros


def _dev(t):
    return None if t is None else t.to(DEVICE)


def _run(x, w13, w2, group, weights, ids, emap=None):
    (p13, s13, z13), (p2, s2, z2) = [[_dev(t) for t in w] for w in (w13, w2)]
    return fm.fused_moe(x, p13, p2, weights, ids, expert_map=emap, w13_scale=s13, w2_scale=s2,
                        blocks={"w13": (1, group), "w2": (1, group)}, w13_zeros=z13, w2_zeros=z2)


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
    out = _run(x.to(DEVICE, dtype), w13, w2, group, weights.to(DEVICE), ids.to(DEVICE),
               None if emap is None else emap.to(DEVICE))
    w13d, w2d = dequantize(*w13, group, torch.float64), dequantize(*w2, group, torch.float64)
    ref = experts_reference(x.double(), w13d, w2d, weights.double(), ids, emap)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if CUDA else 1e-5), err


def test_experts_layer_dispatches_to_the_kernel():
    """A compressed-tensors Experts module picks the fused_moe kernels on CUDA (forced on CPU, interpreted)."""
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


class _Fixed:
    """Stands in for the autotuner: always the given config."""

    def __init__(self, cfg):
        self.cfg = cfg

    def choose(self, kernel, key, candidates, run, default):
        return self.cfg


H_, I_ = 160, 96  # several K tiles, whole groups; tiles of 64 and 128 end partial along H


def _candidates(group):
    elem = 2 if CUDA else 4  # bf16 on the GPU, fp32 in the interpreter
    scale_k = (group if group < H_ else 0, group if group < I_ else 0)
    return [c for tokens in (1, 16, 128, 1024) for c in fm.moe_candidates(tokens, 8, 128, elem, scale_k, int4=True)]


# groups of 8 (narrower than any K tile: element by element) and 32 (tiles fitted inside); zeros or symmetric
CANDIDATES = [(group, sym, c) for group, sym in ((8, False), (32, True), (32, False)) for c in _candidates(group)]


@pytest.mark.parametrize("group,sym,cfg", CANDIDATES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         "-".join(str(x) for x in v.values()))
def test_every_tuning_candidate_with_int4_experts(group, sym, cfg, monkeypatch):
    """Each config the tuner may pick (dot and GEMV gate/up, sorted and folded down) with int4 experts, one and
    three tokens, against the dequantized reference."""
    monkeypatch.setattr(fm, "get_tuner", lambda: _Fixed(cfg))
    E, K = 4, 2
    g = torch.Generator().manual_seed(group + sym)
    w13, w2 = _w4((E,), 2 * I_, H_, group, g, sym), _w4((E,), H_, I_, group, g, sym)
    w13d, w2d = dequantize(*w13, group, torch.float64), dequantize(*w2, group, torch.float64)
    dtype = torch.bfloat16 if CUDA else torch.float32
    for T in (1, 3):
        x = torch.randn(T, H_, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
        weights = torch.rand(T, K, generator=g)
        out = _run(x.to(DEVICE, dtype), w13, w2, group, weights.to(DEVICE), ids.to(DEVICE))
        ref = experts_reference(x.double(), w13d, w2d, weights.double(), ids, None)
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < (2e-2 if CUDA else 1e-5), (T, err)


def test_bad_int4_inputs_are_refused():
    E, H, I, G = 2, 32, 16, 8
    g = torch.Generator().manual_seed(0)
    (p13, s13, z13), (p2, s2, z2) = _w4((E,), 2 * I, H, G, g), _w4((E,), H, I, G, g)
    x, w, ids = torch.randn(3, H), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    blocks = {"w13": (1, G), "w2": (1, G)}
    with pytest.raises(ValueError, match="for neither"):
        fm.fused_moe(x, p13, p2, w, ids, w13_scale=s13, w2_scale=s2, blocks=blocks, w13_zeros=z13)
    with pytest.raises(ValueError, match="w2_zeros .* its scales' shape"):
        fm.fused_moe(x, p13, p2, w, ids, w13_scale=s13, w2_scale=s2, blocks=blocks, w13_zeros=z13,
                     w2_zeros=z2[:, :1])
    with pytest.raises(ValueError, match="disagree"):
        fm.fused_moe(x, p13, p2[:, :, :1], w, ids, w13_scale=s13, w2_scale=s2, blocks=blocks)
