"""engine/host_memory: a CPU engine hands the heap's free pages back after loading."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Blocks of a few MB, each with a small survivor after it, then all the blocks freed (a GGUF load's decode
# temporaries); the first large free has already raised glibc's dynamic threshold. Prints the RSS left, in MB.
PROBE = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from moeserve.engine import host_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
warm = np.ones(8 << 20, dtype=np.uint8); del warm
before = rss()
blocks, survivors = [], []
for _ in range(40):
    blocks.append(np.ones(3 << 20, dtype=np.uint8))
    survivors.append(np.ones(64, dtype=np.uint8).copy())
del blocks
if {trimmed}:
    host_memory.trim()
print(rss() - before)
"""


def _left_mb(trimmed: bool) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO), trimmed=trimmed)], capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_between_survivors_leave_the_process_after_trim():
    trimmed, kept = _left_mb(trimmed=True), _left_mb(trimmed=False)
    assert trimmed < 2  # 120 MB were allocated and freed
    assert kept > trimmed + 5  # what glibc keeps on its own (12 MB here): why the engine trims

