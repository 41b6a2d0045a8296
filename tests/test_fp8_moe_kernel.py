"""kernels/fused_moe with fp8 experts (W8A16: e4m3 block-scaled weights widened and scaled per tile or per element in
the kernels) against the CPU reference (layers/quant/fp8 dequantize + experts_reference). No CUDA: Triton's
interpreter on tiny odd shapes."""

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
    out = fm.fused_moe(x.to(DEVICE, dtype), w13q.to(DEVICE), w2q.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE),
                       expert_map=None if emap is None else emap.to(DEVICE), w13_scale=w13s.to(DEVICE),
                       w2_scale=w2s.to(DEVICE), blocks=blocks)
    ref = experts_reference(x.double(), w13d.double(), w2d.double(), weights.double(), ids, emap)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if CUDA else 1e-5), err


def test_experts_layer_dispatches_to_the_kernel():
    """An fp8 Experts module (block checkpoint layout) picks the fused_moe kernels on CUDA (forced on CPU,
    interpreted)."""
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


class _Fixed:
    """Stands in for the autotuner: always the given config."""

    def __init__(self, cfg):
        self.cfg = cfg

    def choose(self, kernel, key, candidates, run, default):
        return self.cfg


# Scale blocks of the three kinds a candidate meets: K tiles fitted inside 16-wide blocks (the tuner's candidates
# narrowed to them), one block over all of K (per-row), blocks narrower than any K tile (element by element).
KINDS = {"tile": {"w13": (8, 16), "w2": (8, 16)}, "row": {"w13": (1, 72), "w2": (1, 40)},
         "elem": {"w13": (4, 8), "w2": (8, 8)}}
H_, I_ = 72, 40  # several K tiles, the last one partial; no block size divides I


def _candidates(kind):
    (_, bk1), (_, bk2) = KINDS[kind]["w13"], KINDS[kind]["w2"]
    scale_k = (bk1 if bk1 < H_ else 0, bk2 if bk2 < I_ else 0)
    elem = 2 if CUDA else 4  # bf16 on the GPU, fp32 in the interpreter
    # W8A8 forms (bf16 activations only) quantize the activations: test_w8a8_candidates_match_their_arithmetic
    return [c for tokens in (1, 16, 128, 1024) for c in fm.moe_candidates(tokens, 8, 128, elem, scale_k, a8=True)
            if not c.get("A8")]


CANDIDATES = [(kind, c) for kind in KINDS for c in _candidates(kind)]


@pytest.mark.parametrize("kind,cfg", CANDIDATES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(str(x) for x in v.values()))
def test_every_tuning_candidate_with_fp8_experts(kind, cfg, monkeypatch):
    """Each config the tuner may pick for fp8 experts (dot and GEMV gate/up, sorted and folded down) on each kind
    of scale block, one and three tokens, against the dequantized reference."""
    monkeypatch.setattr(fm, "get_tuner", lambda: _Fixed(cfg))
    blocks = KINDS[kind]
    E, K = 4, 2
    g = torch.Generator().manual_seed(len(CANDIDATES))
    w13q, w13s, w2q, w2s, w13d, w2d = _experts(E, H_, I_, blocks, g)
    dtype = torch.bfloat16 if CUDA else torch.float32
    for T in (1, 3):
        x = torch.randn(T, H_, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
        weights = torch.rand(T, K, generator=g)
        out = fm.fused_moe(x.to(DEVICE, dtype), w13q.to(DEVICE), w2q.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE),
                           w13_scale=w13s.to(DEVICE), w2_scale=w2s.to(DEVICE), blocks=blocks)
        ref = experts_reference(x.double(), w13d.double(), w2d.double(), weights.double(), ids, None)
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < (2e-2 if CUDA else 1e-5), (T, err)


def test_candidates_keep_k_tiles_inside_scale_blocks():
    """fp8 checkpoints' 128-wide blocks: every candidate's K tiles divide them, the tile keeps its element count."""
    bf16 = fm.moe_candidates(1, 8, 128)
    fp8 = fm.moe_candidates(1, 8, 128, 2, (128, 128))
    assert all(128 % c["BLOCK_K1"] == 0 and 128 % c["BLOCK_K2"] == 0 for c in fp8)
    assert any(c["BLOCK_K1"] > 128 for c in bf16)  # the decode GEMVs' deep tiles, narrowed above
    assert {c["BLOCK_N1"] * c["BLOCK_K1"] for c in fp8} <= {c["BLOCK_N1"] * c["BLOCK_K1"] for c in bf16}
    assert fm.moe_candidates(1, 8, 128, 2, (0, 0)) == bf16  # per-row scales: any tile


def test_bad_scales_are_refused():
    E, H, I = 2, 32, 16
    g = torch.Generator().manual_seed(0)
    blocks = {"w13": (8, 16), "w2": (8, 16)}
    w13q, w13s, w2q, w2s, _, _ = _experts(E, H, I, blocks, g)
    x, w, ids = torch.randn(3, H), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="w2_scale .* does not fit"):
        fm.fused_moe(x, w13q, w2q, w, ids, w13_scale=w13s, w2_scale=w2s[:, :1], blocks=blocks)
    with pytest.raises(ValueError, match="together"):
        fm.fused_moe(x, w13q, w2q, w, ids, w13_scale=w13s, blocks=blocks)
    with pytest.raises(ValueError, match="e4m3 with fp32 scales or int4"):
        fm.fused_moe(x, w13q.float(), w2q, w, ids, w13_scale=w13s, w2_scale=w2s, blocks=blocks)


def _a8_reference(x, w13d, w2d, weights, ids, g1, g2):
    """W8A8's arithmetic in float64: x and the SiLU-and-mul rows quantized per token per group by the kernels'
    own activation quantization (kernels/fp8_linear, tested on its own; Triton 3.6's interpreter rounds a few
    codes differently from torch's cast, e.g. 125.9 -> 64 where torch gives 128), weights dequantized."""
    def dq(t, group):
        group = min(group, t.shape[1])
        q, s = fm._fp8_linear.quantize_act(t.to(DEVICE), group)
        return q.cpu().double() * s.cpu().double().repeat_interleave(group, dim=1)[:, :t.shape[1]]

    xq = dq(x, g1)
    inter = w13d.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gu = w13d[e].double() @ xq[t]
            h = (torch.nn.functional.silu(gu[:inter]) * gu[inter:]).float()[None]  # inter1 is stored in x's dtype
            out[t] += weights[t, k].double() * (w2d[e].double() @ dq(h, g2)[0])
    return out


A8_KINDS = {"tile": {"w13": (8, 32), "w2": (8, 32)}, "row": {"w13": (1, 72), "w2": (1, 40)}}
A8_CANDIDATES = [(kind, c) for kind, b in A8_KINDS.items() for tokens in (1, 16, 128, 1024)
                 for c in fm.moe_candidates(tokens, 8, 128, 2, (b["w13"][1] if b["w13"][1] < H_ else 0,
                                                                 b["w2"][1] if b["w2"][1] < I_ else 0), a8=True)
                 if c.get("A8")]


@pytest.mark.parametrize("kind,cfg", A8_CANDIDATES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(str(x) for x in v.values()))
def test_w8a8_candidates_match_their_arithmetic(kind, cfg, monkeypatch):
    """The W8A8 forms (fp8 activations per token per scale block, fp8 tensor cores) of every tiled config, decode's
    and prefill's, against the same arithmetic in float64; a wrong activation or weight scale is off by far more."""
    monkeypatch.setattr(fm, "get_tuner", lambda: _Fixed(cfg))
    blocks = A8_KINDS[kind]
    E, K, T = 4, 2, 5
    g = torch.Generator().manual_seed(11)
    w13q, w13s, w2q, w2s, w13d, w2d = _experts(E, H_, I_, blocks, g)
    x = torch.randn(T, H_, generator=g) * torch.logspace(0, 2, H_)[None]  # groups of different magnitudes
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, K, generator=g)
    dtype = torch.bfloat16 if CUDA else torch.float32
    out = fm.fused_moe(x.to(DEVICE, dtype), w13q.to(DEVICE), w2q.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE),
                       w13_scale=w13s.to(DEVICE), w2_scale=w2s.to(DEVICE), blocks=blocks)
    ref = _a8_reference(x.to(dtype).float(), w13d, w2d, weights, ids, blocks["w13"][1], blocks["w2"][1])
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (3e-2 if CUDA else 2e-3), err


def test_w8a8_forms_of_tiled_configs_with_bf16_activations_only():
    for tokens in (1, 16, 1024):  # decode (one or two tokens: GEMV and folded forms too), 1 row an expert, prefill
        cands = fm.moe_candidates(tokens, 8, 128, 2, (128, 128), a8=True)
        a8 = [c for c in cands if c.get("A8")]
        assert a8 and not any(c.get("GEMV1") or c.get("FOLD") for c in a8)  # those have no fp8 x fp8 form
        assert len(a8) == len([c for c in cands if not (c.get("A8") or c.get("GEMV1") or c.get("FOLD"))])
    assert not any(c.get("A8") for c in fm.moe_candidates(1024, 8, 128, 4, (128, 128), a8=True))  # fp32 activations
    assert not any(c.get("A8") for c in fm.moe_candidates(1024, 8, 128, 2, (128, 128)))  # int4 experts
    assert not any(c.get("A8") for c in fm.moe_candidates(1024, 8, 128))  # bf16 experts