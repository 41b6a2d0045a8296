"""GPU types and fleets: `--gpus 8xH100-80GB --nodes 2`."""

from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what CUDA reports as total memory, a little under the marketing number
    nvlink_domain: int = 8  # GPUs that share one NVLink domain (a node of an HGX board)


# Memory as torch.cuda.get_device_properties().total_memory reports it (rounded to 0.01 GiB).
GPUS = {
    "H100-80GB": GPU("H100-80GB", int(79.18 * GiB)),
    "H100-94GB": GPU("H100-94GB", int(93.12 * GiB)),  # H100 NVL
    "H200": GPU("H200", int(139.81 * GiB)),
    "H20": GPU("H20", int(94.99 * GiB)),
    "A100-80GB": GPU("A100-80GB", int(79.15 * GiB)),
    "A100-40GB": GPU("A100-40GB", int(39.39 * GiB)),
    "L40S": GPU("L40S", int(44.39 * GiB), nvlink_domain=1),
    "B200": GPU("B200", int(178.35 * GiB)),
    "GB200": GPU("GB200", int(184.31 * GiB), nvlink_domain=72),
    "MI300X": GPU("MI300X", int(191.98 * GiB)),
}
_ALIASES = {"H100": "H100-80GB", "H100-SXM": "H100-80GB", "H200-141GB": "H200", "A100": "A100-80GB",
            "H100-NVL": "H100-94GB", "B200-180GB": "B200"}


@dataclass(frozen=True)
class Fleet:
    gpu: GPU
    gpus_per_node: int
    nodes: int = 1

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def tp_limit(self) -> int:
        """Largest tensor-parallel group that stays inside one node's NVLink domain."""
        return min(self.gpus_per_node, self.gpu.nvlink_domain) if self.gpu.nvlink_domain > 1 else 1

    def describe(self) -> str:
        per_node = f"{self.gpus_per_node}x{self.gpu.name}"
        return per_node if self.nodes == 1 else f"{self.nodes} nodes x {per_node}"


def lookup_gpu(name: str) -> GPU:
    """A GPU by name (case-insensitive), or a custom one written as its memory: `80GB`, `79.2GiB`."""
    key = name.strip()
    known = {k.upper(): v for k, v in GPUS.items()}
    aliases = {k.upper(): v.upper() for k, v in _ALIASES.items()}
    canonical = aliases.get(key.upper(), key.upper())
    if canonical in known:
        return known[canonical]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(GB|GIB)", key.upper())
    if m:
        value = float(m.group(1))
        nbytes = int(value * GiB) if m.group(2) == "GIB" else int(value * 1e9)
        return GPU(key, nbytes)
    raise ValueError(
        f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give the memory, e.g. '80GB' or '79.2GiB')"
    )


def parse_gpus(spec: str, nodes: int = 1) -> Fleet:
    """`8xH100-80GB` (the GPUs of one node) and a node count -> Fleet."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\S+)\s*", spec)
    if m:
        count, name = int(m.group(1)), m.group(2)
    else:
        count, name = 1, spec
    if count < 1:
        raise ValueError(f"--gpus {spec!r}: the GPU count must be at least 1")
    if nodes < 1:
        raise ValueError(f"--nodes {nodes}: must be at least 1")
    return Fleet(lookup_gpu(name), count, nodes)
