"""The CPU fast path's two choices (issue 14): the attention plan built once per step and shared by all layers,
and the per-M choice between torch's int4 kernel and the bf16 dense copy of an int4 linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeserve.layers.linear import Linear
from moeserve.layers.quant.gguf_blocks import decode_int4_terms
from moeserve.layers.quant.int4_cpu import DENSE_MIN_ROWS, Int4CPUMethod
from test_cpu_quant import _attention_case, random_blocks, reference_weight


def _ref(q, cache, meta):
    from moeserve.kernels.reference import ref_paged_attention

    return ref_paged_attention(q, cache, query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens,
                               block_tables=meta.block_tables, scale=0.3)


@pytest.mark.parametrize("query_lens,seq_lens", [
    ([1] * 4, [9, 9, 9, 9]),  # decode of equal contexts: every key visible, no mask at all
    ([1] * 4, [9, 2, 9, 5]),  # ragged decode: past-the-context keys point at position 0 and are masked
    ([4, 4], [4, 7]),  # prefills
])
def test_one_plan_serves_every_layer(query_lens, seq_lens):
    """The plan is made by the first layer and kept on the metadata; a second layer (another cache, other
    queries) reuses it and still matches the per-sequence reference. Never-written slots hold NaN."""
    from moeserve.layers.attention import paged_attention_reference

    q1, cache1, meta = _attention_case(query_lens, seq_lens, seed=0)
    q2, cache2, _ = _attention_case(query_lens, seq_lens, seed=0)
    g = torch.Generator().manual_seed(5)
    written = ~cache1.isnan()
    cache2[written] = torch.randn(int(written.sum()), generator=g)  # same layout, other values
    q2 = torch.randn(q1.shape, generator=g)
    got1 = paged_attention_reference(q1, cache1, meta, scale=0.3)
    plan = meta.cpu_plan
    assert plan is not None
    if len(set(seq_lens)) == 1 and max(query_lens) == 1:
        assert plan.groups[0][1].mask is None
    got2 = paged_attention_reference(q2, cache2, meta, scale=0.3)
    assert meta.cpu_plan is plan
    assert not got1.isnan().any() and not got2.isnan().any()
    torch.testing.assert_close(got1, _ref(q1, cache1, meta), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2, _ref(q2, cache2, meta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_int4_kernel_below_the_threshold_bf16_dense_from_it(qtype, monkeypatch):
    """Both paths match the dequantized fp32 reference; each is taken on its side of DENSE_MIN_ROWS; with the
    bf16 copy switched off every M runs the int4 kernel."""
    n, k = 40, 256
    data = random_blocks(qtype, n, k, seed=3)
    ref_w = reference_weight(qtype, data, n, k)
    calls = []
    aten = torch.ops.aten
    real_mm = aten._weight_int4pack_mm_for_cpu

    class Spy:
        def __getattr__(self, name):
            if name == "_weight_int4pack_mm_for_cpu":
                return lambda *a: (calls.append(a[0].shape[0]), real_mm(*a))[1]
            return getattr(aten, name)

    monkeypatch.setattr(torch.ops, "aten", Spy())
    for bf16 in (True, False):
        layer = Linear(k, n, bias=False)
        Int4CPUMethod.attach(layer, Int4CPUMethod.pack(decode_int4_terms(qtype, data, n, k), bf16_weights=bf16))
        assert (layer.weight_bf16 is not None) == bf16
        for rows in (1, DENSE_MIN_ROWS - 1, DENSE_MIN_ROWS, 16):
            calls.clear()
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            with torch.no_grad():
                got = layer(x)
            want = F.linear(x, ref_w)
            assert ((rows >= DENSE_MIN_ROWS and bf16) == (not calls)), (rows, bf16, calls)
            err = (got - want).abs().max() / want.abs().max()
            assert err < 1e-2, (rows, bf16, err)


def test_bf16_weights_switch(monkeypatch):
    data = random_blocks("Q4_0", 16, 64)
    terms = decode_int4_terms("Q4_0", data, 16, 64)
    monkeypatch.setenv("MOESERVE_CPU_BF16_WEIGHTS", "0")
    assert Int4CPUMethod.pack(terms).dense is None
    monkeypatch.delenv("MOESERVE_CPU_BF16_WEIGHTS")
    dense = Int4CPUMethod.pack(terms).dense
    assert dense.dtype == torch.bfloat16 and dense.shape == (16, 64)
    torch.testing.assert_close(dense.float(), reference_weight("Q4_0", data, 16, 64), rtol=1e-2, atol=1e-3)


def test_default_models_tied_lm_head_runs_packed():
    """The default model's LM head (tied to its Q8_0 embedding) goes through the int4 kernel / bf16 copy, not a
    fp32 matmul over the dequantized table, and its logits stay within bf16 rounding of that matmul (the same
    argmax on most rows); the embedding looks its rows up in the same bf16 copy."""
    from moeserve import LLM
    from moeserve.loader.gguf import default_model_path, read_gguf

    llm = LLM(model=default_model_path(), max_model_len=64, kv_cache_memory_bytes=1 << 22)
    model = llm.llm_engine.model
    head, embed = model.lm_head, model.model.embed_tokens
    table = read_gguf(default_model_path()).tensors["model.embed_tokens.weight"].dense()  # fp32, dequantized
    assert isinstance(head.quant_method, Int4CPUMethod)
    # no fp32 table: the embedding reads the head's bf16 copy, within bf16 rounding of the dequantized rows
    assert embed.weight is None and embed.lookup_table is head.weight_bf16
    ids = torch.tensor([0, 5, 1234, table.shape[0] - 1])
    with torch.no_grad():
        rows = embed(ids)
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, table[ids], rtol=1e-2, atol=1e-3)
    hidden = torch.randn(8, table.shape[1], generator=torch.Generator().manual_seed(0))
    want = F.linear(hidden, table)
    for rows in (1, DENSE_MIN_ROWS + 3):  # the int4 kernel, then the bf16 copy
        with torch.no_grad():
            got = head.compute_logits(hidden[:rows])
        assert got.dtype == torch.float32 and got.shape == (rows, table.shape[0])
        err = float((got - want[:rows]).norm() / want[:rows].norm())
        assert err < 2e-2, (rows, err)
        assert (got.argmax(-1) == want[:rows].argmax(-1)).float().mean() >= 0.75


def test_packing_row_blocks_gives_the_whole_packs_bytes():
    """pack_term packs 64-row blocks at a time (small int32 temporaries): the same bytes as one call over all
    rows, the padded tail included (N = 200 is not a multiple of 16 or 64); other block sizes are refused."""
    from moeserve.layers.quant.int4_cpu import pack_term

    term = decode_int4_terms("Q4_0", random_blocks("Q4_0", 200, 64, seed=5), 200, 64)[0]
    whole, sz_whole = pack_term(term, rows=1 << 20)
    for rows in (64, 128):
        part, sz = pack_term(term, rows=rows)
        assert torch.equal(part, whole) and torch.equal(sz, sz_whole)
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_term(term, rows=16)


def _rotary_by_the_formula(rot, tables, positions, x):
    """x1 c - x2 s, x2 c + x1 s over the first rotary_dim dims (halves, or pairs when interleaved), in fp32."""
    cos, sin = tables
    c, s = cos[positions][:, None], sin[positions][:, None]
    r = x[..., : rot.rotary_dim].float()
    x1, x2 = (r[..., 0::2], r[..., 1::2]) if rot.interleaved else r.chunk(2, dim=-1)
    a, b = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack((a, b), dim=-1).flatten(-2) if rot.interleaved else torch.cat((a, b), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot.rotary_dim:]), dim=-1)


@pytest.mark.parametrize("interleaved,partial", [(False, 1.0), (False, 0.5), (True, 1.0)])
def test_rotary_rows_gathered_once_a_step(interleaved, partial):
    """The cos/sin rows of a step's positions are gathered by the first layer and reused while the same positions
    tensor comes back unchanged; a new tensor, or the same one refilled in place, gets its own rows."""
    from moeserve.layers.rotary import RotaryEmbedding

    rot = RotaryEmbedding(int(32 * partial), 256, 10000.0, interleaved=interleaved)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, 32, generator=g), torch.randn(3, 2, 32, generator=g)
    positions = torch.tensor([0, 7, 200])
    tables, gathers = rot._cos_sin(q.device), []
    rot._cos_sin = lambda device: (gathers.append(1), tables)[1]  # what a step's first layer reads rows from
    for step in range(3):
        for _layer in range(2):
            got_q, got_k = rot(positions, q, k)
            assert torch.equal(got_q, _rotary_by_the_formula(rot, tables, positions, q))  # bit for bit
            assert torch.equal(got_k, _rotary_by_the_formula(rot, tables, positions, k))
        assert len(gathers) == step + 1
        positions.add_(1)  # the next step refills the same buffer in place
    rot(positions.clone(), q, k)
    assert len(gathers) == 4


def test_kv_write_planned_once_a_step_and_padding_not_written():
    """The CPU attention front writes K/V at the step's slots with one plan for all layers; a slot < 0 (padding)
    writes nothing; the plan's rows are None when every token writes."""
    import numpy as np

    from moeserve.layers.attention import AttentionMetadata, ForwardContext, PagedAttention

    g = torch.Generator().manual_seed(2)
    blocks, page, kvh, d = 4, 4, 2, 8
    for slots, padded in (([5, 6, 7], False), ([5, -1, 9], True)):
        caches = [torch.full((2, blocks, page, kvh, d), float("nan")) for _ in range(2)]
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor([0, 1, 2, 3]),
                                 seq_lens=torch.ones(3, dtype=torch.int32),
                                 block_tables=torch.tensor([[1], [2], [2]], dtype=torch.int32),
                                 max_query_len=1, max_seq_len=1, query_start_loc_cpu=np.array([0, 1, 2, 3]),
                                 seq_lens_cpu=np.ones(3, dtype=np.int32))
        ctx = ForwardContext(meta, caches)
        for layer in range(2):
            q = torch.randn(3, 4, d, generator=g)
            k, v = torch.randn(3, kvh, d, generator=g), torch.randn(3, kvh, d, generator=g)
            PagedAttention(4, kvh, d, 0.5, layer)(q, k, v, ctx)
            plan = meta.cpu_plan
            assert (plan.write[0] is not None) == padded
            flat = caches[layer].view(2, -1, kvh, d)
            for t, slot in enumerate(slots):
                if slot >= 0:
                    assert torch.equal(flat[0, slot], k[t]) and torch.equal(flat[1, slot], v[t])
            assert int((~flat.isnan()).sum()) == 2 * sum(s >= 0 for s in slots) * kvh * d
        assert meta.cpu_plan is plan
