"""Linear: nn.Linear's parameters and checkpoint names, with the decode-sized GEMM of kernels.linear on CUDA.

For a few rows (decode) the autotuner picks cuBLAS or a skinny-GEMM kernel per shape; larger inputs and the
CPU reference path are plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through kernels.linear for a 2-D CUDA input."""
    if x.is_cuda and x.dim() == 2:
        from moeserve.kernels.linear import linear as cuda_linear

        return cuda_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    # A quantization method (layers/quant/) that owns this layer's weight once set: forward calls
    # quant_method.apply(self, x) (bias included) instead of the dense matmul.
    quant_method = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return linear(x, self.weight, self.bias)
