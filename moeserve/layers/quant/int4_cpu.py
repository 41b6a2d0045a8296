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
a layer uses a bf16 copy of its weight, made by the int4 kernel itself from identity rows at the first call with
that many rows (so it is the kernel's own weight, bit for bit per term). It costs 2 bytes per weight beside the
0.5 of the packed form, and only once batches or prefills come: a batch-1 chat keeps the int4 footprint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.quant.gguf_blocks import GROUP, Int4Term

_N_MULTIPLE = 16  # the CPU packer wants N divisible by 16; we pad rows with zeros and slice them off
DENSE_MIN_ROWS = 5  # from this many activation rows on, the bf16 dense copy (where kept) is faster


class PackedTerms(list):
    """pack()'s result: [(packed weight, scales_and_zeros)] per term."""


def pack_term(term: Int4Term) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight [N', K/2] uint8, scales_and_zeros [K/32, N', 2] bf16), N' = N rounded up to 16."""
    n, k = term.q.shape
    pad = -n % _N_MULTIPLE
    q = torch.from_numpy(term.q).to(torch.int32)
    scale, zero = torch.from_numpy(term.scale), torch.from_numpy(term.zero)
    if pad:
        q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.int32)])  # (8 - 8) * 0 + 0 = 0
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def dense_bf16(args: list[tuple[torch.Tensor, torch.Tensor]], n: int, k: int, rows: int = 256) -> torch.Tensor:
    """[n, k] bf16: the weight the int4 kernel multiplies by, read back through the kernel from identity rows
    (`rows` input features at a time: small temporaries), the terms summed in fp32."""
    out = torch.empty(k, n, dtype=torch.bfloat16)
    eye = torch.eye(rows, k, dtype=torch.bfloat16)
    for r in range(0, k, rows):
        x = eye[: min(rows, k - r)].roll(r, dims=1)  # one-hot rows for input features r .. r + rows - 1
        acc = None
        for w, sz in args:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, GROUP, sz)[:, :n].float()
            acc = y if acc is None else acc.add_(y)
        out[r: r + x.shape[0]] = acc
    return out.t().contiguous()


class Int4CPUMethod:
    """quant_method for a Linear whose weight is a sum of int4 terms; the dense weight is not kept."""

    name = "int4_cpu"

    @staticmethod
    def pack(terms: list[Int4Term]) -> PackedTerms:
        """The terms in the kernel's layout (0.5 byte per weight): pack as soon as decoded, attach later."""
        return PackedTerms(pack_term(t) for t in terms)

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
        layer.register_buffer("weight_bf16", None)  # made at the first call with DENSE_MIN_ROWS rows or more
        layer.num_int4_terms = len(packed)
        # the kernel arguments, looked up once (not through nn.Module.__getattr__ on every call)
        layer.int4_args = [(getattr(layer, f"qweight{i}"), getattr(layer, f"qscales_zeros{i}"))
                           for i in range(len(packed))]
        layer.quant_method = Int4CPUMethod()

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if xb.shape[0] >= DENSE_MIN_ROWS:
            if layer.weight_bf16 is None:
                layer.weight_bf16 = dense_bf16(layer.int4_args, layer.out_features, layer.in_features)
            out = F.linear(xb, layer.weight_bf16).to(x.dtype)
        else:
            args = layer.int4_args
            if len(args) == 1:
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, args[0][0], GROUP, args[0][1])
            else:
                out = None
                for w, sz in args:
                    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, GROUP, sz).float()
                    out = y if out is None else out.add_(y)
            out = out[:, : layer.out_features].to(x.dtype)
        if layer.bias is not None:
            out = out + layer.bias
        return out.reshape(*shape[:-1], layer.out_features)
