"""Fused MoE kernel and its expert sort against the plain-torch reference, on fresh random inputs.

CUDA: compiled kernels on larger shapes. No CUDA: the Triton interpreter on tiny shapes.
"""

from __future__ import annotations


import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

from moeserve.kernels import reference  # noqa: E402


moe_align = load_kernel("moe_align", "_align_sorted_kernel")
fused = load_kernel("fused_moe", "_gate_up_kernel")
if not CUDA:
    fused.align_pairs = moe_align.align_pairs  # the reloaded one


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    """Correctness here; timing every new shape would cost compile time. Every candidate has its own test."""
    monkeypatch.setenv("MOESERVE_AUTOTUNE", "0")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def make_moe(T, E, K, H, inter, dtype, seed, id_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(K)
    return [t.to(DEVICE) for t in (x, w13, w2, weights, ids.to(id_dtype))]


def check(T, E, K, H, inter, dtype, id_dtype=torch.int32, **kw):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs each run; the seed is in the failure message
    x, w13, w2, weights, ids = make_moe(T, E, K, H, inter, dtype, seed, id_dtype)
    out = torch.full_like(x, float("nan"))  # poison: every element must be written
    fused.fused_moe(x, w13, w2, weights, ids, out=out, **kw)
    ref = reference.ref_fused_moe(x.double(), w13.double(), w2.double(), weights, ids)
    assert not torch.isnan(out).any(), f"unwritten output (seed {seed})"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


# (T, E, K, H, I): decode-sized, odd sizes (not multiples of any block), more pairs than one align program takes.
CASES_CPU = [(1, 8, 2, 64, 32), (5, 8, 2, 64, 48), (37, 16, 4, 96, 40), (1100, 4, 2, 32, 16)]
CASES_GPU = CASES_CPU + [(1, 128, 8, 2048, 768), (33, 128, 8, 2048, 768), (1000, 60, 4, 2048, 1408),
                         (4099, 128, 8, 1024, 384), (300, 8, 2, 4096, 14336 // 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CASES_GPU if CUDA else CASES_CPU)
def test_fused_moe_matches_reference(shape, dtype):
    check(*shape, dtype)


def test_int64_ids_and_token_chunks():
    """int64 ids, and a prefill cut into chunks (chunk_size smaller than T, last chunk short)."""
    check(23, 8, 2, 64, 32, torch.float32, id_dtype=torch.int64, chunk_size=10)


@pytest.mark.parametrize("pairs,method", [(7, "sort"), (7, "launches"), (300, "sort"), (2048, "sort"),
                                          (2500, "align_pairs"), (300, "launches")])
def test_align_pairs_groups_every_pair_once(pairs, method):
    """The sort (one program up to SORT_MAX pairs) and the three launches (beyond)."""
    E, bm = 12, 16
    ids = torch.randint(0, E, (pairs, 1), dtype=torch.int32)
    ids[: pairs // 3] = 5  # one crowded expert
    align = moe_align.align_pairs_in_three_launches if method == "launches" else moe_align.align_pairs
    sorted_pairs, block_expert, num_post, num_blocks = align(ids.to(DEVICE), E, bm)
    sorted_pairs, block_expert, n = sorted_pairs.cpu(), block_expert.cpu(), int(num_post)
    flat = ids.view(-1).long()
    counts = torch.bincount(flat, minlength=E)
    assert n == int(((counts + bm - 1) // bm * bm).sum()) and n % bm == 0
    used = sorted_pairs[:n]
    real = used[used < pairs]
    assert torch.equal(real.sort().values, torch.arange(pairs, dtype=torch.int32))  # each pair exactly once
    assert bool((used[used >= pairs] == pairs).all())  # padding slots carry the sentinel
    row_expert = block_expert[: n // bm].repeat_interleave(bm)
    assert torch.equal(flat[used[used < pairs].long()], row_expert[used < pairs].long())  # pair sits in its block
    assert bool((row_expert[1:] >= row_expert[:-1]).all())  # experts in order
    assert bool((block_expert[n // bm: num_blocks] == -1).all())
    for e in range(E):  # stable: pairs of one expert keep their order
        mine = real[flat[real.long()] == e]
        assert bool((mine[1:] > mine[:-1]).all())


@pytest.mark.parametrize("tokens,E,K,bm", [(1, 8, 2, 16), (5, 16, 4, 16), (32, 128, 8, 16), (9, 64, 6, 64),
                                           (130, 128, 8, 16)])
def test_sorted_align_equals_the_three_launches(tokens, E, K, bm):
    """The two paths give the same outputs exactly, ids out of range (dropped) and E = its power of two (no spare
    bin) included."""
    g = torch.Generator().manual_seed(tokens * E)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).to(torch.int32)
    ids[0, 0] = -1
    ids[-1, -1] = E
    want = moe_align.align_pairs_in_three_launches(ids.to(DEVICE), E, bm)
    got = moe_align.align_pairs(ids.to(DEVICE), E, bm)
    n = int(want[2])
    assert int(got[2]) == n and got[3] == want[3]
    assert torch.equal(got[0][:n].cpu(), want[0][:n].cpu())
    assert torch.equal(got[1].cpu(), want[1].cpu())


def test_bad_inputs_raise_clear_errors():
    x, w13, w2, weights, ids = make_moe(3, 4, 2, 32, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="disagree"):
        fused.fused_moe(x[:, :16], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="must both be"):
        fused.fused_moe(x, w13, w2, weights[:, :1], ids)
    with pytest.raises(ValueError, match="int32/int64"):
        fused.fused_moe(x, w13, w2, weights, ids.float())


class _Fixed:
    """Stands in for the autotuner: always the given config."""

    def __init__(self, cfg):
        self.cfg = cfg

    def choose(self, kernel, key, candidates, run, default):
        return self.cfg


# Each dtype with the candidates handed out for it (fp32 gets shallower tiles: bf16's would not fit shared memory).
ALL_CANDIDATES = [(dtype, c) for dtype in (torch.bfloat16, torch.float32) for tokens in (1, 16, 128, 1024)
                  for c in fused.moe_candidates(tokens, 8, 128, torch.empty(0, dtype=dtype).element_size())]


@pytest.mark.parametrize("dtype,cfg", ALL_CANDIDATES,
                         ids=lambda c: str(c).removeprefix("torch.") if isinstance(c, torch.dtype)
                         else "-".join(str(v) for v in c.values()))
def test_every_tuning_candidate_is_correct(dtype, cfg, monkeypatch):
    """Each config any regime may pick (incl. the no-sort decode mode), on a small odd shape."""
    monkeypatch.setattr(fused, "get_tuner", lambda: _Fixed(cfg))
    check(3, 8, 2, 64, 48, dtype)


def _decode(dtype):
    """The one/two-token candidates as moe_candidates hands them out for dtype (fp32 halves BLOCK_K)."""
    return fused.moe_candidates(1, 8, 128, torch.empty(0, dtype=dtype).element_size())


def _name(c):
    up = "gemv" if c.get("GEMV1") else f"dot{c['BLOCK_M']}x"
    down = "fold" if c.get("FOLD") else "down"
    return (f"{up}{c['BLOCK_N1']}x{c['BLOCK_K1']}w{c['W1']}-{down}{c['BLOCK_N2']}x{c['BLOCK_K2']}w{c['W2']}"
            f"-{'sort' if c['SORT'] else 'nosort'}")


DECODE = _decode(torch.bfloat16)
assert DECODE == fused.moe_candidates(2, 8, 128) and any(c.get("GEMV1") and not c.get("FOLD") for c in DECODE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("idx", range(len(DECODE)), ids=[_name(c) for c in DECODE])
@pytest.mark.parametrize("T", [1, 2])
def test_decode_candidates_at_decode_shapes(T, idx, dtype, monkeypatch):
    """Every one/two-token candidate (the sorted and no-sort dot paths, the GEMV gate/up, the folded down+sum and
    their mixes) as its dtype gets it: on the GPU at qwen3-30b-a3b's expert shape, in the interpreter at a small
    odd one (H = 136 and I = 20 are multiples of no block; blocks of K up to 128 take two k steps over H, the last
    partial). The interpreter costs ~0.1 s a program, hence K=2 and small I."""
    cfg = _decode(dtype)[idx]
    monkeypatch.setattr(fused, "get_tuner", lambda: _Fixed(cfg))
    if CUDA:
        check(T, 128, 8, 2048, 768, dtype)
    else:
        check(T, 8, 2, 136, 20, dtype)


@pytest.mark.parametrize("late", [False, True], ids=["step-sum", "late-sum"])
@pytest.mark.parametrize("H, inter", [(72, 20), (64, 16)], ids=["masked", "even"])
def test_gemv_gate_up_rows_and_pairs_without_an_expert(H, inter, late):
    """The GEMV gate/up alone, over several k steps, masked and unmasked: each real pair's inter1 row is
    silu(gate) * up; expert ids outside [0, E) (-1 and E) leave that pair's row alone (as the no-sort dot path)."""
    E, K, bn, bk = 4, 2, 8, 32
    x, w13, _, _, ids = make_moe(2, E, K, H, inter, torch.float32, seed=3)
    ids[0, 1], ids[1, 0] = -1, E
    inter1 = torch.full((4, inter), float("nan"), device=DEVICE)
    fused._gate_up_gemv_kernel[(4 * fused.triton.cdiv(inter, bn),)](
        x, w13, inter1, ids, E, H, inter, x.stride(0), w13.stride(0), w13.stride(1), inter1.stride(0),
        TOPK=K, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=H % bk == 0, EVEN_N=inter % bn == 0, LATE_SUM=late)
    inter1, x, w13, flat = inter1.cpu().double(), x.cpu().double(), w13.cpu().double(), ids.cpu().view(-1)
    for p in (0, 3):  # the two real pairs
        g, u = w13[flat[p], :inter] @ x[p // K], w13[flat[p], inter:] @ x[p // K]
        torch.testing.assert_close(inter1[p], torch.nn.functional.silu(g) * u, rtol=1e-5, atol=1e-6)
    assert torch.isnan(inter1[1]).all() and torch.isnan(inter1[2]).all()
