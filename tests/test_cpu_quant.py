"""Quantized CPU matmuls (layers/quant) against the fp32 reference: gguf's own dequantization, then F.linear.

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
