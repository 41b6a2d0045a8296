"""Does programmatic dependent launch (PDL) pay on this card?  A CUDA-graph chain of decode-sized Triton kernels
(a 1-row GEMV streaming a weight, then a tiny row op, repeated), timed with PDL off, with each kernel waiting
at its top, and with the GEMV loading its first weight tile before the wait.  One graph replay, median of 20.

    python benchmarks/kernels/pdl_probe.py
"""
import statistics

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv(x, w, y, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
          EARLY: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    acc = tl.zeros([BN], tl.float32)
    if EARLY:  # the first weight tile depends on nothing the previous kernel writes
        w0 = tl.load(w + n[:, None] * K + k[None, :])
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if EARLY:
        acc += tl.sum(w0.to(tl.float32) * tl.load(x + k)[None, :].to(tl.float32), axis=1)
        start = BK
    else:
        start = 0
    for k0 in range(start, K, BK):
        wt = tl.load(w + n[:, None] * K + (k0 + k)[None, :])
        acc += tl.sum(wt.to(tl.float32) * tl.load(x + k0 + k)[None, :].to(tl.float32), axis=1)
    tl.store(y + n, acc.to(tl.bfloat16))


@triton.jit
def _row_op(x, y, N: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    o = tl.arange(0, N)
    v = tl.load(x + o).to(tl.float32)
    r = tl.rsqrt(tl.sum(v * v) / N + 1e-6)
    tl.store(y + o, (v * r).to(tl.bfloat16))


def chain(ws, x, bufs, pdl, early, row_ops):
    h, i = x, 0
    for w in ws:  # every kernel writes the ring's next buffer: none reads what it writes
        N, K = w.shape
        i = (i + 1) % len(bufs)
        _gemv[(N // 16,)](h, w, bufs[i], N, K=K, BN=16, BK=256, PDL=pdl, EARLY=early, launch_pdl=pdl)
        h = bufs[i]
        for _ in range(row_ops):
            i = (i + 1) % len(bufs)
            _row_op[(1,)](h, bufs[i], N=N, PDL=pdl, launch_pdl=pdl)
            h = bufs[i]
    return h


def time_graph(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            out = fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times), out


def main():
    torch.manual_seed(0)
    print("triton", triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
    D = 2048
    layers = 96  # 96 x 8 MiB = 768 MiB of weights: streamed from HBM, not L2
    ws = [torch.randn(D, D, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(layers)]
    x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    ref = None
    for row_ops in (0, 3):
        for pdl, early in ((False, False), (True, False), (True, True)):
            bufs = [torch.empty(D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            us, out = time_graph(lambda: chain(ws, x, bufs, pdl, early, row_ops))
            out = out.clone()
            if not pdl:
                ref = out
            same = torch.equal(out, ref)
            n = layers * (1 + row_ops)
            print(f"row_ops={row_ops} pdl={pdl!s:5} early={early!s:5}: {us:8.1f} us per graph, "
                  f"{us / n:6.2f} us per kernel, {us / layers:6.2f} us per GEMV+ops, same as no-PDL: {same}")


if __name__ == "__main__":
    main()
