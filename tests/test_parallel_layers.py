"""Parallel layers on 2 gloo ranks against plain F.linear / F.embedding over the full weight.

Every rank builds the same full weights (same seed), hands them to its layer's weight loaders (which keep only
its part), and checks its output: gathered or reduced ones equal the full computation, per-rank ones equal the
slice of it that rank owns. One test loads from lazy safetensors slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dist_harness import run_ranks

from moeserve.distributed.parallel_state import (ParallelLayout, get_dp_group, get_ep_group, get_tp_group,
                                                initialize_model_parallel)
from moeserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from moeserve.layers.linear import (ColumnParallelLinear, Linear, MergedColumnParallelLinear, QKVParallelLinear,
                                    ReplicatedLinear, RowParallelLinear)

TP = 2


def _load(layer, **full):
    """Hand each full tensor to its parameter's weight loader; returns the elements written per parameter."""
    return {name: getattr(layer, name).weight_loader(getattr(layer, name), t) for name, t in full.items()}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _setup(rank):
    initialize_model_parallel(ParallelLayout(tp=TP))
    torch.manual_seed(0)  # the same full weights and inputs on every rank
    return get_tp_group()


def _column_and_row(rank):
    tp = _setup(rank)
    x = torch.randn(5, 16)
    w, b = torch.randn(12, 16), torch.randn(12)
    col = ColumnParallelLinear(16, 12, bias=True)
    assert _load(col, weight=w, bias=b) == {"weight": 6 * 16, "bias": 6}  # only this rank's rows
    _close(col(x), F.linear(x, w, b)[:, rank * 6:(rank + 1) * 6])
    gathered = ColumnParallelLinear(16, 12, bias=True, gather_output=True)
    _load(gathered, weight=w, bias=b)
    _close(gathered(x), F.linear(x, w, b))

    w2, b2 = torch.randn(10, 12), torch.randn(10)
    h = torch.randn(5, 12)
    row = RowParallelLinear(12, 10, bias=True)
    _load(row, weight=w2, bias=b2)
    assert row.weight.shape == (10, 6)
    _close(row(h[:, rank * 6:(rank + 1) * 6]), F.linear(h, w2, b2))
    partial = RowParallelLinear(12, 10, bias=True, reduce_results=False)
    _load(partial, weight=w2, bias=b2)
    _close(tp.all_reduce(partial(h[:, rank * 6:(rank + 1) * 6])), F.linear(h, w2, b2))  # bias counted once

    # column -> row: one all-reduce for the pair, as in an MLP
    _close(row(col(x)), F.linear(F.linear(x, w, b), w2, b2))
    return True


def _merged(rank):
    _setup(rank)
    x = torch.randn(5, 16)
    gate, up = torch.randn(8, 16), torch.randn(12, 16)
    gb, ub = torch.randn(8), torch.randn(12)
    ref = torch.cat([F.linear(x, gate, gb)[:, rank * 4:(rank + 1) * 4], F.linear(x, up, ub)[:, rank * 6:(rank + 1) * 6]],
                    dim=-1)
    layer = MergedColumnParallelLinear(16, [8, 12], bias=True)
    for shard_id, (w, b) in enumerate([(gate, gb), (up, ub)]):
        layer.weight.weight_loader(layer.weight, w, shard_id)
        layer.bias.weight_loader(layer.bias, b, shard_id)
    _close(layer(x), ref)
    merged = MergedColumnParallelLinear(16, [8, 12], bias=True)  # a checkpoint that stores [gate | up] whole
    _load(merged, weight=torch.cat([gate, up]), bias=torch.cat([gb, ub]))
    _close(merged(x), ref)
    return True


def _qkv(rank, num_kv_heads):
    _setup(rank)
    heads, head_dim, hidden = 4, 3, 16
    x = torch.randn(5, hidden)
    wq, wk, wv = torch.randn(heads * head_dim, hidden), *torch.randn(2, num_kv_heads * head_dim, hidden)
    bq, bk, bv = torch.randn(heads * head_dim), *torch.randn(2, num_kv_heads * head_dim)
    layer = QKVParallelLinear(hidden, head_dim, heads, num_kv_heads, bias=True)
    for shard_id, (w, b) in zip("qkv", [(wq, bq), (wk, bk), (wv, bv)]):
        layer.weight.weight_loader(layer.weight, w, shard_id)
        layer.bias.weight_loader(layer.bias, b, shard_id)
    H, KV = layer.num_heads, layer.num_kv_heads
    assert (H, KV) == (heads // TP, max(num_kv_heads // TP, 1))
    q, k, v = layer(x).split([H * head_dim, KV * head_dim, KV * head_dim], dim=-1)
    q_full = F.linear(x, wq, bq).view(5, heads, head_dim)
    k_full = F.linear(x, wk, bk).view(5, num_kv_heads, head_dim)
    v_full = F.linear(x, wv, bv).view(5, num_kv_heads, head_dim)
    q, k, v = q.view(5, H, head_dim), k.view(5, KV, head_dim), v.view(5, KV, head_dim)
    for j in range(H):  # each local query head is its global head, and reads the KV head the full model gives it
        h = rank * H + j
        _close(q[:, j], q_full[:, h])
        _close(k[:, j // (H // KV)], k_full[:, h // (heads // num_kv_heads)])
        _close(v[:, j // (H // KV)], v_full[:, h // (heads // num_kv_heads)])
    return True


def _vocab(rank):
    _setup(rank)
    V, D = 11, 8  # 11 rows over 2 ranks: padded to 12, one padding row on rank 1
    table = torch.randn(V, D)
    ids = torch.tensor([0, 5, 6, 10, 3, 6])
    emb = VocabParallelEmbedding(V, D)
    assert _load(emb, weight=table) == {"weight": 6 * D}
    assert emb.weight.shape == (6, D)
    _close(emb(ids), F.embedding(ids, table))
    h = torch.randn(4, D)
    head = ParallelLMHead(V, D)
    _load(head, weight=table * 2)
    logits = head.compute_logits(h)
    assert logits.shape == (4, V) and logits.dtype == torch.float32
    _close(logits, F.linear(h, table * 2))
    tied = ParallelLMHead(V, D, tied_to=emb)
    assert not list(tied.parameters())  # the embedding's table, not a second one
    _close(tied.compute_logits(h), F.linear(h, table))
    return True


def _lazy(rank, path):
    from safetensors import safe_open

    _setup(rank)
    x = torch.randn(3, 16)
    with safe_open(path, framework="pt") as f:
        full = {name: f.get_tensor(name) for name in f.keys()}
        qkv = QKVParallelLinear(16, 4, 4, 1, bias=False)
        for shard_id in "qkv":
            part = f.get_slice(f"{shard_id}.weight")
            assert not isinstance(part, torch.Tensor)
            qkv.weight.weight_loader(qkv.weight, part, shard_id)
        row = RowParallelLinear(16, 16, bias=True)
        _load(row, weight=f.get_slice("o.weight"), bias=f.get_slice("o.bias"))
        emb = VocabParallelEmbedding(9, 16)
        _load(emb, weight=f.get_slice("embed.weight"))
    q, k, v = qkv(x).split([8, 4, 4], dim=-1)
    _close(q, F.linear(x, full["q.weight"])[:, rank * 8:(rank + 1) * 8])
    _close(k, F.linear(x, full["k.weight"]))  # one KV head: replicated on both ranks
    _close(row(x[:, rank * 8:(rank + 1) * 8]), F.linear(x, full["o.weight"], full["o.bias"]))
    ids = torch.arange(9)
    _close(emb(ids), full["embed.weight"])
    return True


def test_column_and_row_parallel_match_full_linear():
    assert run_ranks(TP, _column_and_row) == [True, True]


def test_merged_column_parallel_shards_each_output():
    assert run_ranks(TP, _merged) == [True, True]


def test_qkv_heads_split_over_ranks():
    assert run_ranks(TP, _qkv, 2) == [True, True]


def test_qkv_with_fewer_kv_heads_than_ranks_replicates_them():
    assert run_ranks(TP, _qkv, 1) == [True, True]


def test_vocab_parallel_embedding_and_lm_head():
    assert run_ranks(TP, _vocab) == [True, True]


def test_weight_loaders_read_lazy_safetensors_slices(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {"q.weight": torch.randn(16, 16, generator=g), "k.weight": torch.randn(4, 16, generator=g),
               "v.weight": torch.randn(4, 16, generator=g), "o.weight": torch.randn(16, 16, generator=g),
               "o.bias": torch.randn(16, generator=g), "embed.weight": torch.randn(9, 16, generator=g)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    assert run_ranks(TP, _lazy, path) == [True, True]


def _groups_of(rank, layouts):
    import torch.distributed as dist

    from moeserve.distributed.parallel_state import destroy_model_parallel

    out = []
    for lay in layouts:
        initialize_model_parallel(lay)
        tp, dp, ep = get_tp_group(), get_dp_group(), get_ep_group()
        x = torch.tensor([float(rank + 1)])
        out.append({"ep_is_tp": ep is tp, "dp_is_ep": dp is ep, "ep_is_default": ep.group is dist.group.WORLD,
                    "tp_ranks": tp.ranks, "dp_ranks": dp.ranks,
                    "ep_sum": float(ep.all_reduce(x.clone())), "tp_sum": float(tp.all_reduce(x.clone()))})
        destroy_model_parallel()
    return out


def test_one_process_group_per_set_of_ranks():
    """Groups of the same ranks are one group (each NCCL communicator costs GPU memory the KV cache lacks), and a
    group of every rank is the default one; collectives over them still sum over the right ranks."""
    two = run_ranks(2, _groups_of, [ParallelLayout(tp=2, enable_expert_parallel=True),
                                     ParallelLayout(dp=2, enable_expert_parallel=True)])
    for r in two:
        tp2ep, dp2ep = r
        assert tp2ep["ep_is_tp"] and tp2ep["ep_is_default"]
        assert dp2ep["dp_is_ep"] and dp2ep["ep_is_default"] and dp2ep["tp_ranks"] == [dp2ep["tp_ranks"][0]]
        assert tp2ep["ep_sum"] == tp2ep["tp_sum"] == 3.0 and dp2ep["ep_sum"] == 3.0
    four = run_ranks(4, _groups_of, [ParallelLayout(tp=2, dp=2, enable_expert_parallel=True)])
    for rank, (r,) in enumerate(four):
        assert not r["ep_is_tp"] and not r["dp_is_ep"] and r["ep_is_default"]
        assert r["tp_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1] and r["dp_ranks"] == [rank % 2, rank % 2 + 2]
        assert r["ep_sum"] == 10.0 and r["tp_sum"] == (3.0 if rank < 2 else 7.0)


def test_single_rank_layers_are_plain_linear():
    """TP=1 (no process group): the same matmul as F.linear, bit for bit, and the old name still works."""
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
    assert Linear is ReplicatedLinear
    for layer in (ReplicatedLinear(16, 12), ColumnParallelLinear(16, 12), RowParallelLinear(16, 12),
                  MergedColumnParallelLinear(16, [4, 8])):
        _load(layer, weight=w, bias=b)
        assert torch.equal(layer(x), F.linear(x, w, b))
    emb = VocabParallelEmbedding(12, 16)
    _load(emb, weight=w)
    assert torch.equal(emb(torch.tensor([0, 11])), w[[0, 11]])


def test_nccl_graph_mixing_is_off_only_where_no_eager_collective_follows_a_replay():
    """DP attention + EP at TP = 1 (a DP rank's only NCCL calls are its forward passes): mixing off. At TP > 1 the
    sampled tokens are broadcast eagerly after every step, and pipeline stages hand over eagerly: NCCL's default."""
    from moeserve.distributed.launch import nccl_graph_mixing_off

    assert nccl_graph_mixing_off(ParallelLayout(dp=2, enable_expert_parallel=True))
    assert nccl_graph_mixing_off(ParallelLayout(dp=4, enable_expert_parallel=True))
    assert not nccl_graph_mixing_off(ParallelLayout(dp=2, tp=2, enable_expert_parallel=True))
    assert not nccl_graph_mixing_off(ParallelLayout(dp=2, pp=2, enable_expert_parallel=True))
    assert not nccl_graph_mixing_off(ParallelLayout(dp=2))  # DP without EP: replicas, no collective in a step
    assert not nccl_graph_mixing_off(ParallelLayout(tp=2, enable_expert_parallel=True))
    assert not nccl_graph_mixing_off(ParallelLayout(tp=2))
