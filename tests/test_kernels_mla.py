"""MLA decode kernel and latent cache write against the reference in layers/mla.py, on fresh random inputs;
the CUDA prefill path (latents expanded into the paged attention kernel) against the CPU reference.

On a CUDA machine the compiled kernels run on DeepSeek-sized shapes; without CUDA the same tests run the kernels
in the Triton interpreter on tiny shapes (TRITON_INTERPRET=1, set before the kernels are imported).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

from moeserve.kernels import runtime  # noqa: E402
from moeserve.layers import mla  # noqa: E402


kernel = load_kernel("mla_decode", "_mla_decode_kernel")
load_kernel("attention", "_attn_kernel")  # the prefill path imports it lazily: make sure it is the interpreted one
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_decode(ctx_lens, heads, R, P, page, dtype, seed, spare_blocks=3):
    """A latent cache with shuffled pages, block tables with junk past each sequence's end, absorbed queries."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-c // page) for c in ctx_lens]
    num_blocks = sum(pages) + spare_blocks
    cache = torch.randn(num_blocks, page, R + P, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(ctx_lens), max(pages) + 2), num_blocks - 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[used:used + n].int()
        used += n
    q_lat = (torch.randn(len(ctx_lens), heads, R, generator=g) / R ** 0.25).to(dtype)
    q_pe = torch.randn(len(ctx_lens), heads, P, generator=g).to(dtype)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q_lat, q_pe, cache, seq_lens, tables)]


def run_both(ctx_lens, heads, R, P, page, dtype, seed, max_seq_len=None):
    q_lat, q_pe, cache, seq_lens, tables = make_decode(ctx_lens, heads, R, P, page, dtype, seed)
    scale = 0.7 / (R ** 0.5)
    out = torch.full_like(q_lat, float("nan"))  # poison: every element must be written
    kernel.mla_decode(q_lat, q_pe, cache, seq_lens=seq_lens, block_tables=tables, scale=scale,
                      max_seq_len=max_seq_len or max(ctx_lens), out=out)
    ref = mla.mla_decode_reference(q_lat.double(), q_pe.double(), cache.double(), seq_lens=seq_lens,
                                   block_tables=tables, scale=scale)
    return out, ref


# (ctx_lens, heads, kv_lora_rank, rope dim, page): odd lengths, heads below / above one 16-row block, page 1.
CASES_CPU = [
    ([5, 17, 40], 4, 32, 8, 16),
    ([1, 33], 16, 64, 16, 16),
    ([70, 3], 20, 32, 8, 32),
    ([9], 6, 48, 8, 1),
]
CASES_GPU = CASES_CPU + [
    ([384] * 32, 16, 512, 64, 16),  # DeepSeek-V2-Lite
    ([4096, 1000, 17], 16, 512, 64, 16),
    ([3000, 129, 64, 1], 128, 512, 64, 16),  # DeepSeek-V3 / Kimi K2 heads
    ([2000] * 64, 16, 512, 64, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES_GPU if CUDA else CASES_CPU)
def test_mla_decode_matches_reference(case, dtype):
    ctx, h, R, P, page = case
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs each run; the seed is in the failure message
    out, ref = run_both(ctx, h, R, P, page, dtype, seed=seed)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


def test_split_context_and_loose_max_seq_len(monkeypatch):
    """Many context segments per sequence (split-K, some empty) and max_seq_len far above the real lengths."""
    monkeypatch.setattr(runtime, "num_sms", lambda device: 64)
    out, ref = run_both([70, 3, 130], 4, 32, 8, 16, torch.float32, seed=7, max_seq_len=4096)
    assert rel_err(out, ref) < TOL[torch.float32]


class _Pick:
    """Stands in for the autotuner: always the candidate at one index (every candidate must be correct)."""

    def __init__(self, index: int):
        self.index = index

    def choose(self, kernel, key, candidates, run, default):
        return candidates[self.index % len(candidates)]


@pytest.mark.parametrize("index", range(5))
def test_every_tuning_candidate_is_correct(index, monkeypatch):
    monkeypatch.setattr(kernel, "get_tuner", lambda: _Pick(index))
    out, ref = run_both([19, 40], 20, 32, 8, 16, torch.float32, seed=index)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_latent_cache_matches_reference(dtype):
    g = torch.Generator().manual_seed(11)
    T, L, page, blocks = 13, 40, 16, 5
    fused = torch.randn(T, L + 24, generator=g).to(dtype)
    latent = fused[:, 24:]  # a strided view, as split from a wider projection
    slots = torch.randperm(blocks * page, generator=g)[:T]
    slots[[2, 7]] = -1  # padding tokens: skipped
    cache = torch.randn(blocks, page, L, generator=g).to(dtype)
    expect = cache.clone()
    mla.write_latent_reference(latent, expect, slots)
    cache, latent, slots = cache.to(DEVICE), latent.to(DEVICE), slots.to(DEVICE)
    kernel.write_latent_cache(latent, cache, slots)
    assert torch.equal(cache.cpu(), expect)


def test_bad_inputs_raise_clear_errors():
    q_lat, q_pe, cache, seq_lens, tables = make_decode([5], 4, 32, 8, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        kernel.mla_decode(q_lat, q_pe[..., :3], cache, seq_lens=seq_lens, block_tables=tables, scale=1.0,
                          max_seq_len=5)
    with pytest.raises(ValueError, match="latent cache must be"):
        kernel.mla_decode(q_lat, q_pe, cache[None], seq_lens=seq_lens, block_tables=tables, scale=1.0,
                          max_seq_len=5)
    with pytest.raises(ValueError, match="slot_mapping"):
        kernel.write_latent_cache(cache[0, :4], cache, torch.zeros(3, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_prefill_path_matches_reference(dtype):
    """Prefill over cached pages: latents expanded to K/V and run through the paged attention kernel."""
    g = torch.Generator().manual_seed(5)
    H, N, P, V, R, page = 4, 16, 8, 24, 32, 16
    att = mla.LatentAttention(H, R, N, P, V, scale=0.3, layer_idx=0)
    w_uk, w_uv = mla.split_kv_b(torch.randn(H * (N + V), R, generator=g) / R ** 0.5, H, N)
    n_pages, q_lens, ctx_lens = np.array([2, 1, 3]), np.array([5, 9, 33]), np.array([20, 9, 40])
    pages = torch.randn(int(n_pages.sum()), page, R + P, generator=g)
    q_nope = torch.randn(int(q_lens.sum()), H, N, generator=g)
    q_pe = torch.randn(int(q_lens.sum()), H, P, generator=g)
    ref = att._expanded(q_nope, q_pe, pages, n_pages, q_lens, ctx_lens, w_uk, w_uv)  # CPU reference
    args = [t.to(DEVICE, dtype) for t in (q_nope, q_pe, pages, w_uk, w_uv)]
    out = att._expanded_cuda(args[0], args[1], args[2], n_pages, q_lens, ctx_lens, args[3], args[4])
    assert out.shape == ref.shape
    assert rel_err(out.float().cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_norm_latent_kernel_matches_torch_path(interleaved, dtype):
    """kernels/mla_rope (one kernel) against layers/mla.rope_and_norm_latent's torch path: q_pe roped for every
    head (an odd head count: masked lanes), the latent's RMSNorm and roped k_pe, YaRN's attention factor in the
    tables, positions out of order; q as the strided view of a wider projection, kv as kv_a's output."""
    from moeserve.layers.norm import RMSNorm
    from moeserve.layers.rotary import RotaryEmbedding

    mod = load_kernel("mla_rope", "_mla_rope_norm_kernel")
    g = torch.Generator().manual_seed(int(interleaved))
    T, H, N, P, R = 7, 3, 16, 8, 24 if not CUDA else 512
    rotary = RotaryEmbedding(P, 4096, 10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                                "mscale": 0.9, "mscale_all_dim": 0.7}, interleaved=interleaved)
    assert rotary.attention_factor != 1.0
    norm = RMSNorm(R, 1e-6)
    norm.weight.data = (torch.rand(R, generator=g) + 0.5).to(dtype)
    q = torch.randn(T, H * (N + P) + 5, generator=g).to(dtype)[:, :H * (N + P)].view(T, H, N + P)
    kv = torch.randn(T, R + P, generator=g).to(dtype) * 3
    positions = torch.tensor([5, 0, 4095, 17, 3, 1000, 64])
    want_q, want_lat = mla.rope_and_norm_latent(rotary, norm, positions, q, kv, N)
    cos, sin = rotary._cos_sin(torch.device(DEVICE))
    got_q, got_lat = mod.mla_rope_norm(q.to(DEVICE), kv.to(DEVICE), positions.to(DEVICE), cos, sin,
                                       norm.weight.to(DEVICE), norm.eps, N, interleaved)
    if CUDA:  # the layer's helper takes the kernel on CUDA
        norm.to(DEVICE)
        same = mla.rope_and_norm_latent(rotary, norm, positions.to(DEVICE), q.to(DEVICE), kv.to(DEVICE), N)
        assert torch.equal(same[0], got_q) and torch.equal(same[1], got_lat)
    assert got_q.is_contiguous() and got_q.shape == (T, H, P) and got_lat.shape == (T, R + P)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got_q.cpu(), want_q, **tol)
    torch.testing.assert_close(got_lat.cpu(), want_lat, **tol)
