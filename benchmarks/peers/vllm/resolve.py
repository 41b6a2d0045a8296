"""Which wheels vLLM needs on the device beyond what the device image already has.

The trick: every package the image holds becomes a *placeholder* wheel (its exact version with a local label
`+device`, no dependencies) on a --find-links folder, and the image's versions are passed as constraints. pip's
own resolver then resolves vllm for the device's platform (cp312, manylinux x86_64) and picks a placeholder
wherever the image's version satisfies the tree, so what it picks from the registry is exactly what is missing.
Where the image's version breaks a pin of the tree (say numba's numpy<2.5 against the image's numpy 2.5.2),
the resolver refuses; the conflicting constraint is dropped, recorded, and the resolve is retried.
Packages deliberately left behind (carry_set.SKIP_GROUPS) get placeholders too (label `+leftbehind`), so that
neither they nor their own pins (protobuf<7 from the CuTe DSL, say) shape the rest of the tree.

Pure Python plus pip (run by the tool interpreter given, which must be >= 3.12's pip to resolve for 3.12).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PLATFORMS = (
    "manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64",
)
DEVICE_PYTHON = "3.12"
LOCAL_LABEL = "device"
LEFT_BEHIND_LABEL = "leftbehind"


def canon(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", DEVICE_PYTHON, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def parse_device_packages(text: str) -> dict[str, str | None]:
    """`pip list --format=freeze` lines (or bare names, version unknown) -> {canonical name: version or None}."""
    out: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if " @ " in line:  # `name @ file://...` from a freeze of a direct install: name known, version not
            out[canon(line.split(" @ ", 1)[0])] = None
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+))?", line)
        if not m:
            raise ValueError(f"cannot read device package line {raw!r}")
        out[canon(m.group(1))] = m.group(2)
    if not out:
        raise ValueError("the device package list is empty")
    return out


def placeholder_version(version: str, label: str = LOCAL_LABEL) -> str:
    return f"{version.split('+', 1)[0]}+{label}"


def write_placeholder_wheel(folder: Path, name: str, version: str, label: str = LOCAL_LABEL) -> Path:
    """A dependency-free wheel that only says `name version+label` exists (never installed anywhere)."""
    dist = re.sub(r"[-_.]+", "_", name)
    ver = placeholder_version(version, label)
    info = f"{dist}-{ver}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: moeserve-placeholder\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    whl = folder / f"{dist}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return whl


_CONFLICT_RE = re.compile(r"The user requested \(constraint\) ([A-Za-z0-9._-]+)==")


def conflicting_constraints(pip_output: str) -> list[str]:
    """Names whose device pin pip blamed in a ResolutionImpossible message."""
    return sorted({canon(m.group(1)) for m in _CONFLICT_RE.finditer(pip_output)})


@dataclass
class Resolution:
    requirement: str
    items: list[dict]  # pip report entries: name, version, url, hashes, requires_dist, from_device
    dropped_constraints: dict[str, str] = field(default_factory=dict)  # name -> device version that conflicted
    attempts: int = 0

    def by_name(self) -> dict[str, dict]:
        return {i["name"]: i for i in self.items}


def run_pip_resolve(pip_python: str, requirement: str, constraints: dict[str, str], find_links: Path,
                    workdir: Path) -> tuple[int, str, dict | None]:
    cfile = workdir / "constraints.txt"
    cfile.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
    report = workdir / "report.json"
    report.unlink(missing_ok=True)
    cmd = [pip_python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report),
           "--target", str(workdir / "target"), *platform_args(), "--find-links", str(find_links),
           "-c", str(cfile), requirement]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": "",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    return proc.returncode, out, (json.loads(report.read_text()) if proc.returncode == 0 and report.exists() else None)


def resolve(requirement: str, device: dict[str, str | None], pip_python: str, max_attempts: int = 10,
            log=print, left_behind: dict[str, str] | None = None) -> Resolution:
    """Resolve `requirement` for the device; placeholders stand for the image's packages of known version and
    for the packages left behind (name -> the version the tree pins)."""
    left_behind = left_behind or {}
    with tempfile.TemporaryDirectory(prefix="vllm_resolve_") as tmp:
        tmp = Path(tmp)
        links = tmp / "placeholders"
        links.mkdir()
        pinned = {n: v for n, v in device.items() if v and n not in left_behind}
        for n, v in pinned.items():
            write_placeholder_wheel(links, n, v)
        constraints = {n: placeholder_version(v) for n, v in pinned.items()}
        for n, v in left_behind.items():
            write_placeholder_wheel(links, n, v, LEFT_BEHIND_LABEL)
            constraints[n] = placeholder_version(v, LEFT_BEHIND_LABEL)
        dropped: dict[str, str] = {}
        for attempt in range(1, max_attempts + 1):
            log(f"resolve attempt {attempt}: {len(constraints)} device pins as constraints")
            rc, out, report = run_pip_resolve(pip_python, requirement, constraints, links, tmp)
            if rc == 0 and report is not None:
                return Resolution(requirement, [_item(i) for i in report["install"]], dropped, attempt)
            blamed = [n for n in conflicting_constraints(out) if n in constraints and n not in left_behind]
            if not blamed:
                raise RuntimeError(f"pip could not resolve {requirement} for the device:\n{out[-4000:]}")
            for n in blamed:
                log(f"  the image's {n}=={pinned[n]} conflicts with the tree: resolving {n} from the registry")
                dropped[n] = pinned[n]
                constraints.pop(n)
        raise RuntimeError(f"no resolution after {max_attempts} attempts; dropped {sorted(dropped)}")


def _item(entry: dict) -> dict:
    md = entry["metadata"]
    url = entry["download_info"]["url"]
    version = md["version"]
    label = version.rsplit("+", 1)[1] if "+" in version else ""
    from_device, left = label == LOCAL_LABEL, label == LEFT_BEHIND_LABEL
    placeholder = from_device or left
    return {
        "name": canon(md["name"]),
        "version": version.rsplit("+", 1)[0] if placeholder else version,
        "from_device": from_device,
        "left_behind": left,
        "url": None if placeholder else url,
        "filename": None if placeholder else url.rsplit("/", 1)[-1],
        "hashes": (entry["download_info"].get("archive_info") or {}).get("hashes", {}),
        "requires_dist": md.get("requires_dist", []),
        "requested": entry.get("requested", False),
    }
