"""GGUF block formats → 4-bit integer "terms" that torch's int4 CPU matmul takes, without going through fp32.

torch's int4 weight matmul computes w = (q - 8) * scale + zero with q in 0..15 and one (scale, zero) per group
of 32 input columns. Each GGUF block format maps onto one or two such terms, exactly (up to the bf16 rounding
of scale and zero, which the kernel stores):

    Q4_0  w = d * (q - 8)              one term:  scale d,       zero 0
    Q4_1  w = d * q + m                one term:  scale d,       zero m + 8d
    Q4_K  w = d*sc_j * q - dmin*m_j    one term per 32-wide sub-block j: scale d*sc_j, zero 8*d*sc_j - dmin*m_j
    Q8_0  w = d * q, q in -128..127    two terms: q = 16*hi + lo, hi in -8..7, lo in 0..15
                                       hi: scale 16d, zero 0;  lo: scale d, zero 8d

Byte layouts follow ggml's block structs (ggml-common.h): Q4_0/Q4_1 keep element i in the low nibble of byte i
and element 16+i in its high nibble; Q4_K packs 8 six-bit scales and mins into 12 bytes and its nibbles in
64-element runs (low nibbles first, then high).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32  # every format above has 32-wide groups (Q4_K: its sub-blocks)


@dataclass
class Int4Term:
    """One term of w = sum over terms of (q - 8) * scale + zero, in torch int4-matmul orientation."""

    q: np.ndarray  # [N, K] uint8, values 0..15
    scale: np.ndarray  # [N, K // 32] float32
    zero: np.ndarray  # [N, K // 32] float32


def _fp16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 → [...] float32 through IEEE half."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes → [..., 32] values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_q4_0(data: np.ndarray, n: int, k: int) -> list[Int4Term]:
    blocks = data.reshape(n, k // 32, 18)
    d = _fp16(blocks[..., 0:2])
    q = _nibbles_32(blocks[..., 2:18]).reshape(n, k)
    return [Int4Term(q, d, np.zeros_like(d))]


def decode_q4_1(data: np.ndarray, n: int, k: int) -> list[Int4Term]:
    blocks = data.reshape(n, k // 32, 20)
    d, m = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])
    q = _nibbles_32(blocks[..., 4:20]).reshape(n, k)
    return [Int4Term(q, d, m + 8 * d)]


def decode_q8_0(data: np.ndarray, n: int, k: int) -> list[Int4Term]:
    blocks = data.reshape(n, k // 32, 34)
    d = _fp16(blocks[..., 0:2])
    q = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).reshape(n, k)
    hi = (q >> 4).astype(np.int16)  # arithmetic shift: floor(q / 16), -8..7
    lo = (q.astype(np.int16) - 16 * hi).astype(np.uint8)  # 0..15
    return [Int4Term((hi + 8).astype(np.uint8), 16 * d, np.zeros_like(d)), Int4Term(lo, d, 8 * d)]


def _q4_k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for all 8 sub-blocks at once: [..., 12] bytes → two [..., 8] arrays."""
    s = s.astype(np.int32)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def decode_q4_k(data: np.ndarray, n: int, k: int) -> list[Int4Term]:
    blocks = data.reshape(n, k // 256, 144)
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])  # [n, k/256]
    sc, mn = _q4_k_scales_mins(blocks[..., 4:16])  # [n, k/256, 8]
    qs = blocks[..., 16:144].reshape(n, k // 256, 4, 32)  # 4 runs of 64 elements: 32 low nibbles, 32 high
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)
    scale = (d[..., None] * sc).reshape(n, k // 32)
    zero = (8 * d[..., None] * sc - dmin[..., None] * mn).reshape(n, k // 32)
    return [Int4Term(q, scale, zero)]


DECODERS = {"Q4_0": decode_q4_0, "Q4_1": decode_q4_1, "Q4_K": decode_q4_k, "Q8_0": decode_q8_0}


def decode_int4_terms(qtype_name: str, data: np.ndarray, n: int, k: int) -> list[Int4Term] | None:
    """The int4 terms of an [n, k] GGUF tensor's raw bytes, or None where the format has no int4 mapping."""
    decoder = DECODERS.get(qtype_name)
    if decoder is None or k % GROUP or (qtype_name == "Q4_K" and k % 256):
        return None
    return decoder(np.asarray(data, dtype=np.uint8), n, k)


def stack_rows(per_part: list[list[Int4Term]]) -> list[Int4Term]:
    """The terms of several linears' weights stacked by rows (a fused q/k/v or gate/up). Parts with fewer terms
    (a Q4 part beside a Q8_0 one) get zero terms: q = 8, scale = zero = 0."""
    count = max(len(terms) for terms in per_part)
    stacked = []
    for i in range(count):
        qs, scales, zeros = [], [], []
        for terms in per_part:
            if i < len(terms):
                t = terms[i]
            else:
                n, k = terms[0].q.shape
                t = Int4Term(np.full((n, k), 8, np.uint8), np.zeros((n, k // GROUP), np.float32),
                             np.zeros((n, k // GROUP), np.float32))
            qs.append(t.q), scales.append(t.scale), zeros.append(t.zero)
        stacked.append(Int4Term(np.concatenate(qs), np.concatenate(scales), np.concatenate(zeros)))
    return stacked
