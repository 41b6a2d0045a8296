"""Fused MoE kernel and its expert sort against the plain-torch reference, on fresh random inputs.

CUDA: compiled kernels on larger shapes. No CUDA: the Triton interpreter on tiny shapes.
"""

from __future__ import annotations


import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

from moeserve.kernels import reference  # noqa: E402


moe_align = load_kernel("moe_align", "_align_single_kernel")
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


@pytest.mark.parametrize("pairs", [7, 300, 2500])  # one-program path and three-launch path
def test_align_pairs_groups_every_pair_once(pairs):
    E, bm = 12, 16
    ids = torch.randint(0, E, (pairs, 1), dtype=torch.int32)
    ids[: pairs // 3] = 5  # one crowded expert
    sorted_pairs, block_expert, num_post, num_blocks = moe_align.align_pairs(ids.to(DEVICE), E, bm)
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


ALL_CANDIDATES = [c for tokens in (1, 16, 128, 1024) for c in fused.moe_candidates(tokens, 8, 128)]


@pytest.mark.parametrize("cfg", ALL_CANDIDATES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_tuning_candidate_is_correct(cfg, monkeypatch):
    """Each config any regime may pick (incl. the no-sort decode mode), on a small odd shape."""
    monkeypatch.setattr(fused, "get_tuner", lambda: _Fixed(cfg))
    check(3, 8, 2, 64, 48, torch.float32)


FOLDED = [c for c in fused.moe_candidates(1, 8, 128) if c.get("FOLD")]


@pytest.mark.parametrize("cfg", FOLDED, ids=lambda c: f"N2={c['BLOCK_N2']}-K2={c['BLOCK_K2']}")
@pytest.mark.parametrize("T", [1, 2])
def test_folded_down_sum_at_decode_shapes(cfg, T, monkeypatch):
    """The down GEMV with the sum over K inside (decode candidates), in bf16: on the GPU at qwen3-30b-a3b's
    expert shape, in the interpreter at a small odd one."""
    monkeypatch.setattr(fused, "get_tuner", lambda: _Fixed(cfg))
    if CUDA:
        check(T, 128, 8, 2048, 768, torch.bfloat16)
    else:
        check(T, 8, 4, 64, 40, torch.bfloat16)
