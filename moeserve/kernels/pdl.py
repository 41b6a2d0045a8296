"""Programmatic dependent launch (PDL): each kernel's launch overlaps the end of the kernel before it.

Every kernel here takes a `PDL` constexpr and starts with `pdl_begin(PDL)`, before it touches memory: it waits
until the kernel before it has finished and its writes are visible, then lets the kernel after it launch. What
overlaps is launch, scheduling and set-up, about 0.6 us a kernel boundary on an H200 (benchmarks/kernels/
pdl_probe.py), and a decode layer has ~12-16 boundaries. Because the wait comes first, no read or write can race
the previous kernel, whatever it is (a kernel launched without PDL, a copy, NCCL: those are fully ordered anyway).

Only for launches over at most MAX_ROWS tokens. Measured on an H200 (qwen3-30b-a3b, latency workload, results/
kernels/2026-11-28-session18-pdl/): with PDL on every launch, decode TPOT fell 12-16 % at batch 1 and 5 / 3 % at
8 / 32 rows in fp8 (bf16 at 8 rows rose 3 %), but fp8 at 128 rows rose 2.4 % and the prefill of 4k-16k tokens
(TTFT) 5-25 %: large grids lose.
On for Hopper and newer GPUs (griddepcontrol is sm_90 PTX), off under the interpreter. MOESERVE_PDL: 0 off,
1 wait then release at once (the default), 2 wait only, for A/B timing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moeserve.kernels import runtime

_on: dict[int, int] = {}


def enabled(device: torch.device) -> int:
    """0: off; 1: wait, then release the next kernel at once; 2: wait only (the next kernel launches as this one's
    programs exit). MOESERVE_PDL=0 / 1 / 2."""
    if device.type != "cuda" or runtime.interpreting():
        return 0
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _on:
        mode = int(os.environ.get("MOESERVE_PDL", "1"))
        _on[index] = mode if torch.cuda.get_device_capability(index)[0] >= 9 else 0
    return _on[index]


MAX_ROWS = 64


def launch(device: torch.device, rows: int) -> dict:
    """The launch keywords for a kernel over `rows` tokens on `device`: its PDL constexpr and Triton's launch_pdl,
    set together."""
    mode = enabled(device) if rows <= MAX_ROWS else 0
    return {"PDL": mode, "launch_pdl": mode > 0}


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
