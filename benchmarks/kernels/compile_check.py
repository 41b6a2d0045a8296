"""Compile every kernel launch of the benchmark shapes for sm_90a on a machine WITHOUT a GPU, and read the result.

Runs the real host code (moeserve.kernels.*) on CPU tensors that are never touched by a kernel: each launch is
intercepted, compiled by Triton for Hopper (the ptxas that ships with Triton), and reported: registers, spill
(stack/local) bytes, shared memory, and the matrix instructions in the SASS (HGMMA = wgmma; HMMA = older mma.sync).
Every autotune candidate is compiled, so a config that cannot run on an H100 shows up here, not in the one GPU
call. Usage:  python benchmarks/kernels/compile_check.py [--sass-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from moeserve.kernels import autotune, runtime  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
RESULTS: dict[tuple, dict] = {}
_BACKEND = make_backend(TARGET)


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    kwargs["debug"] = False
    binder = triton_jit.create_function_from_signature(self.signature, self.params, _BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(_BACKEND, kwargs, bound_args, specialization, options)
    key = (self.fn.__name__, str(sorted(constexprs.items())), options.num_warps, options.num_stages, str(signature))
    if key not in RESULTS:
        try:
            compiled = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET,
                                      options=options.__dict__)
            RESULTS[key] = _inspect(compiled) | {"kernel": self.fn.__name__, "warps": options.num_warps,
                                                 "stages": options.num_stages, "consts": _consts(self, constexprs)}
        except Exception as exc:  # report and go on: the point is to see every failure in one pass
            RESULTS[key] = {"kernel": self.fn.__name__, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                            "consts": _consts(self, constexprs), "warps": options.num_warps,
                            "stages": options.num_stages}
    return None


def _consts(fn, constexprs) -> str:
    names = [p.name for p in fn.params]
    return " ".join(f"{names[path[0]]}={v}" for path, v in constexprs.items() if names[path[0]].isupper())


def _inspect(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    res = subprocess.run([str(TOOLS / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
    sass = subprocess.run([str(TOOLS / "cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res.stdout))
    return {
        "regs": int(usage.get("REG", -1)), "stack": int(usage.get("STACK", 0)), "local": int(usage.get("LOCAL", 0)),
        "smem": compiled.metadata.shared, "hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA"),
        "ldg128": len(re.findall(r"LDG\.E\.128|LDG\.E\.ENL2\.128|LDG\.E\.[A-Z.]*128", sass)),
        "cp_async": sass.count("LDGSTS"), "sass": sass,
    }


class CompileEveryCandidate:
    """Stands in for the autotuner: 'runs' (compiles) every candidate, then returns the default."""

    def choose(self, kernel, key, candidates, run, default):
        for cfg in candidates:
            run(cfg)
        return default


def _shapes():
    """The benchmark shapes (qwen3-30b-a3b) plus the other catalog attention geometries."""
    from moeserve.kernels import attention, fused_moe, linear, rotary

    dev = "cpu"
    E, K, H, inter = 128, 8, 2048, 768
    w13 = torch.empty(E, 2 * inter, H, dtype=torch.bfloat16)
    w2 = torch.empty(E, H, inter, dtype=torch.bfloat16)
    for T in (1, 32, 128, 8192):
        x = torch.empty(T, H, dtype=torch.bfloat16)
        ids = torch.zeros(T, K, dtype=torch.int32)
        fused_moe.fused_moe(x, w13, w2, torch.empty(T, K), ids)
    for n, k in ((5120, 2048), (2048, 4096), (128, 2048)):  # qkv, o_proj, router at decode batch sizes
        for M in (1, 2, 4, 8, 16):
            linear.linear(torch.empty(M, k, dtype=torch.bfloat16), torch.empty(n, k, dtype=torch.bfloat16))
    linear.linear(torch.empty(3, 100), torch.empty(37, 100), torch.empty(37))  # fp32 with a bias
    for T in (1, 64):  # qwen3's q/k norm + rotary, with and without the K/V cache write
        q, k = torch.empty(T, 32, 128, dtype=torch.bfloat16), torch.empty(T, 4, 128, dtype=torch.bfloat16)
        cs, nw = torch.empty(4096, 64), torch.empty(128, dtype=torch.bfloat16)
        cache = torch.empty(2, 64, 16, 4, 128, dtype=torch.bfloat16)
        rotary.apply_rope(q, k, torch.zeros(T, dtype=torch.int64), cs, cs, nw, nw)
        rotary.apply_rope(q, k, torch.zeros(T, dtype=torch.int64), cs, cs, nw, nw,
                          kv_write=(k, cache, torch.zeros(T, dtype=torch.int64)))
    for heads, kvh, d in ((32, 4, 128), (32, 8, 128), (16, 16, 128)):
        for B, ctx, qlen in ((1, 4096, 1), (32, 384, 1), (128, 4096, 1), (1, 8192, 8192), (4, 2048, 512)):
            T = B * qlen
            cache = torch.empty(2, 64, 16, kvh, d, dtype=torch.bfloat16)
            q = torch.empty(T, heads, d, dtype=torch.bfloat16)
            qsl = torch.arange(B + 1, dtype=torch.int32) * qlen
            lens = torch.full((B,), ctx, dtype=torch.int32)
            tables = torch.zeros(B, ctx // 16, dtype=torch.int32)
            attention.paged_attention(q, cache, query_start_loc=qsl, seq_lens=lens, block_tables=tables,
                                      scale=0.1, max_query_len=qlen, max_seq_len=ctx)
        k = torch.empty(8, kvh, d, dtype=torch.bfloat16)
        attention.write_kv_cache(k, k, cache, torch.zeros(8, dtype=torch.int64, device=dev))
    # the fp32 correctness path (bench_kernels checks) must compile too
    for T, e, k, h, i in ((1, 128, 8, 2048, 768), (7, 128, 8, 2048, 768), (333, 60, 4, 2048, 1408),
                          (4099, 128, 8, 1024, 384), (5, 8, 2, 64, 32)):
        fused_moe.fused_moe(torch.empty(T, h), torch.empty(e, 2 * i, h), torch.empty(e, h, i), torch.empty(T, k),
                            torch.zeros(T, k, dtype=torch.int32))
    for heads, kvh, d in ((32, 4, 128), (32, 8, 96), (8, 8, 64)):
        for B, qlen in ((3, 1), (2, 300)):
            cache = torch.empty(2, 64, 16, kvh, d)
            attention.paged_attention(torch.empty(B * qlen, heads, d), cache,
                                      query_start_loc=torch.arange(B + 1, dtype=torch.int32) * qlen,
                                      seq_lens=torch.full((B,), 1000, dtype=torch.int32),
                                      block_tables=torch.zeros(B, 64, dtype=torch.int32), scale=0.1,
                                      max_query_len=qlen, max_seq_len=1000)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass-dir", help="write each kernel's SASS here")
    args = ap.parse_args()
    triton_jit.JITFunction.run = _compile_instead_of_launch
    runtime.check_device = lambda name, *t: None
    runtime.num_sms = lambda device: 132
    autotune._TUNER = CompileEveryCandidate()
    _shapes()
    bad = 0
    print(f"{'kernel':<24} {'w':>2} {'st':>2} {'regs':>4} {'spill':>5} {'smem':>6} {'hgmma':>5} {'hmma':>4} "
          f"{'ldg128':>6} {'cpasync':>7}  constexprs")
    for i, r in enumerate(RESULTS.values()):
        if "error" in r:
            bad += 1
            print(f"{r['kernel']:<24} {r['warps']:>2} {r['stages']:>2} COMPILE ERROR {r['error']}  [{r['consts']}]")
            continue
        flag = ""
        if r["smem"] > SMEM_LIMIT:
            flag, bad = " <-- shared memory over the H100 limit", bad + 1
        elif r["stack"] or r["local"]:
            flag = " <-- spills"
        print(f"{r['kernel']:<24} {r['warps']:>2} {r['stages']:>2} {r['regs']:>4} {r['stack'] + r['local']:>5} "
              f"{r['smem']:>6} {r['hgmma']:>5} {r['hmma']:>4} {r['ldg128']:>6} {r['cp_async']:>7}  "
              f"{r['consts']}{flag}")
        if args.sass_dir:
            Path(args.sass_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.sass_dir) / f"{i:03d}_{r['kernel']}.sass").write_text(r["sass"])
    print(f"{len(RESULTS)} kernel variants compiled for sm_90a, {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
