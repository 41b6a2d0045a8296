"""RMSNorm, computed in fp32 and cast back, as the reference checkpoints were trained.

With a residual, the add that precedes every norm in a pre-norm decoder is fused in:
`norm(x, residual)` returns (normed(x + residual), x + residual). On CUDA this is one Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and x.is_contiguous():
            from moeserve.kernels.norm import rms_norm

            out = rms_norm(x, self.weight, self.eps, residual)  # updates residual in place
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dtype == torch.float32:  # the lines below in one call, bit for bit on CPU (fewer ops)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
