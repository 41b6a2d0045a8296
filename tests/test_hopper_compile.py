"""Every constexpr form of fused_moe and fp8_linear compiles for an H100 (sm_90) on this CPU machine
(tests/hopper_compile.py: Triton's compiler and ptxas, nothing launched). On a GPU the kernel tests compile them
for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from triton_kernels import CUDA  # first: triton reads TRITON_INTERPRET when imported, for the other tests' sake

HERE = Path(__file__).resolve().parent


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(CUDA, reason="on a GPU the kernel tests compile every form for real")
@pytest.mark.skipif(not _nvidia_backend(), reason="this Triton has no CUDA backend to compile with")
def test_every_kernel_form_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    r = subprocess.run([sys.executable, str(HERE / "hopper_compile.py")], capture_output=True, text=True, env=env,
                       timeout=1200)
    summary = [line for line in r.stdout.splitlines() if line.startswith(("FAILED", "hopper_compile:"))]
    assert r.returncode == 0, "\n".join(summary[:20]) or r.stderr[-3000:]
    assert "0 failed" in summary[-1] and int(summary[-1].split()[1]) >= 100, summary[-1]
