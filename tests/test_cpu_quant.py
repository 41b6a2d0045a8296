"""The CPU fast path against its references: quantized matmuls (layers/quant) against gguf's own
dequantization then F.linear, and the batched CPU paged attention against the per-sequence ref_paged_attention.

Random raw GGUF blocks (every byte pattern the format allows, fp16 block scales of a sane size) are decoded
by gguf.quants.dequantize (the reference) and by our int4 terms; the matmul through torch's int4 kernel must
match dequantize-then-F.linear to bf16 accuracy.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeserve.layers.linear import Linear
from moeserve.layers.quant.gguf_blocks import decode_int4_terms
from moeserve.layers.quant.int4_cpu import Int4CPUMethod

# bytes per block, block width, and the byte ranges that hold fp16 scales (kept small and finite)
_LAYOUT = {"Q4_0": (18, 32, [(0, 2)]), "Q4_1": (20, 32, [(0, 2), (2, 4)]),
           "Q8_0": (34, 32, [(0, 2)]), "Q4_K": (144, 256, [(0, 2), (2, 4)])}


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw bytes of an [n, k] tensor of `qtype`: random payload, fp16 scales in ±[0.001, 0.05]."""
    rng = np.random.default_rng(seed)
    size, width, scale_bytes = _LAYOUT[qtype]
    blocks = rng.integers(0, 256, size=(n, k // width, size), dtype=np.uint8)
    for lo, hi in scale_bytes:
        s = (rng.uniform(0.001, 0.05, size=(n, k // width)) * rng.choice([-1, 1], size=(n, k // width)))
        blocks[..., lo:hi] = s.astype(np.float16).view(np.uint8).reshape(n, k // width, 2)
    return blocks.reshape(n, -1)


def reference_weight(qtype: str, data: np.ndarray, n: int, k: int) -> torch.Tensor:
    w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.array(w, dtype=np.float32).reshape(n, k))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_int4_terms_reconstruct_the_dequantized_weight(qtype):
    n, k = 24, 512
    data = random_blocks(qtype, n, k)
    terms = decode_int4_terms(qtype, data, n, k)
    w = sum((torch.from_numpy(t.q.astype(np.float32)) - 8) * torch.from_numpy(t.scale).repeat_interleave(32, 1)
            + torch.from_numpy(t.zero).repeat_interleave(32, 1) for t in terms)
    ref = reference_weight(qtype, data, n, k)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_matmul_matches_dequantize_then_linear(qtype, rows, bias):
    n, k = 40, 512  # 40 output rows: not a multiple of 16, so the packer's padding is exercised
    data = random_blocks(qtype, n, k, seed=rows)
    layer = Linear(k, n, bias=bias)
    ref_w = reference_weight(qtype, data, n, k)
    Int4CPUMethod.attach(layer, decode_int4_terms(qtype, data, n, k))
    assert layer.weight is None and layer.quant_method is not None
    x = torch.randn(3, rows, k, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
        want = F.linear(x, ref_w, layer.bias)
    assert got.shape == want.shape == (3, rows, n) and got.dtype == torch.float32
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-2, err  # bf16 activations, scales and output: a few 1e-3


def test_formats_without_an_int4_mapping_say_so():
    assert decode_int4_terms("Q6_K", np.zeros((2, 210), np.uint8), 2, 256) is None
    assert decode_int4_terms("Q4_0", np.zeros((2, 9), np.uint8), 2, 16) is None  # K not a multiple of 32


# --------------------------------------------------------------------------------------------------------------
# Batched CPU paged attention (layers.attention.paged_attention_reference) against kernels.reference
# --------------------------------------------------------------------------------------------------------------


def _attention_case(query_lens, seq_lens, heads=6, kv_heads=2, head_dim=16, block_size=4, seed=0):
    import numpy as np

    from moeserve.layers.attention import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # pages scattered over the pool
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)])
        tail = cache[:, tables[b, n - 1].item()].view(2, -1)[:, seq_lens[b] % block_size * kv_heads * head_dim:]
        if seq_lens[b] % block_size:
            tail.fill_(float("nan"))  # never-written slots of a sequence's last page hold garbage
    for free in perm:
        cache[:, free] = float("nan")
    qsl = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    q = torch.randn(int(qsl[-1]), heads, head_dim, generator=g)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), query_start_loc=torch.from_numpy(qsl),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
                             max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                             query_start_loc_cpu=qsl, seq_lens_cpu=np.array(seq_lens, dtype=np.int32))
    return q, cache, meta


@pytest.mark.parametrize("query_lens,seq_lens", [
    ([1] * 5, [7, 1, 13, 4, 9]),  # decode: one batch, ragged contexts
    ([3, 3, 2], [3, 10, 5]),  # similar prefills/chunks: one padded batch
    ([1, 9, 1, 0, 4], [6, 9, 17, 5, 12]),  # mixed: decode batch + each prefill alone, one idle sequence
])
def test_batched_cpu_attention_matches_the_per_sequence_reference(query_lens, seq_lens):
    from moeserve.kernels.reference import ref_paged_attention
    from moeserve.layers.attention import paged_attention_reference

    q, cache, meta = _attention_case(query_lens, seq_lens)
    got = paged_attention_reference(q, cache, meta, scale=0.3)
    want = ref_paged_attention(q, cache, query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens,
                               block_tables=meta.block_tables, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The default model end to end: packed by default, the fp32 reference with dtype="float32"
# --------------------------------------------------------------------------------------------------------------


def test_default_model_stays_packed_and_follows_the_fp32_reference():
    from moeserve import LLM, SamplingParams
    from moeserve.layers.linear import LinearBase

    def engine(**kw):
        return LLM(max_model_len=128, kv_cache_memory_bytes=16 << 20, **kw)

    packed = engine()
    model = packed.llm_engine.executor.worker.model
    tok = packed.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    sp = SamplingParams(temperature=0, max_tokens=12)
    got = packed.generate([text], sp)[0].outputs[0]
    assert "Paris" in got.text, got.text
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(linears) == 4 * 30 and all(m.quant_method is not None and m.weight is None for m in linears)
    del packed
    reference = engine(dtype="float32")
    want = reference.generate([text], sp)[0].outputs[0]
    assert got.token_ids[:8] == want.token_ids[:8], (got.text, want.text)


def test_default_model_keeps_bf16_copies_for_its_mlp_only(monkeypatch):
    """The attention projections run int4 at every row count (int4_cpu.INT4_ONLY_KINDS, ~55 MB less at the run's
    peak); the MLP's linears keep their bf16 copies for batches and prefills. Every layer alike."""
    from moeserve import LLM
    from moeserve.layers.linear import LinearBase

    monkeypatch.delenv("MOESERVE_CPU_BF16_WEIGHTS", raising=False)
    model = LLM(max_model_len=128, kv_cache_memory_bytes=16 << 20).llm_engine.executor.worker.model
    copies: dict[str, set[bool]] = {}
    for name, m in model.named_modules():
        if isinstance(m, LinearBase):
            copies.setdefault(name.rpartition(".")[2], set()).add(m.weight_bf16 is not None)
    want = {"qkv_proj": False, "o_proj": False, "gate_up_proj": True, "down_proj": True}
    assert copies == {kind: {kept} for kind, kept in want.items()}
