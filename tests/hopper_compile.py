"""Compile, without a GPU, every constexpr form of the kernels with the most of them for an H100 (sm_90): Triton's
front end and ptxas run here, nothing is launched. The interpreter the CPU tests use executes Python, so it
accepts code the compiler refuses: session 14's int4 experts passed every interpreter test and then failed to
compile on the H100 (a helper with returns of two shapes under constexpr branches). Run by
tests/test_hopper_compile.py in a process of its own, since it swaps Triton's active driver for a stand-in.

    python tests/hopper_compile.py      # prints one line per form, "FAILED" lines first; exit 1 if any failed

Forms: fused_moe's four kernels for bf16, fp8 (scale blocks inside a K tile, per row, element-wise; W8A8, with
the activation quant before the kernels) and int4 (groups of 8 and 16, with zeros and symmetric)
experts, one config per (SORT, FOLD, GEMV1, LATE, A8, DEEP) at each token regime; fp8_linear's W8A8 GEMM and the bf16
skinny GEMM (GEMV and tl.dot forms), split-K (the reduce in the same launch) or not, with and without bias, block
and per-channel scales; the routers' softmax and grouped top-k, with
and without telemetry counts; int4_linear (GEMV and GEMM, zeros and symmetric); paged attention (decode and
prefill) and MLA decode over bf16 and fp8 caches, and both cache writes. Every form with programmatic dependent
launch (kernels/pdl.py) on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _CompileOnlyDriver:
    """What JITFunction.run asks the active driver for, answered for an sm_90 device that is never used."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def compile_only() -> None:
    """Every kernel launch from here on compiles (all stages, to a cubin) and returns without running, with
    programmatic dependent launch on, as on a Hopper GPU (the launches' tensors are CPU tensors here)."""
    from moeserve.kernels import pdl

    driver.set_active(_CompileOnlyDriver())
    pdl.launch = lambda device, rows: {"PDL": 1, "launch_pdl": True}
    run = JITFunction.run

    def warm(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        ptx = kernel.asm.get("ptx", "")
        if "griddepcontrol.wait" not in ptx or "griddepcontrol.launch_dependents" not in ptx:
            raise RuntimeError(f"{self.__name__}: no griddepcontrol in its PTX: it would not wait for the kernel "
                               "before it under programmatic dependent launch")
        return kernel

    JITFunction.run = warm


def _forms(cands: list[dict]) -> list[dict]:
    """One config per code path (the tile sizes do not change which code the compiler sees)."""
    seen, out = set(), []
    for c in cands:
        key = tuple(c.get(k, d) for k, d in (("SORT", 1), ("FOLD", 0), ("GEMV1", 0), ("LATE", 0), ("A8", 0),
                                             ("DEEP", 0)))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def moe_cases():
    """(name, scales argument of _moe_chunk or None, w13, w2, scale_k, a8) for each weight format."""
    E, H, I = 4, 72, 40
    g = torch.Generator().manual_seed(0)
    yield "bf16", None, torch.randn(E, 2 * I, H).bfloat16(), torch.randn(E, H, I).bfloat16(), None, False
    w13 = torch.randn(E, 2 * I, H).to(torch.float8_e4m3fn)
    w2 = torch.randn(E, H, I).to(torch.float8_e4m3fn)
    for kind, (b1, b2) in {"tile": ((8, 16), (8, 16)), "row": ((1, H), (1, I)), "elem": ((4, 8), (8, 8)),
                           "tile32": ((8, 32), (8, 32))}.items():
        s13 = torch.rand(E, 2 * -(-I // b1[0]), -(-H // b1[1]))
        s2 = torch.rand(E, -(-H // b2[0]), -(-I // b2[1]))
        scale_k = (b1[1] if b1[1] < H else 0, b2[1] if b2[1] < I else 0)
        yield (f"fp8 {kind}", (s13, s2, {"w13": b1, "w2": b2}, (None, None), 1), w13, w2, scale_k, True)
    from moeserve.layers.quant.int4 import pack_int32

    H4, I4 = 96, 32
    p13 = pack_int32(torch.randint(0, 16, (E, 2 * I4, H4), generator=g), -1)
    p2 = pack_int32(torch.randint(0, 16, (E, H4, I4), generator=g), -1)
    for group in (8, 16):
        s13, s2 = torch.rand(E, 2 * I4, H4 // group), torch.rand(E, H4, I4 // group)
        for zeros in (True, False):
            z = ((torch.randint(0, 16, s13.shape, dtype=torch.uint8), torch.randint(0, 16, s2.shape, dtype=torch.uint8))
                 if zeros else (None, None))
            yield (f"int4 g{group}{' zeros' if zeros else ''}", (s13, s2, {"w13": (1, group), "w2": (1, group)}, z, 8),
                   p13, p2, (group, group), False)


def check_moe(report) -> None:
    from moeserve.kernels import fused_moe as fm

    K = 2
    for name, scales, w13, w2, scale_k, a8 in moe_cases():
        E, two_i, _ = w13.shape
        H, inter = w2.shape[1], two_i // 2
        for tokens in (1, 16, 128, 1024):  # each regime of rows per expert (top-8 of 128 experts)
            T = min(tokens, 16)
            x = torch.randn(T, H).bfloat16()
            ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int()
            int4 = name.startswith("int4")
            for cfg in _forms(fm.moe_candidates(tokens, 8, 128, 2, scale_k, a8=a8, int4=int4)):
                def launch(cfg=cfg):
                    inter1 = torch.empty(T * K, inter, dtype=x.dtype)
                    inter2 = torch.empty(T * K, H, dtype=x.dtype)
                    fm._moe_chunk(cfg, x, w13, w2, torch.rand(T, K), ids, torch.empty_like(x), inter1, inter2,
                                  None, scales)
                report(f"fused_moe {name} tokens={tokens} {cfg}", launch)


def check_fp8_linear(report) -> None:
    from moeserve.kernels import fp8_linear as fl
    from moeserve.layers.quant.fp8 import quantize_blocks, quantize_rows

    N, K = 96, 320
    wq, ws = quantize_blocks(torch.randn(N, K), (32, 64))
    cq, cs = quantize_rows(torch.randn(N, K))
    for M in (1, 3, 40):
        x = torch.randn(M, K).bfloat16()
        cands = fl.fp8_candidates(min(64, triton.next_power_of_2(M)), N, K, 64, 132)
        forms = {c["SPLIT_K"] > 1: c for c in cands}
        for split, cfg in forms.items():
            for bias in (None, torch.randn(N).bfloat16()):
                b = "bias" if bias is not None else "no bias"
                report(f"fp8_linear block M={M} split={split} {b}",
                       lambda: fl.run_config(cfg, x, wq, ws, bias, torch.empty(M, N, dtype=x.dtype), 32, 64))
                report(f"fp8_linear channel M={M} split={split} {b}", lambda: fl.run_config(
                    cfg, x, cq, cs, bias, torch.empty(M, N, dtype=x.dtype), 1, 64, True))


def check_linear(report) -> None:
    """The bf16/fp32 skinny GEMM: one config per (GEMV or tl.dot, split-K or not) at each row bucket."""
    from moeserve.kernels import linear

    N, K = 96, 1024
    for dtype in (torch.bfloat16, torch.float32):
        for M in (1, 3, 16):
            x, w = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype)
            cands = linear.linear_candidates(linear.bucket(M), N, x.element_size())[1:]  # [0]: cuBLAS
            for (dot, split), cfg in {(c["DOT"], c["SPLIT_K"] > 1): c for c in cands}.items():
                for bias in (None, torch.randn(N).to(dtype)):
                    report(f"linear {dtype} M={M} dot={dot} split={split} bias={bias is not None}",
                           lambda: linear.skinny_matmul(x, w, bias, cfg))


def check_router(report) -> None:
    from moeserve.kernels import router

    x, w = torch.randn(5, 64).bfloat16(), torch.randn(64, 64).bfloat16()
    counts, valid = torch.zeros(64, dtype=torch.int64), torch.tensor([4], dtype=torch.int32)
    for telemetry in (False, True):
        extra = {"counts": counts, "valid_tokens": valid} if telemetry else {}
        for renorm in (False, True):
            report(f"router softmax top-k renorm={renorm} counts={telemetry}",
                   lambda: router.route_softmax_topk(x, w, 6, renorm, 1.0, **extra))
        for sigmoid, top2, bias in ((True, True, torch.zeros(64)), (False, False, None)):
            report(f"router grouped top-k sigmoid={sigmoid} top2_sum={top2} counts={telemetry}",
                   lambda: router.route_grouped_topk(x, w, bias, 6, 8, 3, sigmoid, top2, True, 2.5, **extra))


def check_int4_linear(report) -> None:
    from moeserve.kernels.int4_linear import apply_config, int4_candidates, int4_linear
    from moeserve.layers.quant.int4 import pack_int32

    N, K = 96, 256
    packed = pack_int32(torch.randint(0, 16, (N, K)), 1)
    for group in (32, 128):
        scales = torch.rand(N, K // group)
        for zeros in (torch.randint(0, 16, scales.shape, dtype=torch.uint8), None):
            for M in (1, 5, 40):  # the GEMV, the 16-row and the 64-row GEMM
                x = torch.randn(M, K).bfloat16()
                report(f"int4_linear group={group} zeros={zeros is not None} M={M}",
                       lambda: int4_linear(x, packed, scales, zeros, group, torch.randn(N).bfloat16()))
    scales, zeros = torch.rand(N, K // 128), torch.randint(0, 16, (N, K // 128), dtype=torch.uint8)
    for M in (1, 3, 5, 40):  # every config the autotuner may pick (split K among them), one group size
        x, out = torch.randn(M, K).bfloat16(), torch.empty(M, N).bfloat16()
        for cfg in int4_candidates(M, N, 128):
            report(f"int4_linear M={M} {cfg}", lambda: apply_config(cfg, x, packed, scales, zeros, 128, None, out))


def check_attention(report) -> None:
    """Paged attention (decode with split segments, prefill over a cached prefix) and MLA decode, each over a
    bf16 and an fp8 cache, and the cache writes; head sizes of the real models (128; MLA 512 + 64)."""
    from moeserve.kernels import attention, mla_decode

    heads, kvh, d, page, blocks = 8, 2, 128, 16, 12
    tables = torch.arange(blocks, dtype=torch.int32).view(2, -1)
    seq_lens = torch.tensor([70, 33], dtype=torch.int32)
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        cache = torch.zeros(2, blocks, page, kvh, d).to(cache_dtype)
        kv = torch.randn(5, kvh, d).bfloat16()
        report(f"write_kv_cache {cache_dtype}",
               lambda: attention.write_kv_cache(kv, kv, cache, torch.arange(5), 0.5, 0.5))
        for q_lens in ((1, 1), (5, 7)):
            qsl = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
            q = torch.randn(sum(q_lens), heads, d).bfloat16()
            report(f"paged_attention {cache_dtype} q_lens={q_lens}",
                   lambda: attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=seq_lens,
                                                     block_tables=tables, scale=d ** -0.5,
                                                     max_query_len=max(q_lens), max_seq_len=70, k_scale=0.5,
                                                     v_scale=0.5))
        R, P = 512, 64
        latent = torch.zeros(blocks, page, R + P).to(cache_dtype)
        report(f"write_latent_cache {cache_dtype}",
               lambda: mla_decode.write_latent_cache(torch.randn(5, R + P).bfloat16(), latent, torch.arange(5), 0.5))
        report(f"mla_decode {cache_dtype}",
               lambda: mla_decode.mla_decode(torch.randn(2, 16, R).bfloat16(), torch.randn(2, 16, P).bfloat16(),
                                             latent, seq_lens=seq_lens, block_tables=tables, scale=0.1,
                                             max_seq_len=70, kv_scale=0.5))


def main() -> int:
    os.environ["MOESERVE_AUTOTUNE"] = "0"  # nothing can be timed: the router GEMM takes its default (torch)
    compile_only()
    from moeserve.kernels import runtime

    runtime.check_device = lambda *a, **k: None  # CPU tensors stand in for the device's
    failed, done = [], []

    def report(name, launch):
        try:
            launch()
            done.append(name)
        except Exception as e:  # the compiler's own error, innermost cause
            while e.__cause__ is not None or e.__context__ is not None:
                e = e.__cause__ or e.__context__
            failed.append(f"FAILED {name}: {type(e).__name__}: {str(e)[-400:]}")

    check_moe(report)
    check_fp8_linear(report)
    check_linear(report)
    check_router(report)
    check_int4_linear(report)
    check_attention(report)
    print("\n".join(failed))
    print(f"hopper_compile: {len(done)} forms compiled for sm_90, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
