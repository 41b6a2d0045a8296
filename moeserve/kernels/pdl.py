"""Programmatic dependent launch (PDL): each kernel's launch overlaps the end of the kernel before it.

Every kernel here takes a `PDL` constexpr and starts with `pdl_begin(PDL)`, before it touches memory: it waits
until the kernel before it has finished and its writes are visible, then lets the kernel after it launch. What
overlaps is launch, scheduling and set-up, about 0.6 us a kernel boundary on an H200 (benchmarks/kernels/
pdl_probe.py), and a decode layer has ~16 boundaries. Because the wait comes first, no read or write can race
the previous kernel, whatever it is (a kernel launched without PDL, a copy, NCCL: those are fully ordered anyway).

On for Hopper and newer GPUs (griddepcontrol is sm_90 PTX); off under the interpreter, or with MOESERVE_PDL=0
(kept for A/B timing in one run).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moeserve.kernels import runtime

_on: dict[int, bool] = {}


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


def launch(device: torch.device) -> dict:
    """The launch keywords for a kernel on `device`: its PDL constexpr and Triton's launch_pdl, set together."""
    mode = enabled(device)
    return {"PDL": mode, "launch_pdl": mode > 0}


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
