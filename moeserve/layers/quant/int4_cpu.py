"""Weight-only int4 matmul on CPU: torch's packed int4 kernel, fed bf16 activations.

Why bf16: in torch 2.13 `_weight_int4pack_mm_for_cpu` is vectorised (AVX-512/AMX) for bf16 activations only;
with fp32 or fp16 ones it takes a scalar path 30-150x slower than a dense fp32 matmul (measured on the 2-core
Xeon this was built on). So the activations are rounded to bf16 on the way in and the output cast back: the
weights are exactly the file's integers, the scales and zeros are rounded to bf16, and the kernel accumulates
in fp32. Against the dequantized fp32 reference that is an error of a few 1e-3 relative (tests/test_cpu_quant).

A layer may need several terms (Q8_0 is two int4 halves, see gguf_blocks); their outputs add up.

Per-M choice: the int4 kernel's time grows linearly with the number of rows M (it does not amortise the weight
over rows: 7x from M=1 to M=16), while a bf16 GEMM reads its weight once. From M = DENSE_MIN_ROWS rows on (the
crossover measured on the 2-core AVX-512 Xeon: int4 wins up to 4 rows, bf16 from 5-6; see benchmarks/cpu/NOTES.md)
a layer uses a bf16 copy of its weight, made at load from the same terms: w = sum (q - 8) * scale + zero with the
bf16 scale and zero the int4 kernel uses, summed in fp32 and rounded once to bf16. It costs 2 bytes per weight
beside the 0.5 of the packed form; MOESERVE_CPU_BF16_WEIGHTS=0 skips it (int4 only: less memory, slower batches
and prefills). The attention projections (INT4_ONLY_KINDS: qkv_proj, o_proj) never keep it: the default model's run
peaks ~55 MB lower for ~5 % of batch-16 speed (benchmarks/cpu/NOTES.md).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.quant.gguf_blocks import GROUP, Int4Term

_N_MULTIPLE = 16  # the CPU packer wants N divisible by 16; we pad rows with zeros and slice them off
DENSE_MIN_ROWS = 5  # from this many activation rows on, the bf16 dense copy (where kept) is faster


INT4_ONLY_KINDS = frozenset({"qkv_proj", "o_proj"})


def keep_bf16_weights(kind: str = "") -> bool:
    if kind in INT4_ONLY_KINDS:
        return False
    return os.environ.get("MOESERVE_CPU_BF16_WEIGHTS", "1") not in ("0", "false", "no", "off")


class PackedTerms(list):
    """pack()'s result: [(packed weight, scales_and_zeros)] per term, and .dense, the bf16 [N, K] weight (or
    None)."""

    dense: torch.Tensor | None = None


def pack_term(term: Int4Term, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight [N', K/2] uint8, scales_and_zeros [K/32, N', 2] bf16), N' = N rounded up to 16.

    Packed `rows` rows at a time, a multiple of 64 (the CPU layout interleaves blocks of 64 rows and packs the
    blocks independently, so the pieces are the whole's bytes; 16-row pieces are not): the packer wants int32
    values, 4 bytes a weight, which for a 49152-row LM head would be a 113 MB temporary at once."""
    if rows % 64:
        raise ValueError(f"pack_term: rows must be a multiple of 64, got {rows}")
    n, k = term.q.shape
    pad = -n % _N_MULTIPLE
    packed = torch.empty(n + pad, k // 2, dtype=torch.uint8)
    for r in range(0, n, rows):
        part = _pack_q(term.q[r: r + rows], pad if r + rows >= n else 0)
        packed[r: r + part.shape[0]] = part
    return packed, _scales_and_zeros(term.scale, term.zero, pad)


def _pack_q(q: np.ndarray, pad: int) -> torch.Tensor:
    """[rows, K] values 0..15 -> [rows + pad, K/2] in the kernel's layout, `pad` rows of zero weight added."""
    q = torch.from_numpy(q).to(torch.int32)
    if pad:
        q = torch.cat([q, torch.full((pad, q.shape[1]), 8, dtype=torch.int32)])  # (8 - 8) * 0 + 0 = 0
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def _scales_and_zeros(scale: np.ndarray, zero: np.ndarray, pad: int) -> torch.Tensor:
    # Rounded to bf16 first (the same values: rounding is per element): the stacking then moves 2-byte values, not
    # 4-byte ones (the tied head's 49152 rows: ~7 MB temporaries instead of ~17 MB, which set the load's peak).
    scale, zero = torch.from_numpy(scale).to(torch.bfloat16), torch.from_numpy(zero).to(torch.bfloat16)
    if pad:
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def dense_bf16(terms: list[Int4Term], rows: int = 256) -> torch.Tensor:
    """[N, K] bf16: the sum of the terms' (q - 8) * scale + zero, with scale and zero rounded to bf16 as the int4
    kernel stores them, summed in fp32 and rounded once. Made `rows` rows at a time: small fp32 temporaries,
    which malloc reuses (full-size ones left hundreds of MB of freed but resident heap behind)."""
    n, k = terms[0].q.shape
    out = torch.empty(n, k, dtype=torch.bfloat16)
    for r in range(0, n, rows):
        acc = None
        for t in terms:
            q = torch.from_numpy(t.q[r: r + rows]).float().sub_(8).view(-1, k // GROUP, GROUP)
            scale = torch.from_numpy(t.scale[r: r + rows]).to(torch.bfloat16).float()[..., None]
            zero = torch.from_numpy(t.zero[r: r + rows]).to(torch.bfloat16).float()[..., None]
            w = q.mul_(scale).add_(zero)
            acc = w if acc is None else acc.add_(w)
        out[r: r + rows] = acc.view(-1, k)
    return out


class Int4CPUMethod:
    """quant_method for a Linear whose weight is a sum of int4 terms; the dense weight is not kept."""

    name = "int4_cpu"

    @staticmethod
    def pack(terms: list[Int4Term], bf16_weights: bool | None = None) -> PackedTerms:
        """The terms in the kernel's layout (0.5 byte per weight), and the bf16 dense copy for many-row inputs
        (2 bytes per weight; unless bf16_weights is off, by default MOESERVE_CPU_BF16_WEIGHTS): pack as soon as
        decoded, attach later."""
        packed = PackedTerms(pack_term(t) for t in terms)
        if keep_bf16_weights() if bf16_weights is None else bf16_weights:
            packed.dense = dense_bf16(terms)
        return packed

    @staticmethod
    def pack_rows(decode: Callable[[int, int], list[Int4Term] | None], n: int, rows: int = 4096,
                  bf16_weights: bool | None = None) -> PackedTerms | None:
        """pack() of an [n, K] weight decoded `rows` rows at a time (a multiple of 64): decode(start, stop) gives
        the int4 terms of those rows, or None where the format has no int4 mapping (then None). The same bytes
        as pack(decode(0, n)) -- blocks of 64 rows pack independently, the bf16 copy is made row by row -- but no
        full-size term or decode temporary exists: for the default model's tied Q8_0 head (49152 rows) the whole
        decode took ~220 MB at once (int8/int16 temporaries, two 28 MB uint8 terms), the load's peak."""
        if rows % 64:
            raise ValueError(f"pack_rows: rows must be a multiple of 64, got {rows}")
        packs, scales, zeros, dense, pad = [], [], [], None, -n % _N_MULTIPLE
        for r in range(0, n, rows):
            stop = min(r + rows, n)
            terms = decode(r, stop)
            if not terms:
                return None
            if r == 0:
                k = terms[0].q.shape[1]
                packs = [torch.empty(n + pad, k // 2, dtype=torch.uint8) for _ in terms]
                scales = [np.empty((n, k // GROUP), t.scale.dtype) for t in terms]
                zeros = [np.empty((n, k // GROUP), t.zero.dtype) for t in terms]
                if keep_bf16_weights() if bf16_weights is None else bf16_weights:
                    dense = torch.empty(n, k, dtype=torch.bfloat16)
            if len(terms) != len(packs):
                raise ValueError(f"pack_rows: rows {r}-{stop} decoded to {len(terms)} terms, not {len(packs)}")
            for i, t in enumerate(terms):
                part = _pack_q(t.q, pad if stop == n else 0)
                packs[i][r: r + part.shape[0]] = part
                scales[i][r: stop], zeros[i][r: stop] = t.scale, t.zero
            if dense is not None:
                dense[r: stop] = dense_bf16(terms)
            del terms, part
        packed = PackedTerms((w, _scales_and_zeros(s, z, pad)) for w, s, z in zip(packs, scales, zeros))
        packed.dense = dense
        return packed

    @staticmethod
    def attach(layer: nn.Module, terms: list[Int4Term] | list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give `layer` (a Linear of out_features x in_features) the int4 terms (or their pack()) and drop its
        dense weight. They are buffers, not parameters: nothing loads into them or trains them."""
        if not isinstance(terms, PackedTerms):
            terms = Int4CPUMethod.pack(terms) if not terms or not isinstance(terms[0], tuple) else PackedTerms(terms)
        packed = terms
        n_padded, k = packed[0][0].shape[0], packed[0][0].shape[1] * 2
        if k != layer.in_features or not 0 <= n_padded - layer.out_features < _N_MULTIPLE:
            raise ValueError(f"int4 terms of {n_padded} x {k} do not fit a Linear of {(layer.out_features, layer.in_features)}")
        layer.register_parameter("weight", None)
        for i, (weight, sz) in enumerate(packed):
            layer.register_buffer(f"qweight{i}", weight)
            layer.register_buffer(f"qscales_zeros{i}", sz)
        if packed.dense is not None and packed.dense.shape != (layer.out_features, layer.in_features):
            raise ValueError(f"dense weight of {tuple(packed.dense.shape)} does not fit {layer}")
        layer.register_buffer("weight_bf16", packed.dense)
        layer.num_int4_terms = len(packed)
        # the kernel arguments, looked up once (not through nn.Module.__getattr__ on every call)
        layer.int4_args = [(getattr(layer, f"qweight{i}"), getattr(layer, f"qscales_zeros{i}"))
                           for i in range(len(packed))]
        layer.quant_method = Int4CPUMethod()

    @staticmethod
    def attach_lm_head(head: nn.Module, terms: PackedTerms) -> None:
        """The same for a ParallelLMHead (one TP rank): hidden -> logits through the int4 kernel (few rows) or
        the bf16 copy (many), whatever the head is tied to (loader/gguf.py may point the embedding at the copy)."""
        head.in_features, head.out_features, head.bias = terms[0][0].shape[1] * 2, head.num_embeddings, None
        Int4CPUMethod.attach(head, terms)

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            out = Int4CPUMethod.apply(layer, x.reshape(-1, x.shape[-1]))
            return out.reshape(*x.shape[:-1], layer.out_features)
        xb = x.bfloat16()  # .bfloat16() and .float() parse their arguments in ~2-4 us less than .to(dtype)
        dense = layer.weight_bf16
        if dense is not None and x.shape[0] >= DENSE_MIN_ROWS:
            out = F.linear(xb, dense)
        else:
            (w, sz), *more = layer.int4_args
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, GROUP, sz)
            for w, sz in more:  # several terms add up in fp32
                out = out.float().add_(torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, GROUP, sz))
            if out.shape[1] != layer.out_features:  # the packer's padding rows
                out = out[:, : layer.out_features]
        out = out.float() if x.dtype == torch.float32 else out.to(x.dtype)
        return out if layer.bias is None else out + layer.bias
