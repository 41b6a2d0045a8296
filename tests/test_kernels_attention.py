"""Paged KV write and paged attention kernels against the plain-torch reference, on fresh random inputs.

On a CUDA machine the compiled kernels run on larger shapes; without CUDA the same tests run the kernels in the
Triton interpreter on tiny shapes (TRITON_INTERPRET=1, set before the kernels are imported).
"""

from __future__ import annotations


import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

from moeserve.kernels import reference, runtime  # noqa: E402


attention = load_kernel("attention", "_attn_kernel")


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    """Correctness here; timing every new shape would cost compile time. Every candidate has its own test."""
    monkeypatch.setenv("MOESERVE_AUTOTUNE", "0")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_batch(ctx_lens, q_lens, heads, kv_heads, head_dim, page, dtype, seed, spare_blocks=3):
    """A cache with random pages (shuffled block ids), block tables, and q for the new tokens."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-c // page) for c in ctx_lens]
    num_blocks = sum(pages) + spare_blocks
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(ctx_lens), max(pages) + 2), num_blocks - 1, dtype=torch.int32)  # junk past the end
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[used:used + n].int()
        used += n
    qsl = torch.zeros(len(ctx_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), heads, head_dim, generator=g).to(dtype)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, cache, qsl, seq_lens, tables)]


def run_both(ctx_lens, q_lens, heads, kv_heads, head_dim, page, dtype, seed, max_seq_len=None):
    q, cache, qsl, seq_lens, tables = make_batch(ctx_lens, q_lens, heads, kv_heads, head_dim, page, dtype, seed)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    attention.paged_attention(
        q, cache, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables, scale=scale,
        max_query_len=max(q_lens), max_seq_len=max_seq_len or max(ctx_lens), out=out,
    )
    ref = reference.ref_paged_attention(q.double(), cache.double(), query_start_loc=qsl, seq_lens=seq_lens,
                                        block_tables=tables, scale=scale)
    return out, ref


# (ctx_lens, q_lens, heads, kv_heads, head_dim, page): decode, prefill, cached prefix, mixed; odd lengths.
CASES_CPU = [
    ([5, 17, 40], [1, 1, 1], 8, 2, 64, 16),          # decode, GQA 4
    ([1, 33], [1, 1], 4, 4, 128, 16),                # decode, MHA, context of one token
    ([9, 21], [9, 21], 8, 1, 64, 16),                # prefill from scratch, GQA 8
    ([37, 50], [20, 3], 4, 2, 80, 32),               # prefill over a cached prefix, head_dim 80, page 32
    ([5, 37, 40, 2], [5, 20, 1, 1], 6, 2, 64, 16),   # mixed: prefill + chunked prefill + decodes, group 3
]
CASES_GPU = CASES_CPU + [
    ([384] * 32, [1] * 32, 32, 4, 128, 16),
    ([4096, 1000, 17], [1, 1, 1], 32, 4, 128, 16),
    ([1024, 777], [1024, 300], 32, 4, 128, 16),
    ([3000, 129, 64, 1], [512, 129, 1, 1], 16, 16, 128, 32),
    ([2000, 513], [257, 513], 32, 8, 96, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES_GPU if CUDA else CASES_CPU)
def test_paged_attention_matches_reference(case, dtype):
    ctx, ql, h, kvh, d, page = case
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs each run; the seed is in the failure message
    out, ref = run_both(ctx, ql, h, kvh, d, page, dtype, seed=seed)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


def test_decode_split_context_and_loose_max_seq_len(monkeypatch):
    """Many context segments per sequence (split-K) and max_seq_len far above the real lengths (decode graphs)."""
    monkeypatch.setattr(runtime, "num_sms", lambda device: 64)
    out, ref = run_both([70, 3, 130], [1, 1, 1], 4, 2, 64, 16, torch.float32, seed=7, max_seq_len=4096)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_padding_sequence_without_queries():
    """A sequence with no new tokens (padding in a batch) takes no output rows and does not disturb the rest."""
    q, cache, qsl, seq_lens, tables = make_batch([12, 30, 7], [4, 0, 7], 4, 2, 64, 16, torch.float32, seed=3)
    out = attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                    scale=0.125, max_query_len=7, max_seq_len=30)
    ref = reference.ref_paged_attention(q.double(), cache.double(), query_start_loc=qsl, seq_lens=seq_lens,
                                        block_tables=tables, scale=0.125)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_matches_reference(dtype):
    g = torch.Generator().manual_seed(11)
    T, kvh, d, page, blocks = 13, 2, 80, 16, 5
    qkv = torch.randn(T, 4 + 2 * kvh, d, generator=g).to(dtype)
    k, v = qkv[:, 4:4 + kvh], qkv[:, 4 + kvh:]  # strided views, as split from a fused qkv projection
    slots = torch.randperm(blocks * page, generator=g)[:T]
    slots[[2, 7]] = -1  # padding tokens: skipped
    cache = torch.randn(2, blocks, page, kvh, d, generator=g).to(dtype)
    expect = cache.clone()
    reference.ref_write_kv_cache(k, v, expect, slots)
    cache, k, v, slots = cache.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE)
    attention.write_kv_cache(k, v, cache, slots)
    assert torch.equal(cache.cpu(), expect)


def test_bad_inputs_raise_clear_errors():
    q, cache, qsl, seq_lens, tables = make_batch([5], [5], 4, 2, 64, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="does not fit"):
        attention.paged_attention(q[:, :3], cache, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                  scale=1.0, max_query_len=5, max_seq_len=5)
    with pytest.raises(ValueError, match="kv_cache must be"):
        attention.write_kv_cache(q[:, :2], q[:, :2], cache[0], torch.zeros(5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping"):
        attention.write_kv_cache(q[:, :2], q[:, :2], cache, torch.zeros(4, dtype=torch.int64, device=DEVICE))


class _Pick:
    """Stands in for the autotuner: always the candidate at one index (every candidate must be correct)."""

    def __init__(self, index: int):
        self.index = index

    def choose(self, kernel, key, candidates, run, default):
        return candidates[self.index % len(candidates)]


@pytest.mark.parametrize("index", range(5))
def test_every_tuning_candidate_is_correct(index, monkeypatch):
    monkeypatch.setattr(attention, "get_tuner", lambda: _Pick(index))
    for ctx, ql in (([19, 40], [1, 1]), ([37, 50], [20, 3])):
        out, ref = run_both(ctx, ql, 8, 2, 64, 16, torch.float32, seed=index)
        assert rel_err(out, ref) < TOL[torch.float32], (index, ctx, ql)


@pytest.mark.parametrize("segs,d,d_p", [(64, 500, 512), (4, 40, 64)])
def test_merge_segments_reads_only_the_segments_that_ran(segs, d, d_p):
    """The split-K merge over a wide row (MLA's 512 latent columns: several column slices per row) with empty
    segments (m = -inf) whose partials hold garbage (NaN): they must not reach the output."""
    rows, heads = 2, 3
    g = torch.Generator().manual_seed(segs)
    acc = torch.randn(rows, heads, segs, d_p, generator=g)
    m = torch.randn(rows, heads, segs, generator=g) * 4
    l = torch.rand(rows, heads, segs, generator=g) + 0.5
    empty = torch.rand(rows, heads, segs, generator=g) < 0.5
    empty[..., 0] = False
    m[empty] = float("-inf")
    l[empty] = 0.0
    acc[empty] = float("nan")
    w = torch.where(empty, 0.0, torch.exp2(m - m.amax(-1, keepdim=True)))
    ref = (acc.nan_to_num() * w[..., None]).sum(2) / (w * l).sum(-1, keepdim=True)
    out = torch.full((rows, heads, d), 7.0, device=DEVICE)
    attention.merge_segments(out, acc.to(DEVICE).reshape(-1), torch.stack([m, l], -1).to(DEVICE).reshape(-1),
                             rows, heads, d, d_p, segs)
    assert rel_err(out.cpu(), ref[..., :d]) < 1e-6


def shared_batch(groups, alone, heads, kv_heads, head_dim, page, dtype, seed):
    """Decode rows whose block tables begin with their group's shared pages (as prefix caching hands them out),
    then pages of their own. groups: [(shared pages, [context length of each member])]; alone: lengths of rows in
    no group. Rows of different groups interleave, as requests of several prompts do in a batch."""
    g = torch.Generator().manual_seed(seed)
    specs = [(k, n) for k, lens in groups for n in lens] + [(0, n) for n in alone]
    order = torch.randperm(len(specs), generator=g).tolist()
    specs = [specs[i] for i in order]
    num_blocks = sum(k for k, _ in groups) + sum(-(-n // page) for _, n in specs) + 2
    perm = torch.randperm(num_blocks, generator=g).int()
    shared_pages, used = {}, 0
    for k, _ in groups:
        shared_pages[k] = perm[used:used + k]
        used += k
    width = max(-(-n // page) for _, n in specs) + 1
    tables = torch.full((len(specs), width), num_blocks - 1, dtype=torch.int32)
    for b, (k, n) in enumerate(specs):
        own = -(-n // page) - k
        tables[b, :k] = shared_pages[k] if k else tables[b, :0]
        tables[b, k:k + own] = perm[used:used + own]
        used += own
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(specs), heads, head_dim, generator=g).to(dtype)
    seq_lens = torch.tensor([n for _, n in specs], dtype=torch.int32)
    qsl = torch.arange(len(specs) + 1, dtype=torch.int32)
    return q, cache, qsl, seq_lens, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 2)])
def test_shared_prefix_decode_matches_reference(dtype, heads, kv_heads, monkeypatch):
    """Decode rows grouped by a shared prefix (engine/shared_prefix.plan over their block tables): the prefix
    kernel reads each group's pages once, the decode kernel each row's own keys, the merge joins them. Equal to the
    reference and to the plain kernel; rows in no group and empty groups past the real ones included; with one
    context segment per row and with several (split-K beside the prefix splits)."""
    from moeserve.engine import shared_prefix

    page, d = 16, 64
    # a group of 3 sharing 2 pages, a group of 2 sharing 1 page (one member's newest token right after it), and
    # two rows in no group; the plan's groups past these two are empty
    q, cache, qsl, seq_lens, tables = shared_batch([(2, [40, 47, 33]), (1, [17, 30])], [9, 21], heads, kv_heads, d,
                                                   page, dtype, seed=5)
    plan = shared_prefix.plan(tables.numpy(), seq_lens.numpy() - 1, page, max_groups=4, min_saved=0.0, min_rows=1)
    assert plan is not None and plan.num_groups == 2
    assert sorted(plan.plen.tolist()) == [0, 0, 16, 32]
    shared = shared_prefix.SharedPrefixes(*(torch.from_numpy(a).to(DEVICE) for a in
                                        (plan.rows, plan.start, plan.plen, plan.row_prefix)))
    q, cache, qsl, seq_lens, tables = (t.to(DEVICE) for t in (q, cache, qsl, seq_lens, tables))
    ref = reference.ref_paged_attention(q.double(), cache.double(), query_start_loc=qsl, seq_lens=seq_lens,
                                        block_tables=tables, scale=d ** -0.5)
    empty = torch.empty

    def poisoned(*args, **kwargs):  # partials nothing wrote hold NaN: the merge must never read them
        return empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)
    big = attention.prefix_launch(256)  # the launch of the largest batches (128-row tiles), on these few rows too
    for sms, launch in ((10_000, {}), (4, {}), (4, big)):  # several context segments per row, then one
        monkeypatch.setattr(attention, "PREFIX_CONFIG", dict(launch))
        monkeypatch.setattr(runtime, "num_sms", lambda device, n=sms: n)
        outs = []
        for sp in (shared, None):
            out = torch.full_like(q, float("nan"))
            attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                      scale=d ** -0.5, max_query_len=1, max_seq_len=64, out=out, shared=sp)
            outs.append(out)
        assert rel_err(outs[0], ref) < TOL[dtype], sms
        assert rel_err(outs[0], outs[1]) < TOL[dtype], sms


def test_shared_prefix_decode_reads_an_fp8_cache(monkeypatch):
    """The prefix kernel dequantizes an fp8 cache as the decode kernel does (k_scale into the scores, v_scale on the
    output) for both the folded path (one segment per row) and the merged one."""
    from moeserve.engine import shared_prefix

    page, d, k_scale, v_scale = 16, 32, 0.25, 0.125
    q, full, qsl, seq_lens, tables = shared_batch([(2, [40, 47, 33]), (1, [17, 30])], [9, 21], 4, 2, d, page,
                                                  torch.float32, seed=9)
    fp8 = torch.empty(full.shape, dtype=torch.float8_e4m3fn)
    slots = torch.arange(full.shape[1] * full.shape[2])
    reference.ref_write_kv_cache(full[0].reshape(-1, 2, d), full[1].reshape(-1, 2, d), fp8, slots, k_scale, v_scale)
    plan = shared_prefix.plan(tables.numpy(), seq_lens.numpy() - 1, page, max_groups=4, min_saved=0.0, min_rows=1)
    shared = shared_prefix.SharedPrefixes(*(torch.from_numpy(a).to(DEVICE) for a in
                                            (plan.rows, plan.start, plan.plen, plan.row_prefix)))
    ref = reference.ref_paged_attention(q.double(), fp8, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                        scale=d ** -0.5, k_scale=k_scale, v_scale=v_scale)
    q, fp8, qsl, seq_lens, tables = (t.to(DEVICE) for t in (q, fp8, qsl, seq_lens, tables))
    for sms in (10_000, 4):
        monkeypatch.setattr(runtime, "num_sms", lambda device, n=sms: n)
        out = attention.paged_attention(q, fp8, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                        scale=d ** -0.5, max_query_len=1, max_seq_len=64, k_scale=k_scale,
                                        v_scale=v_scale, shared=shared)
        assert rel_err(out.cpu(), ref) < TOL[torch.float32], sms
