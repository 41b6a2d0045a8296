"""Gather, on this machine, the wheels vLLM 0.26.0 needs on the device beyond its image, and pack them for carrying.

    python benchmarks/peers/vllm/fetch.py [--vllm-wheel PATH] [--device-packages FILE] [--with GROUP ...]

Steps (each writes under .vllm_whl/, which git ignores; nothing of vLLM is committed):
  1. resolve vllm==0.26.0 for the device (cp312, manylinux x86_64) with the image's packages as placeholders
     (resolve.py), then choose what travels (carry_set.py): the image's packages stay, heavy packages the
     offline Hopper path never imports stay behind, and so does whatever only they need;
  2. download exactly those wheels (pip download --no-deps, hashes checked against the resolution);
  3. trim vLLM's wheel of what the benchmark cannot reach on an H100 (FA2 kernels, the Rust HTTP front end),
     unless --full-vllm;
  4. pack into parts .vllm_whl/p1, p2, ... of at most --part-mib each (a wheel larger than that is cut into
     pieces, joined on the device and checked against SHA256SUMS), and print the device calls to make.

The device's package list is benchmarks/peers/vllm/device_packages.txt: `pip list --format=freeze` of the
image (bare names where the version is unknown). Needs network access to the package registry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))

from carry_set import SKIP_GROUPS, left_behind_versions, select  # noqa: E402
from resolve import canon, parse_device_packages, platform_args, resolve  # noqa: E402

VLLM_VERSION = "0.26.0"
OUT = REPO / ".vllm_whl"
MiB = 1 << 20
# Inside vLLM's wheel, what the offline benchmark on a Hopper GPU never loads (see the README).
TRIM_FROM_VLLM = {
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": "FlashAttention-2 kernels: on SM90 vLLM picks FA3 (FA2 only for ALiBi)",
    "vllm/vllm-rs": "the Rust HTTP front end (VLLM_RUST_FRONTEND_PATH), not used offline",
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def download(items: list[dict], dest: Path, pip_python: str, have: dict[str, Path]) -> dict[str, Path]:
    """Fetch each item's wheel (pip download --no-deps of the exact version) unless `have` holds it; check sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    need = []
    for i in items:
        local = have.get(i["name"])
        if local is None and i["filename"] and (dest / i["filename"]).exists():
            local = dest / i["filename"]
        if local is not None:
            files[i["name"]] = local
        else:
            need.append(i)
    if need:
        reqs = [f"{i['name']}=={i['version']}" for i in need]
        print(f"downloading {len(reqs)} wheels")
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""}
        subprocess.run([pip_python, "-m", "pip", "download", "-q", "--no-deps", *platform_args(), "-d", str(dest),
                        *reqs], check=True, env=env)
        for i in need:
            files[i["name"]] = dest / i["filename"]
    for i in items:
        f = files[i["name"]]
        if not f.exists():
            raise FileNotFoundError(f"{i['name']}: expected {f} after the download")
        want = i["hashes"].get("sha256")
        if want and sha256_of(f) != want:
            raise ValueError(f"{f.name}: sha256 differs from the resolution's ({want})")
    return files


def trim_wheel(src: Path, dest: Path, members: dict[str, str]) -> list[str]:
    """Copy the wheel without `members` (and their RECORD lines). Returns the members actually removed."""
    with zipfile.ZipFile(src) as z:
        names = set(z.namelist())
    gone = [m for m in members if m in names]
    if not gone:
        shutil.copyfile(src, dest)
        return []
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    with zipfile.ZipFile(src) as z:
        lines = [ln for ln in z.read(record).decode().splitlines() if ln.split(",", 1)[0] not in gone]
    if shutil.which("zip"):  # deletes in place, no recompression of the rest
        subprocess.run(["zip", "-q", "-d", str(tmp), *gone, record], check=True)
        with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(record, "\n".join(lines) + "\n")
    else:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in gone or info.filename == record:
                    continue
                zout.writestr(info, zin.read(info.filename))
            zout.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, dest)
    return gone


def relzma_wheel(src: Path, dest: Path, min_member: int = 4096) -> None:
    """The same wheel with its members re-compressed by LZMA (zip method 14), which pip installs like any wheel.

    Shared libraries shrink by about a third against deflate, which saves a whole device call. Members under
    `min_member` bytes stay deflated. The file name stays the wheel's (pip insists on it).
    """
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.external_attr, zi.create_system = info.external_attr, info.create_system
            zi.compress_type = zipfile.ZIP_LZMA if len(data) >= min_member else zipfile.ZIP_DEFLATED
            zout.writestr(zi, data)
    os.replace(tmp, dest)


def relzma_cached(files: dict[str, Path], cache: Path, min_bytes: int) -> dict[str, Path]:
    """relzma_wheel for every wheel of at least min_bytes, reusing earlier results of the same source (by sha256)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = dict(files)
    for name, src in files.items():
        if src.stat().st_size < min_bytes:
            continue
        dest = cache / src.name
        stamp = cache / (src.name + ".src-sha256")
        digest = sha256_of(src)
        if not (dest.exists() and stamp.exists() and stamp.read_text().strip() == digest):
            print(f"re-compressing {src.name} ({src.stat().st_size / MiB:.1f} MiB) with LZMA")
            relzma_wheel(src, dest)
            stamp.write_text(digest + "\n")
        if dest.stat().st_size < src.stat().st_size:
            out[name] = dest
    return out


def plan_parts(sizes: dict[str, int], part_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Pack files into parts of at most part_bytes: [(file name, offset, length)] per part.

    A file larger than a part is cut into part-sized pieces (the last one shorter); then first-fit decreasing.
    """
    if part_bytes <= 0:
        raise ValueError("part size must be positive")
    chunks = []
    for name, size in sizes.items():
        if size <= part_bytes:
            chunks.append((name, 0, size))
        else:
            for off in range(0, size, part_bytes):
                chunks.append((name, off, min(part_bytes, size - off)))
    chunks.sort(key=lambda c: (-c[2], c[0], c[1]))
    parts: list[list[tuple[str, int, int]]] = []
    free: list[int] = []
    for c in chunks:
        for k, room in enumerate(free):
            if c[2] <= room:
                parts[k].append(c)
                free[k] -= c[2]
                break
        else:
            parts.append([c])
            free.append(part_bytes - c[2])
    return parts


def write_parts(files: dict[str, Path], out: Path, part_bytes: int) -> list[Path]:
    """Lay the parts out as folders p1..pN, each with SHA256SUMS (every whole wheel) and its MANIFEST."""
    for old in out.glob("p[0-9]*"):
        shutil.rmtree(old)
    by_name = {f.name: f for f in files.values()}
    sums = "".join(f"{sha256_of(f)}  {f.name}\n" for f in sorted(by_name.values()))
    parts = plan_parts({n: f.stat().st_size for n, f in by_name.items()}, part_bytes)
    n_parts = len(parts)
    dirs = []
    for k, chunks in enumerate(parts, start=1):
        d = out / f"p{k}"
        d.mkdir(parents=True)
        names = []
        for name, off, length in sorted(chunks):
            src = by_name[name]
            if length == src.stat().st_size:
                os.link(src, d / name) if _same_fs(src, d) else shutil.copyfile(src, d / name)
                names.append(name)
            else:
                piece = f"{name}.piece{off // part_bytes:02d}"
                with open(src, "rb") as fi, open(d / piece, "wb") as fo:
                    fi.seek(off)
                    fo.write(fi.read(length))
                names.append(piece)
        (d / "SHA256SUMS").write_text(sums)
        (d / "PARTS_TOTAL").write_text(f"{n_parts}\n")
        (d / f"MANIFEST_p{k}").write_text("".join(f"{x}\n" for x in names))
        dirs.append(d)
    return dirs


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def repo_travel_bytes() -> int:
    """What the run tool sends besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         check=True).stdout.split(b"\0")
    return sum((REPO / p.decode()).stat().st_size for p in out if p and (REPO / p.decode()).is_file())


def device_plan(dirs: list[Path], shape_cmds: list[str]) -> str:
    n = len(dirs)
    lines = [f"# {n} device calls, back to back (the machine stays warm only ~30 s after each call).",
             "# Files outside the repo survive between calls on a warm machine: parts collect in /root/vllm_parts.",
             "# Each receive prints the parts present so far; if one is missing the machine went cold: resend it."]
    for k, d in enumerate(dirs, start=1):
        rel = d.relative_to(REPO)
        if k < n:
            lines.append(f"call {k}: carry=[\"{rel}\"]  command: bash benchmarks/peers/vllm/device_receive.sh p{k}")
        else:
            body = (f"bash benchmarks/peers/vllm/device_receive.sh p{k} && bash benchmarks/peers/vllm/device_install.sh"
                    + "".join(f" && {c}" for c in shape_cmds))
            lines.append(f"call {k}: carry=[\"{rel}\"]  command: {body}")
    return "\n".join(lines) + "\n"


DEFAULT_RUN = ("PYTHONUNBUFFERED=1 python3 benchmarks/peers/vllm/run_vllm.py --shape qwen3-30b-a3b "
               "--out-dir $OUT --deadline-s 480")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-wheel", help="a local vllm-0.26.0 wheel (skips its 300 MB download)")
    ap.add_argument("--device-packages", default=str(HERE / "device_packages.txt"))
    ap.add_argument("--with", dest="with_groups", action="append", default=[], choices=sorted(SKIP_GROUPS),
                    help="also carry a group left behind by default")
    ap.add_argument("--full-vllm", action="store_true", help="carry vLLM's wheel untrimmed")
    ap.add_argument("--part-mib", type=float, default=42.0)  # + the ~20 MiB tree: under 64 a call
    ap.add_argument("--no-lzma", action="store_true", help="carry the wheels as deflated as they come")
    ap.add_argument("--pip-python", default=sys.executable, help="interpreter whose pip resolves and downloads")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--reuse-resolution", action="store_true", help="skip resolving: reuse OUT/resolution.json")
    a = ap.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = parse_device_packages(Path(a.device_packages).read_text())
    res_path = out / "resolution.json"
    requirement = a.vllm_wheel or f"vllm=={VLLM_VERSION}"
    if a.reuse_resolution and res_path.exists():
        res = json.loads(res_path.read_text())
        if res.get("with_groups", []) != sorted(a.with_groups):
            raise SystemExit("--reuse-resolution: the saved resolution was made with other --with groups")
    else:
        first = resolve(requirement, device, a.pip_python)
        behind = left_behind_versions(first.items, tuple(a.with_groups))
        print(f"resolving again with {len(behind)} left-behind packages as placeholders")
        r = resolve(requirement, device, a.pip_python, left_behind=behind)
        res = {"requirement": requirement, "items": r.items, "dropped_constraints": r.dropped_constraints,
               "left_behind_pins": behind, "with_groups": sorted(a.with_groups)}
    sel = select(res["items"], device, res["dropped_constraints"], tuple(a.with_groups))
    vllm_item = next((i for i in sel.carry if i["name"] == "vllm"), None)
    if vllm_item is None or vllm_item["version"] != VLLM_VERSION:
        raise SystemExit(f"the resolution does not carry vllm {VLLM_VERSION}: {vllm_item}")
    have = {}
    if a.vllm_wheel:
        have["vllm"] = Path(a.vllm_wheel)
        vllm_item["filename"] = Path(a.vllm_wheel).name
    files = download(sel.carry, out / "all", a.pip_python, have)

    trimmed: list[str] = []
    if not a.full_vllm:
        src = files["vllm"]
        dest_dir = out / "trimmed"
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / src.name
        stamp = dest_dir / (src.name + ".src")
        key = json.dumps({"sha256": sha256_of(src), "trim": sorted(TRIM_FROM_VLLM)})
        if dest.exists() and stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
            trimmed = json.loads(stamp.read_text())["removed"]  # the same trim as last time: reuse (and its LZMA)
        else:
            trimmed = trim_wheel(src, dest, TRIM_FROM_VLLM)
            stamp.write_text(json.dumps({"key": key, "removed": trimmed}))
        files["vllm"] = dest
    if not a.no_lzma:
        files = relzma_cached(files, out / "lzma", 1 * MiB)
    dirs = write_parts(files, out, int(a.part_mib * MiB))

    summary = {
        "vllm": VLLM_VERSION,
        "requirement": requirement,
        "device_packages_file": str(Path(a.device_packages)),
        "carry": [{"name": i["name"], "version": i["version"], "file": files[i["name"]].name,
                   "bytes": files[i["name"]].stat().st_size} for i in sel.carry],
        "carry_bytes": sum(f.stat().st_size for f in files.values()),
        "from_image": [f"{i['name']}=={i['version']}" for i in sel.device],
        "from_image_version_unverified": [i["name"] for i in sel.device_unverified],
        "kept_image_version": {i["name"]: f"vLLM's tree wants {i['version']}; {why}" for i, why in sel.kept_device},
        "left_behind": {i["name"]: why for i, why in sel.skipped},
        "pruned": {i["name"]: why for i, why in sel.pruned},
        "trimmed_from_vllm_wheel": {m: TRIM_FROM_VLLM[m] for m in trimmed},
        "parts": {d.name: folder_bytes(d) for d in dirs},
    }
    summary["lzma"] = not a.no_lzma
    res_path.write_text(json.dumps(res, indent=1))
    (out / "carry_summary.json").write_text(json.dumps(summary, indent=1))
    shutil.copyfile(out / "carry_summary.json", dirs[-1] / "carry_summary.json")  # travels: run_vllm records it
    (HERE / "carry-lock.txt").write_text(
        "# What fetch.py carries to the device (generated; vLLM itself is never committed).\n"
        + "".join(f"{c['name']}=={c['version']}\n" for c in sorted(summary["carry"], key=lambda c: c["name"])))

    repo_bytes = repo_travel_bytes()
    print(f"carry: {len(sel.carry)} wheels, {summary['carry_bytes'] / MiB:.1f} MiB"
          + (f" (vLLM trimmed of {', '.join(trimmed)})" if trimmed else ""))
    print(f"left behind: {', '.join(sorted(summary['left_behind']))}")
    if summary["pruned"]:
        print(f"pruned: {', '.join(sorted(summary['pruned']))}")
    for n, why in summary["kept_image_version"].items():
        print(f"image's version kept: {n}: {why}")
    if sel.device_unverified:
        print(f"on the image, version not checked (no freeze): {len(sel.device_unverified)} packages")
    worst = max(summary["parts"].values())
    for name, b in summary["parts"].items():
        print(f"  {name}: {b / MiB:.1f} MiB")
    print(f"repo travels {repo_bytes / MiB:.1f} MiB; largest call {(repo_bytes + worst) / MiB:.1f} MiB of 64")
    if repo_bytes + worst > 64 * MiB:
        print("!!! a call would exceed 64 MiB: lower --part-mib", file=sys.stderr)
        return 1
    plan = device_plan(dirs, [DEFAULT_RUN])
    (out / "plan.txt").write_text(plan)
    print(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
