"""MLA prefill kernel (moeserve.kernels.mla_prefill) and the layer's CUDA prefill path (layers/mla.py
_expanded_cuda: expand chunk by chunk, varlen causal flash attention, log-sum-exp merge) against the fp64 CPU
reference, on fresh random inputs. Without CUDA the kernel runs in the Triton interpreter on tiny shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triton_kernels import DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

from moeserve.layers import mla  # noqa: E402
from moeserve.layers.attention import AttentionMetadata  # noqa: E402

kernel = load_kernel("mla_prefill", "_mla_prefill_kernel")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def rel_err(out, ref) -> float:
    assert not torch.isnan(out).any(), "NaN in output (an unwritten element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def setup(seed, H=4, N=16, P=8, V=24, R=32, page=16, n_pages=(2, 1, 3), q_lens=(5, 9, 33), ctx_lens=(20, 9, 40)):
    g = torch.Generator().manual_seed(seed)
    att = mla.LatentAttention(H, R, N, P, V, scale=0.3, layer_idx=0)
    w = torch.randn(H * (N + V), R, generator=g) / R ** 0.5
    n_pages, q_lens, ctx_lens = np.array(n_pages), np.array(q_lens), np.array(ctx_lens)
    pages = torch.randn(int(n_pages.sum()), page, R + P, generator=g)
    q_nope = torch.randn(int(q_lens.sum()), H, N, generator=g)
    q_pe = torch.randn(int(q_lens.sum()), H, P, generator=g)
    w_uk, w_uv = mla.split_kv_b(w.double(), H, N)
    ref = att._expanded(q_nope.double(), q_pe.double(), pages.double(), n_pages, q_lens, ctx_lens, w_uk, w_uv)
    return att, w, pages, q_nope, q_pe, n_pages, q_lens, ctx_lens, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [8192, 16, 7])
def test_prefill_path_matches_reference(dtype, chunk):
    """One chunk reads the pages in place; small chunks gather, expand and merge by log-sum-exp."""
    att, w, pages, q_nope, q_pe, n_pages, q_lens, ctx_lens, ref = setup(seed=chunk)
    att.prefill_chunk = chunk
    w = w.to(DEVICE, dtype)
    w_uk, w_uv = mla.split_kv_b(w, att.num_heads, att.nope_dim)  # views of one weight: the no-copy GEMM path
    assert mla._kv_b_full(w_uk, w_uv).data_ptr() == w.data_ptr()
    q_nope, q_pe, pages = (t.to(DEVICE, dtype) for t in (q_nope, q_pe, pages))
    out = att._expanded_cuda(q_nope, q_pe, pages, n_pages, q_lens, ctx_lens, w_uk, w_uv)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out.float().cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("chunk", [8192, 16])
def test_prefill_path_writes_into_a_view_of_out(chunk):
    """With out= (the prefill rows of a mixed batch's output, a view), the path writes those rows in place, on one
    chunk (the kernel's own stores) and on several (the merge copied in), and touches nothing around them."""
    att, w, pages, q_nope, q_pe, n_pages, q_lens, ctx_lens, ref = setup(seed=chunk + 1)
    att.prefill_chunk = chunk
    w = w.to(DEVICE)
    w_uk, w_uv = mla.split_kv_b(w, att.num_heads, att.nope_dim)
    q_nope, q_pe, pages = (t.to(DEVICE) for t in (q_nope, q_pe, pages))
    T = q_nope.shape[0]
    buf = torch.full((T + 5, att.num_heads, att.v_dim), 7.0, device=DEVICE)
    got = att._expanded_cuda(q_nope, q_pe, pages, n_pages, q_lens, ctx_lens, w_uk, w_uv, out=buf[3:3 + T])
    assert got.data_ptr() == buf[3:].data_ptr()
    assert rel_err(buf[3:3 + T].cpu(), ref) < TOL[torch.float32]
    assert (buf[:3] == 7).all() and (buf[3 + T:] == 7).all()


@pytest.mark.parametrize("q_lens", [(1, 1, 6, 9), (6, 1, 9, 1)])
def test_mixed_batch_rows_in_one_run_or_scattered(q_lens):
    """A mixed batch's prefill rows in one run (as the scheduler orders them) are planned as a slice and written in
    place; scattered among decode rows they are gathered and scattered back. Both equal each sequence alone."""
    g = torch.Generator().manual_seed(len(q_lens))
    H, N, P, V, R, page = 2, 8, 4, 8, 16, 4
    att = mla.LatentAttention(H, R, N, P, V, scale=0.4, layer_idx=0)
    w_uk, w_uv = mla.split_kv_b(torch.randn(H * (N + V), R, generator=g) / R ** 0.5, H, N)
    q_lens = np.array(q_lens)
    ctx = q_lens + np.array([5, 3, 0, 7])[:len(q_lens)]  # decodes and one prompt on a cached prefix
    n_pages = -(-ctx // page)
    cache = torch.randn(int(n_pages.sum()) + 1, page, R + P, generator=g)
    tables = torch.zeros(len(q_lens), int(n_pages.max()), dtype=torch.int32)
    first = np.concatenate([[0], np.cumsum(n_pages)[:-1]]) + 1
    for b, (f, n) in enumerate(zip(first, n_pages)):
        tables[b, :n] = torch.arange(f, f + n)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    meta = AttentionMetadata(slot_mapping=torch.full((int(qsl[-1]),), -1), query_start_loc=torch.from_numpy(qsl),
                             seq_lens=torch.from_numpy(ctx.astype(np.int32)), block_tables=tables,
                             max_query_len=int(q_lens.max()), max_seq_len=int(ctx.max()),
                             query_start_loc_cpu=qsl, seq_lens_cpu=ctx.astype(np.int32))
    q_nope, q_pe = torch.randn(int(qsl[-1]), H, N, generator=g), torch.randn(int(qsl[-1]), H, P, generator=g)
    out = att._attend_mixed(q_nope, q_pe, cache, w_uk, w_uv, meta)
    runs = q_lens[0] == 1  # decodes first: the prefill rows are one run
    assert isinstance(meta.mla_plan.pre_tok, slice) == runs
    for b in range(len(q_lens)):
        s = slice(int(qsl[b]), int(qsl[b + 1]))
        context = cache[tables[b, :n_pages[b]].long()].flatten(0, 1)[:ctx[b]]
        alone = mla.expanded_attention(q_nope[s], q_pe[s], context, w_uk, w_uv, att.scale)
        torch.testing.assert_close(out[s], alone, rtol=1e-5, atol=1e-5)


def test_uncached_prompts_one_token_pages():
    """The memory-profiling path: the new tokens are their own context (pages of one token)."""
    att, w, *_ = setup(seed=3)
    g = torch.Generator().manual_seed(11)
    q_lens = np.array([1, 17, 40])
    T = int(q_lens.sum())
    latent = torch.randn(T, att.latent_dim, generator=g)
    q_nope = torch.randn(T, att.num_heads, att.nope_dim, generator=g)
    q_pe = torch.randn(T, att.num_heads, att.rope_dim, generator=g)
    w_uk, w_uv = mla.split_kv_b(w, att.num_heads, att.nope_dim)
    ref = att._expanded(q_nope.double(), q_pe.double(), latent.double().unsqueeze(1), q_lens, q_lens, q_lens,
                        w_uk.double(), w_uv.double())
    att.prefill_chunk = 16
    out = att._expanded_cuda(q_nope.to(DEVICE), q_pe.to(DEVICE), latent.to(DEVICE).unsqueeze(1), q_lens, q_lens,
                             q_lens, w_uk.to(DEVICE), w_uv.to(DEVICE))
    assert rel_err(out.cpu(), ref) < 1e-5


def test_kernel_writes_every_row_and_lse():
    """Poisoned output and lse; lse checked against logsumexp of the scaled scores, -inf where no key is visible."""
    g = torch.Generator().manual_seed(7)
    H, N, P, V = 2, 16, 16, 16
    q_lens, k_lens, q_off = [3, 20], [0, 18], [0, -4]  # seq 1: its first 4 queries see no key of this chunk
    T, S = sum(q_lens), sum(k_lens)
    qn, qp = torch.randn(T, H, N, generator=g), torch.randn(T, H, P, generator=g)
    kn, kp, v = torch.randn(S, H, N, generator=g), torch.randn(S, P, generator=g), torch.randn(S, H, V, generator=g)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    out = torch.full((T, H, V), float("nan"), device=DEVICE)
    lse = torch.full((T, H), float("nan"), device=DEVICE)
    kernel.mla_prefill_attention(qn.to(DEVICE), qp.to(DEVICE), kn.to(DEVICE), kp.to(DEVICE), v.to(DEVICE),
                                 q_start=i32([0, 3]), q_len=i32(q_lens), k_start=i32([0, 0]), k_len=i32(k_lens),
                                 q_off=i32(q_off), max_q_len=max(q_lens), scale=0.5, out=out, lse=lse)
    out, lse = out.cpu().double(), lse.cpu().double()
    assert torch.all(out[:3] == 0) and torch.all(torch.isinf(lse[:3]) & (lse[:3] < 0))
    for i in range(20):
        vis = min(max(q_off[1] + i + 1, 0), 18)
        t = 3 + i
        if vis == 0:
            assert torch.all(out[t] == 0) and torch.all(torch.isinf(lse[t]))
            continue
        s = (torch.einsum("hn,khn->hk", qn[t].double(), kn[:vis].double())
             + torch.einsum("hp,kp->hk", qp[t].double(), kp[:vis].double())) * 0.5
        ref = torch.einsum("hk,khv->hv", s.softmax(-1), v[:vis].double())
        assert rel_err(out[t], ref) < 1e-5
        assert torch.allclose(lse[t], torch.logsumexp(s, -1), atol=1e-4)
