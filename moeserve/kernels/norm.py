"""Fused residual-add + RMSNorm: one pass over each row instead of eight small kernels.

    residual <- x + residual            (when a residual is given; written in place)
    out      <- weight * (r / sqrt(mean(r^2) + eps)).to(dtype)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl, runtime
from moeserve.kernels.pdl import pdl_begin


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = 0):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., N] contiguous. With `residual`, it becomes x + residual (in place) and is what gets normalised."""
    runtime.check_device("rms_norm", x, weight)
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    out = torch.empty_like(x)
    if rows == 0:
        return out
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        raise ValueError("rms_norm: x and residual must be contiguous")
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, n, eps,
                              HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
                              **pdl.launch(x.device, rows))
    return out
