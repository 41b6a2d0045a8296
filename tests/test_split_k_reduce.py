"""Split-K in one launch (kernels.linear._split_reduce, used by the skinny bf16 GEMM and fp8_linear's W8A8 GEMM):
the last program of each output tile sums the fp32 partials part[0..split-1] in that order (+ bias) and rounds once.
The output must carry exactly the bits of that fixed-order sum of the kernel's own partials (what the separate
reduce kernel computed before), and every tile counter must be back at 0 after the launch, so that the next launch
(a second call here) reduces again. CUDA: compiled; no CUDA: Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import CUDA, DEVICE, load_kernel  # first: without a GPU it sets up the interpreter

pytest.importorskip("triton")

lin = load_kernel("linear", "_split_reduce")
fk = load_kernel("fp8_linear", "_gemm_kernel")

from moeserve.layers.quant.fp8 import quantize_act_groups, quantize_blocks  # noqa: E402


def _record_partials(monkeypatch) -> list[torch.Tensor]:
    """The fp32 [split, M, N] partial buffers the launches allocate (torch.empty), kept for the reference."""
    made, empty = [], torch.empty

    def spy(*size, **kw):
        t = empty(*size, **kw)
        if kw.get("dtype") == torch.float32 and t.dim() == 3:
            made.append(t)
        return t

    monkeypatch.setattr(torch, "empty", spy)
    return made


def _fixed_order_sum(part: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """0 + part[0] + part[1] + ... + part[split-1] (+ bias) in fp32, rounded once: the two-launch reduce."""
    acc = torch.zeros(part.shape[1:], dtype=torch.float32, device=part.device)
    for s in range(part.shape[0]):
        acc = acc + part[s]
    if bias is not None:
        acc = acc + bias.float()[None, :]
    if dtype == torch.bfloat16 and not CUDA:
        # Triton 3.9's interpreter rounds fp32 -> bf16 toward zero (it drops the low 16 bits); the GPU rounds to
        # nearest even, as torch does
        acc = (acc.view(torch.int32) & -65536).view(torch.float32)
    return acc.to(dtype)


def _counters_zero(device) -> bool:
    return bool((lin.split_counters(torch.device(device), 0) == 0).all())


def _twice_against_partials(launch, shape, split, bias, dtype, monkeypatch) -> list[torch.Tensor]:
    """Two launches into NaN-filled outputs (the second finds the counters the first left): each output equals the
    fixed-order sum of its own launch's partials, the counters are back at 0 after each, both outputs are equal.
    Returns the partial buffers."""
    parts = _record_partials(monkeypatch)
    outs = []
    for _ in range(2):
        out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        launch(out)
        assert _counters_zero(DEVICE), split
        outs.append(out)
    monkeypatch.undo()
    assert len(parts) == 2 and parts[0].shape == (split, *shape)
    for part, out in zip(parts, outs):
        assert torch.equal(out, _fixed_order_sum(part, bias, dtype)), split
    assert torch.equal(outs[0], outs[1])
    return parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M", [1, 3])
def test_skinny_split_reduce_is_the_fixed_order_sum(M, bias, dtype, monkeypatch):
    N, K = 37, 1030  # 5 tiles of 8, the last partial; K not a multiple of any split's range
    g = torch.Generator().manual_seed(M * 10 + bias)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    bk = 128 if dtype == torch.float32 else 256
    for split in (2, 3, 4):
        cfg = {"BLOCK_N": 8, "BLOCK_K": bk, "SPLIT_K": split, "W": 4, "S": 2, "DOT": 0}
        parts = _twice_against_partials(lambda out: lin.skinny_matmul(x, w, b, cfg, out), (M, N), split, b, dtype,
                                        monkeypatch)
        # the partials are the K ranges' products (a sanity check that the reference is not vacuous)
        ref = torch.nn.functional.linear(x.double(), w.double())
        assert torch.allclose(parts[0].double().sum(0), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M", [1, 3])
def test_fp8_split_reduce_is_the_fixed_order_sum(M, bias, monkeypatch):
    N, K, block = 40, 160, (16, 32)  # 3 N tiles of 16, 5 K tiles of 32
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator().manual_seed(M + 7 * bias)
    wq, ws = quantize_blocks(torch.randn(N, K, generator=g) / K ** 0.5, block)
    x = torch.randn(M, K, generator=g).to(dtype)
    xq, xs = (t.to(DEVICE) for t in quantize_act_groups(x, block[1]))
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    for split in (2, 3, 5):
        cfg = fk._c(16, 16, split, 4, 3)
        _twice_against_partials(lambda out: fk.fp8_gemm(xq, xs, wq.to(DEVICE), ws.to(DEVICE), b, out, cfg, *block),
                                (M, N), split, b, dtype, monkeypatch)


def test_counters_are_not_allocated_during_capture(monkeypatch):
    """A buffer too small for the launch grows outside capture; inside it the launch refuses (no allocation)."""
    dev = torch.empty(1, device=DEVICE).device  # as the launches name it: cuda:0, the counters' key
    need = lin.split_counters(dev, 0).numel() + 1
    monkeypatch.setattr(lin.runtime, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before capturing"):
        lin.split_counters(dev, need)
    monkeypatch.setattr(lin.runtime, "capturing", lambda: False)
    old = lin.split_counters(dev, 0)
    new = lin.split_counters(dev, need)
    assert new.numel() >= need and (new == 0).all() and lin.split_counters(dev, 0) is new
    assert any(t is old for t in lin._counters[dev]), "an outgrown buffer stays alive (a graph may hold it)"


def test_one_counter_buffer_per_device_however_named():
    """'cuda' and 'cuda:0' (what a tensor reports) are one device: one buffer, the one the launches re-arm."""
    named = torch.device(DEVICE)
    reported = torch.empty(1, device=DEVICE).device
    assert lin.split_counters(named, 0) is lin.split_counters(reported, 0)
