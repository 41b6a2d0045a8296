"""From a resolution of vLLM's tree for the device to the wheels that travel: what stays the image's, what is
left behind on purpose (and why), and what is pruned because only a left-behind package needed it.

Kept apart from resolve.py so that it is tested without pip or a network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from resolve import canon

# Heavy packages that vLLM's wheel pins but the offline, bf16, text-only path on a Hopper GPU never imports
# (checked against vllm 0.26.0's source: the attention and MLA-prefill backend priorities for SM90 are FA3 only;
# FlashInfer, TokenSpeed-MLA, CUTLASS-MLA and the CuTe-DSL kernels are Blackwell or opt-in paths). Each group can
# be brought back with `fetch.py --with GROUP`.
SKIP_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "cutedsl": (
        ("nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
         "nvidia-cutlass-dsl-libs-cu12", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "cuda-python",
         "nvidia-cuda-nvdisasm"),
        "CuTe-DSL kernels: FA4 (SM100, or SM90 only for head_size > 256), Blackwell MLA, and the small-M router GEMM "
        "of GateLinear (DeepSeek), which falls back to vLLM's own DSV3/cuBLAS router GEMM",
    ),
    "flashinfer": (
        ("flashinfer-python", "cuda-tile"),
        "FlashInfer: second in the attention priorities after FA3 on SM90; sampler only with VLLM_USE_FLASHINFER_SAMPLER",
    ),
    "tokenspeed": (("tokenspeed-mla", "tokenspeed-triton"), "TokenSpeed MLA: Blackwell MLA backend (SM100 only)"),
    "tilelang": (("tilelang", "z3-solver"), "TileLang: DeepSeek-V4 mHC kernels"),
    "video": (("pynvvideocodec", "torchcodec"), "video decoding for multimodal inputs"),
    "nvcc": (
        ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-cccl"),
        "a CUDA compiler for humming-kernels' JIT (quantized linears); bf16 never compiles with it",
    ),
}

# Where the image's version breaks a pin of vLLM's tree, the image's stays (never shadowed from /tmp/vllm_site).
KEEP_DEVICE: dict[str, str] = {
    "numpy": "the image's torch, numba and cupy are built against it; the complaints are caps (numba 0.65: <2.5, "
             "mistral-common: <2.4), not known breakage",
    "numba": "vLLM imports numba only for n-gram speculative decoding, which the benchmark never enables",
    "llvmlite": "numba's partner: stays with the image's numba",
    "setuptools": "not imported on the offline path",
    "torch": "the image's torch is the one vLLM 0.26.0 is built for",
    "torchvision": "the image's",
    "torchaudio": "the image's",
    "triton": "the image's",
    "transformers": "the image's",
}

TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64", "sys_platform": "linux",
    "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


@dataclass
class Selection:
    carry: list[dict] = field(default_factory=list)  # resolution items that travel
    device: list[dict] = field(default_factory=list)  # satisfied by the image (version checked)
    device_unverified: list[dict] = field(default_factory=list)  # the image has the name; its version was unknown
    kept_device: list[tuple[dict, str]] = field(default_factory=list)  # conflicts left to the image's version
    skipped: list[tuple[dict, str]] = field(default_factory=list)  # heavy, not on the path (group reason)
    pruned: list[tuple[dict, str]] = field(default_factory=list)  # needed only by skipped / kept packages


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot read requirement {req!r}")
    return canon(m.group(1))


def marker_applies(req: str) -> bool:
    """True when the requirement's marker holds on the device for some extra (extras are taken loosely: a
    requirement behind any extra counts, so pruning can only keep too much, never too little)."""
    if ";" not in req:
        return True
    try:
        from packaging.markers import Marker
    except ImportError:  # an interpreter whose only copy of packaging is pip's
        from pip._vendor.packaging.markers import Marker

    marker = Marker(req.split(";", 1)[1])
    extras = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req) or [""]
    return any(marker.evaluate({**TARGET_ENV, "extra": e}) for e in extras)


def reverse_edges(items: list[dict]) -> dict[str, set[str]]:
    """{name: names of resolved packages that require it (on the device's platform)}."""
    names = {i["name"] for i in items}
    rev: dict[str, set[str]] = {n: set() for n in names}
    for i in items:
        for req in i["requires_dist"]:
            dep = requirement_name(req)
            if dep in names and dep != i["name"] and marker_applies(req):
                rev[dep].add(i["name"])
    return rev


def left_behind_versions(items: list[dict], with_groups: tuple[str, ...] = ()) -> dict[str, str]:
    """{name: version} of the resolved packages in the groups left behind (for the second, placeholder resolve)."""
    names = {n for g, (members, _) in SKIP_GROUPS.items() if g not in with_groups for n in members}
    return {i["name"]: i["version"] for i in items if i["name"] in names and not i["from_device"]}


def select(items: list[dict], device: dict[str, str | None], dropped_constraints: dict[str, str],
           with_groups: tuple[str, ...] = (), root: str = "vllm") -> Selection:
    unknown = [g for g in with_groups if g not in SKIP_GROUPS]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; known: {', '.join(SKIP_GROUPS)}")
    skip_reason = {n: f"{g}: {why}" for g, (names, why) in SKIP_GROUPS.items() if g not in with_groups for n in names}
    sel = Selection()
    gone: dict[str, str] = {}  # name -> why it does not travel
    candidates = []
    for i in items:
        n = i["name"]
        if i.get("left_behind"):  # a placeholder of the second resolve: never in the tree as a wheel
            sel.skipped.append((i, skip_reason.get(n, "left behind")))
            gone[n] = "skipped"
        elif i["from_device"]:
            sel.device.append(i)
        elif n in dropped_constraints and n in KEEP_DEVICE:
            sel.kept_device.append((i, f"image has {dropped_constraints[n]}; {KEEP_DEVICE[n]}"))
            gone[n] = "kept"
        elif n in device and n not in dropped_constraints:
            sel.device_unverified.append(i)  # name on the image, version not known: taken as satisfying
            gone[n] = "device"
        elif n in skip_reason and n != root:
            sel.skipped.append((i, skip_reason[n]))
            gone[n] = "skipped"
        else:
            candidates.append(i)
    rev = reverse_edges(items)
    changed = True
    while changed:  # drop what only left-behind packages need, to a fixed point
        changed = False
        for i in list(candidates):
            n = i["name"]
            if n == root:
                continue
            users = rev.get(n, set())
            if users and all(u in gone for u in users):
                why = ", ".join(sorted(users))
                sel.pruned.append((i, f"only needed by {why}"))
                gone[n] = "pruned"
                candidates.remove(i)
                changed = True
    sel.carry = candidates
    return sel
