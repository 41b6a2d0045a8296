"""Linear: nn.Linear's parameters and checkpoint names, with the decode-sized GEMM of kernels.linear on CUDA.

For a few rows (decode) the autotuner picks cuBLAS or a skinny-GEMM kernel per shape; larger inputs and the
CPU reference path are plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2:
            from moeserve.kernels.linear import linear

            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
