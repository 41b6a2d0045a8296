"""Routed experts under TP, TP+EP and DP+EP on gloo ranks, each against experts_reference on the full weights in
one process; loading through Experts.load_weight from per-expert, fused and transposed fused tensors (and lazy
safetensors slices); non-local experts adding exact zeros in the reference and in the fused kernel (interpreter).
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks
from triton_kernels import load_kernel  # first: without a GPU it sets up the interpreter

from moeserve.distributed.parallel_state import ParallelLayout, initialize_model_parallel
from moeserve.layers.experts import Experts, expert_range, experts_reference

E, H, I, K = 6, 12, 8, 2  # 6 experts over 4 EP ranks: 2, 2, 1, 1; H != 2I: transposed forms are unambiguous


def full_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) / 4, torch.randn(E, H, I, generator=g) / 3


def tokens(n: int, seed: int, skewed: bool = False):
    """x [n, H] and a routing (weights, ids) [n, K]; skewed: every token's first choice is the last expert."""
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, H, generator=g)
    weights, ids = torch.rand(n, E, generator=g).softmax(-1).topk(K)
    ids = ids.to(torch.int32)
    if skewed:
        ids[:, 0], ids[:, 1], weights[:, 1] = E - 1, 0, 0.0  # one expert on one rank (plus a zero-weight pair)
    return x, weights, ids


def partial(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(1000 + seed))


def load(experts: Experts, form: str, w13, w2) -> None:
    """Every checkpoint tensor handed to load_weight, as a loader would: per expert or fused (maybe transposed)."""
    written = 0
    if form == "per_expert":
        for e in range(E):
            written += experts.load_weight("w13", w13[e, :I], e, "gate")
            written += experts.load_weight("w13", w13[e, I:], e, "up")
            written += experts.load_weight("w2", w2[e], e, "down")
    elif form == "fused":
        written += experts.load_weight("w13", w13.clone(), None, "gate_up")
        written += experts.load_weight("w2", w2.clone(), None, "down")
    else:  # "fused_t": [E, H, 2I] and [E, I, H], as some checkpoints store them
        written += experts.load_weight("w13", w13.transpose(1, 2).contiguous(), None, "gate_up")
        written += experts.load_weight("w2", w2.transpose(1, 2).contiguous(), None, "down")
    assert written == experts.w13.numel() + experts.w2.numel()  # every local element once, nothing else


@torch.no_grad()
def rank_fn(rank: int, lay: ParallelLayout, form: str, counts: list[int], skewed: bool):
    """One rank: build and load the experts, run this DP rank's tokens, return (output, what it should be)."""
    initialize_model_parallel(lay)
    dp_rank, _, tp_rank = lay.coords(rank)
    torch.manual_seed(rank)
    experts = Experts(E, H, I)
    experts.w13.data.normal_()  # garbage that loading must overwrite
    experts.w2.data.normal_()
    w13, w2 = full_weights()
    load(experts, form, w13, w2)
    x, weights, ids = tokens(counts[dp_rank], seed=dp_rank, skewed=skewed)
    extra = partial(rank, len(x))
    out = experts(x, weights, ids, extra_partial=extra)
    # the shared partials of this DP rank's TP ranks, summed: what the one reduction must have added
    extras = sum(partial(dp_rank * lay.tp + t, len(x)) for t in range(lay.tp))
    expected = experts_reference(x, w13, w2, weights, ids) + extras
    return out, expected, (experts.num_local, experts.local_intermediate)


def check(world: int, lay: ParallelLayout, form: str, counts: list[int], skewed: bool = False):
    results = run_ranks(world, rank_fn, lay, form, counts, skewed, timeout=60)
    for out, expected, _ in results:
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    return [r[2] for r in results]


def test_tp2_shards_the_intermediate_dim():
    held = check(2, ParallelLayout(tp=2), "per_expert", [5])
    assert held == [(E, I // 2)] * 2


def test_tp2_ep_places_whole_experts_fused_checkpoint_skewed():
    held = check(2, ParallelLayout(tp=2, enable_expert_parallel=True), "fused", [7], skewed=True)
    assert held == [(3, I), (3, I)]


def test_dp2_ep_ranks_with_different_and_zero_tokens():
    check(2, ParallelLayout(dp=2, enable_expert_parallel=True), "fused_t", [4, 0])


def test_tp2_dp2_ep_four_ranks_uneven_placement_skewed():
    held = check(4, ParallelLayout(tp=2, dp=2, enable_expert_parallel=True), "per_expert", [3, 5], skewed=True)
    assert held == [(2, I), (2, I), (1, I), (1, I)]


def test_expert_range_covers_every_expert_once():
    for n, ep in [(6, 4), (8, 2), (128, 8), (5, 5)]:
        ranges = [expert_range(n, ep, r) for r in range(ep)]
        assert [e for s, c in ranges for e in range(s, s + c)] == list(range(n))


def test_load_weight_reads_lazy_safetensors_slices(tmp_path):
    """Fused tensors as safetensors slices (what the lazy loader hands over), one rank: the weights come in whole;
    a non-local expert's tensor writes nothing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    w13, w2 = full_weights(1)
    save_file({"gu": w13.transpose(1, 2).contiguous(), "d": w2}, str(tmp_path / "m.safetensors"))
    experts = Experts(E, H, I).requires_grad_(False)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert experts.load_weight("w13", f.get_slice("gu"), None, "gate_up") == w13.numel()
        assert experts.load_weight("w2", f.get_slice("d"), None, "down") == w2.numel()
    assert torch.equal(experts.w13.data, w13) and torch.equal(experts.w2.data, w2)
    experts.first_local, experts.num_local = 2, 3  # as an EP rank holding experts 2..4 would
    assert experts.load_weight("w2", w2[5], 5, "down") == 0
    with pytest.raises(ValueError, match="does not fit"):
        experts.load_weight("w2", w2[0, :, :3], 2, "down")
    with pytest.raises(ValueError, match="does not belong"):
        experts.load_weight("w2", w2[0], 2, "gate")


# ---- non-local experts: exact zeros ----------------------------------------------------------------------------

EXPERT_MAP = torch.tensor([-1, -1, 0, 1, 2, -1], dtype=torch.int32)  # this rank holds experts 2, 3, 4
ROUTING = torch.tensor([[0, 5], [4, 1], [2, 3]], dtype=torch.int32)  # token 0: nothing local; 1: one; 2: both


def test_reference_adds_nothing_for_non_local_experts():
    w13, w2 = full_weights(2)
    x, weights, _ = tokens(3, seed=7)
    out = experts_reference(x, w13[2:5], w2[2:5], weights, ROUTING, EXPERT_MAP)
    assert torch.equal(out[0], torch.zeros(H))
    masked = torch.where((ROUTING >= 2) & (ROUTING < 5), ROUTING, -1)  # the same pairs on the full weights
    torch.testing.assert_close(out, experts_reference(x, w13, w2, weights, masked))
    assert out[1].abs().sum() > 0 and out[2].abs().sum() > 0


class _Fixed:
    def __init__(self, cfg):
        self.cfg = cfg

    def choose(self, kernel, key, candidates, run, default):
        return self.cfg


class _PoisonedTorch:
    """torch, except that every floating torch.empty comes back full of NaN: a scratch row the kernels leave
    unwritten and still read would poison the output."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


def _kernel_paths():
    """One config per kernel path: sorted dot, no-sort dot, folded down+sum, GEMV gate/up (folded, late-sum, not)."""
    fused = load_kernel("fused_moe", "_gate_up_kernel")
    seen, picked = set(), []
    for tokens_ in (1, 16):
        for c in fused.moe_candidates(tokens_, K, E, 4):
            path = (c["SORT"], c.get("FOLD", 0), c.get("GEMV1", 0), c.get("LATE", 0))
            if path not in seen:
                seen.add(path)
                picked.append(c)
    return picked


@pytest.mark.parametrize("cfg", _kernel_paths(), ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()
                                                                         if k in ("SORT", "FOLD", "GEMV1", "LATE")))
def test_fused_kernel_adds_exact_zeros_for_non_local_experts(cfg, monkeypatch):
    moe_align = load_kernel("moe_align", "_align_sorted_kernel")
    fused = load_kernel("fused_moe", "_gate_up_kernel")
    if not torch.cuda.is_available():
        monkeypatch.setattr(fused, "align_pairs", moe_align.align_pairs)  # the interpreted one
        monkeypatch.setattr(fused, "torch", _PoisonedTorch())
    monkeypatch.setattr(fused, "get_tuner", lambda: _Fixed(cfg))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w13, w2 = full_weights(2)
    x, weights, _ = tokens(3, seed=7)
    local13, local2 = w13[2:5].contiguous(), w2[2:5].contiguous()
    expected = experts_reference(x, local13, local2, weights, ROUTING, EXPERT_MAP)
    args = [t.to(device) for t in (x, local13, local2, weights, ROUTING)]
    out = torch.full_like(args[0], float("nan"))
    fused.fused_moe(*args, out=out, expert_map=EXPERT_MAP.to(device))
    out = out.cpu()
    assert torch.equal(out[0], torch.zeros(H))  # exact: no expert of token 0 is here
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
