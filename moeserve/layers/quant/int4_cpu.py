"""Weight-only int4 matmul on CPU: torch's packed int4 kernel, fed bf16 activations.

Why bf16: in torch 2.13 `_weight_int4pack_mm_for_cpu` is vectorised (AVX-512/AMX) for bf16 activations only;
with fp32 or fp16 ones it takes a scalar path 30-150x slower than a dense fp32 matmul (measured on the 2-core
Xeon this was built on). So the activations are rounded to bf16 on the way in and the output cast back: the
weights are exactly the file's integers, the scales and zeros are rounded to bf16, and the kernel accumulates
in fp32. Against the dequantized fp32 reference that is an error of a few 1e-3 relative (tests/test_cpu_quant).

A layer may need several terms (Q8_0 is two int4 halves, see gguf_blocks); their outputs add up.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.layers.quant.gguf_blocks import GROUP, Int4Term

_N_MULTIPLE = 16  # the CPU packer wants N divisible by 16; we pad rows with zeros and slice them off


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


class Int4CPUMethod:
    """quant_method for a Linear whose weight is a sum of int4 terms; the dense weight is not kept."""

    name = "int4_cpu"

    @staticmethod
    def pack(terms: list[Int4Term]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The terms in the kernel's layout (0.5 byte per weight): pack as soon as decoded, attach later."""
        return [pack_term(t) for t in terms]

    @staticmethod
    def attach(layer: nn.Module, terms: list[Int4Term] | list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give `layer` (a Linear of out_features x in_features) the int4 terms (or their pack()) and drop its
        dense weight. They are buffers, not parameters: nothing loads into them or trains them."""
        packed = [t if isinstance(t, tuple) else pack_term(t) for t in terms]
        n_padded, k = packed[0][0].shape[0], packed[0][0].shape[1] * 2
        if k != layer.in_features or not 0 <= n_padded - layer.out_features < _N_MULTIPLE:
            raise ValueError(f"int4 terms of {n_padded} x {k} do not fit a Linear of {(layer.out_features, layer.in_features)}")
        layer.register_parameter("weight", None)
        for i, (weight, sz) in enumerate(packed):
            layer.register_buffer(f"qweight{i}", weight)
            layer.register_buffer(f"qscales_zeros{i}", sz)
        layer.num_int4_terms = len(packed)
        layer.quant_method = Int4CPUMethod()

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        out = None
        for i in range(layer.num_int4_terms):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, getattr(layer, f"qweight{i}"), GROUP,
                                                            getattr(layer, f"qscales_zeros{i}"))
            out = y.float() if out is None else out.add_(y.float())
        out = out[:, : layer.out_features].to(x.dtype)
        if layer.bias is not None:
            out = out + layer.bias
        return out.reshape(*shape[:-1], layer.out_features)
