"""Fused RMSNorm(+residual) and rotary(+q/k norm) kernels against the layers' reference paths, fresh inputs.

Runs natively on CUDA, else in the Triton interpreter on tiny shapes.
"""

from __future__ import annotations


import pytest
import torch

from triton_kernels import CUDA  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

from moeserve.kernels.norm import rms_norm  # noqa: E402
from moeserve.kernels.rotary import apply_rope  # noqa: E402
from moeserve.layers.norm import RMSNorm  # noqa: E402
from moeserve.layers.rotary import RotaryEmbedding  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 100])
def test_rms_norm_with_and_without_residual(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g).to(DEV, dtype)
    res = torch.randn(7, n, generator=g).to(DEV, dtype)
    ref = RMSNorm(n).to(DEV)
    ref.weight.data = torch.randn(n, generator=g).to(DEV)
    ref = ref.to(dtype)
    want_out, want_res = ref._norm(x + res), x + res
    res_k = res.clone()
    got = rms_norm(x, ref.weight, ref.eps, res_k)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res_k, want_res, **tol)
    torch.testing.assert_close(got, want_out, **tol)
    torch.testing.assert_close(rms_norm(x, ref.weight, ref.eps), ref._norm(x), **tol)


def _positions(T: int, g: torch.Generator) -> torch.Tensor:
    """T positions below 256: the five of the one-token-a-program form, or many (several tokens a program)."""
    fixed = torch.tensor([0, 3, 17, 100, 255])
    return (fixed if T == 5 else torch.randint(0, 256, (T,), generator=g)).to(DEV)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("head_dim,partial", [(32, 1.0), (64, 0.5)])
@pytest.mark.parametrize("T", [5, 16 * 8 + 19])  # the last: tokens in blocks, a ragged last block
def test_rope_matches_reference(qk_norm, head_dim, partial, T):
    g = torch.Generator().manual_seed(head_dim)
    H, KVH = 4, 2
    rot = RotaryEmbedding(int(head_dim * partial), 256, 10000.0,
                          {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64})
    q = torch.randn(T, H, head_dim, generator=g).to(DEV)
    k = torch.randn(T, KVH, head_dim, generator=g).to(DEV)
    pos = _positions(T, g)
    qn = kn = None
    if qk_norm:
        qn, kn = RMSNorm(head_dim).to(DEV), RMSNorm(head_dim).to(DEV)
        qn.weight.data = torch.randn(head_dim, generator=g).to(DEV)
        kn.weight.data = torch.randn(head_dim, generator=g).to(DEV)
    want_q, want_k = rot(pos, qn(q) if qk_norm else q, kn(k) if qk_norm else k)
    cos, sin = rot._cos_sin(q.device)
    apply_rope(q, k, pos, cos, sin, qn.weight if qk_norm else None, kn.weight if qk_norm else None, 1e-6)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("head_dim,partial", [(32, 1.0), (48, 0.5)])
@pytest.mark.parametrize("T", [5, 16 * 8 + 19])
def test_rope_writes_k_and_v_into_the_paged_cache(qk_norm, head_dim, partial, T):
    """kv_write: the rotated K (rest dims included) and V land at each token's slot, slot -1 writes nothing, and
    q/k come out as without it."""
    from moeserve.kernels.reference import ref_write_kv_cache

    g = torch.Generator().manual_seed(head_dim + qk_norm)
    H, KVH, blocks, page = 4, 2, 6 if T == 5 else 40, 4
    rot = RotaryEmbedding(int(head_dim * partial), 256, 10000.0)
    q = torch.randn(T, H, head_dim, generator=g).to(DEV)
    k = torch.randn(T, KVH, head_dim, generator=g).to(DEV)
    v = torch.randn(T, KVH, head_dim, generator=g).to(DEV)
    pos = _positions(T, g)
    if T == 5:
        slots = torch.tensor([5, -1, 0, 23, 9], device=DEV)
    else:  # distinct slots, every third token skipped
        slots = torch.randperm(blocks * page, generator=g)[:T].masked_fill(torch.arange(T) % 3 == 1, -1).to(DEV)
    qn = kn = None
    if qk_norm:
        qn, kn = RMSNorm(head_dim).to(DEV), RMSNorm(head_dim).to(DEV)
        qn.weight.data = torch.randn(head_dim, generator=g).to(DEV)
        kn.weight.data = torch.randn(head_dim, generator=g).to(DEV)
    cos, sin = rot._cos_sin(q.device)
    q2, k2 = q.clone(), k.clone()
    apply_rope(q2, k2, pos, cos, sin, qn.weight if qk_norm else None, kn.weight if qk_norm else None, 1e-6)
    cache = torch.full((2, blocks, page, KVH, head_dim), float("nan"), device=DEV)
    apply_rope(q, k, pos, cos, sin, qn.weight if qk_norm else None, kn.weight if qk_norm else None, 1e-6,
               kv_write=(v, cache, slots))
    if T == 5:
        assert torch.equal(q, q2) and torch.equal(k, k2)
    else:  # compiled, the KV writes can change the tile's layout and so the norm's sum order: a last-bit difference
        torch.testing.assert_close(q, q2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
    want = torch.full_like(cache, float("nan"))
    ref_write_kv_cache(k, v, want, slots)  # the cache holds exactly the K the same launch rotated
    torch.testing.assert_close(cache, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("E,k,T", [(8, 2, 6), (60, 4, 6), (128, 8, 6), (64, 6, 257)])
def test_router_kernel_matches_router(renorm, E, k, T):
    from moeserve.kernels.router import route_softmax_topk
    from moeserve.layers.moe import Router, RouterConfig

    g = torch.Generator().manual_seed(E + k)
    H = 48
    r = Router(H, RouterConfig(num_experts=E, top_k=k, renormalize=renorm))
    r.weight.data = torch.randn(E, H, generator=g)
    x = torch.randn(T, H, generator=g)  # 257: a DeepSeek-V2-Lite decode step's rows, which the kernel now routes
    want_w, want_ids = r(x)  # the CPU torch path
    w, ids = route_softmax_topk(x.to(DEV), r.weight.to(DEV), k, renorm)
    assert torch.equal(ids.cpu().long(), want_ids.long())
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, cfg", [
    ("deepseek_v3", dict(num_experts=64, top_k=8, scoring="sigmoid", renormalize=True, n_group=8, topk_group=4,
                         group_score="top2_sum", correction_bias=True, routed_scaling_factor=2.5)),
    ("deepseek_v2_groups", dict(num_experts=32, top_k=6, scoring="softmax", n_group=4, topk_group=2,
                                group_score="max", routed_scaling_factor=16.0)),
    ("glm45_no_groups", dict(num_experts=16, top_k=4, scoring="sigmoid", renormalize=True, correction_bias=True,
                             group_score="top2_sum", routed_scaling_factor=1.5)),
])
def test_grouped_router_kernel_matches_router(name, cfg):
    """The grouped/sigmoid routing kernel against Router's torch path (the CPU reference): same experts (the
    groups chosen first), same weights; the bias only steers the choice."""
    from moeserve.kernels.router import grouped_topk_supported, route_grouped_topk
    from moeserve.layers.moe import Router, RouterConfig

    rc = RouterConfig(**cfg)
    assert grouped_topk_supported(rc.num_experts, rc.n_group)
    g = torch.Generator().manual_seed(rc.num_experts)
    H = 48
    r = Router(H, rc)
    r.weight.data = torch.randn(rc.num_experts, H, generator=g) * 0.3
    if rc.correction_bias:
        r.e_score_correction_bias.data = torch.randn(rc.num_experts, generator=g) * 0.2
    x = torch.randn(37, H, generator=g)
    want_w, want_ids = r(x)
    w, ids = route_grouped_topk(x.to(DEV), r.weight.to(DEV),
                                r.e_score_correction_bias.to(DEV) if rc.correction_bias else None, rc.top_k,
                                rc.n_group, rc.topk_group, rc.scoring == "sigmoid", rc.group_score == "top2_sum",
                                rc.renormalize, rc.routed_scaling_factor)
    assert torch.equal(ids.cpu().long().sort(-1).values, want_ids.long().sort(-1).values)
    order = lambda i, v: v.gather(1, i.long().argsort(-1))  # noqa: E731
    torch.testing.assert_close(order(ids.cpu(), w.cpu()), order(want_ids, want_w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("valid", [0, 4, 6])
def test_routing_kernels_count_like_the_telemetry_reference(valid):
    """Expert-load counts on the device: the router kernels (softmax, grouped) add their own choices, count_routed
    adds any ids in one launch; both equal layers/expert_load.count_routed's reference (padding rows past `valid`
    count nothing) and accumulate."""
    from moeserve.kernels.router import count_routed, route_grouped_topk, route_softmax_topk
    from moeserve.layers.expert_load import count_routed as reference

    g = torch.Generator().manual_seed(valid)
    E, k, H = 12, 3, 32
    x, w = torch.randn(6, H, generator=g), torch.randn(E, H, generator=g)
    n = torch.tensor(valid, device=DEV)
    counts = torch.full((E,), 5, dtype=torch.int64, device=DEV)
    _, ids = route_softmax_topk(x.to(DEV), w.to(DEV), k, True, counts=counts, valid_tokens=n)
    want = torch.full((E,), 5, dtype=torch.int64)
    reference(want, ids.cpu(), torch.tensor(valid))
    assert torch.equal(counts.cpu(), want)
    more = torch.randint(0, E, (9, k), generator=g, dtype=torch.int32)
    count_routed(counts, more.to(DEV), n)
    reference(want, more, torch.tensor(valid))
    assert torch.equal(counts.cpu(), want) and int(want.sum()) == 5 * E + 2 * k * valid
    _, ids = route_grouped_topk(x.to(DEV), w[:8].to(DEV), torch.zeros(8, device=DEV), k, 2, 1, True, True, True,
                                counts=counts[:8], valid_tokens=n)  # the grouped kernel counts the same way
    reference(want[:8], ids.cpu(), torch.tensor(valid))
    assert torch.equal(counts.cpu(), want) and int(want.sum()) == 5 * E + 3 * k * valid


def test_grouped_router_kernel_takes_power_of_two_groups():
    from moeserve.kernels.router import grouped_topk_supported

    assert grouped_topk_supported(256, 8) and grouped_topk_supported(64, 1)
    assert not grouped_topk_supported(160, 8) and not grouped_topk_supported(256, 3)
