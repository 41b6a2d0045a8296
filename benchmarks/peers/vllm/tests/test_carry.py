"""The carry harness without a network or a GPU: device package lists, placeholder wheels, the carry-set choice,
wheel trimming, part packing, and the device receive/install scripts run against a local folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PEER = HERE.parent
REPO = PEER.parents[2]
sys.path.insert(0, str(PEER))

from carry_set import SKIP_GROUPS, left_behind_versions, marker_applies, requirement_name, select  # noqa: E402
from fetch import plan_parts, trim_wheel, write_parts  # noqa: E402
from resolve import (canon, conflicting_constraints, parse_device_packages, placeholder_version,  # noqa: E402
                     write_placeholder_wheel)


def test_parse_device_packages_reads_freeze_names_and_direct_urls():
    got = parse_device_packages("# comment\nTorch==2.11.0+cu130\nhuggingface_hub==1.33.0\nnumpy\n"
                                "mylib @ file:///x/mylib-1.0.whl\n\n")
    assert got == {"torch": "2.11.0+cu130", "huggingface-hub": "1.33.0", "numpy": None, "mylib": None}


def test_parse_device_packages_rejects_garbage_and_empty():
    with pytest.raises(ValueError, match="cannot read"):
        parse_device_packages("torch >= 2\n")
    with pytest.raises(ValueError, match="empty"):
        parse_device_packages("# nothing\n")


def test_placeholder_wheel_is_a_dependency_free_wheel_of_the_device_version(tmp_path):
    whl = write_placeholder_wheel(tmp_path, "huggingface-hub", "1.33.0")
    assert whl.name == "huggingface_hub-1.33.0+device-py3-none-any.whl"
    with zipfile.ZipFile(whl) as z:
        meta = z.read("huggingface_hub-1.33.0+device.dist-info/METADATA").decode()
        record = z.read("huggingface_hub-1.33.0+device.dist-info/RECORD").decode()
    assert "Name: huggingface-hub\nVersion: 1.33.0+device\n" in meta
    assert "Requires-Dist" not in meta
    assert "METADATA,sha256=" in record
    assert placeholder_version("2.11.0+cu130") == "2.11.0+device"  # a local label is replaced, not stacked


def test_conflicting_constraints_are_read_from_pips_message():
    msg = ("The conflict is caused by:\n    numba 0.65.0 depends on numpy<2.5 and >=1.22\n"
           "    The user requested (constraint) numpy==2.5.2+device\n"
           "    The user requested (constraint) Numba==0.66.0+device\n")
    assert conflicting_constraints(msg) == ["numba", "numpy"]
    assert conflicting_constraints("ERROR: No matching distribution found for foo") == []


def test_markers_are_evaluated_for_the_device():
    assert marker_applies("six>=1.16.0; python_version > \"3.11\"")
    assert not marker_applies("pywin32>=311; sys_platform == 'win32'")
    assert marker_applies("nvidia-cuda-nvcc; extra == \"cu13\"")  # extras count loosely
    assert marker_applies("regex")
    assert requirement_name("Foo_Bar[x]>=1; extra == 'y'") == "foo-bar"


def _item(name, version="1.0", deps=(), from_device=False):
    return {"name": canon(name), "version": version, "from_device": from_device, "url": None,
            "filename": None if from_device else f"{name}-{version}-py3-none-any.whl", "hashes": {},
            "requires_dist": list(deps), "requested": name == "vllm"}


def test_select_keeps_the_image_skips_heavy_groups_and_prunes_what_only_they_need():
    items = [
        _item("vllm", "0.26.0", ["torch==2.11.0", "pydantic>=2", "flashinfer-python==0.6.14", "numba==0.65.0",
                                 "tilelang==0.1.9", "regex"]),
        _item("torch", "2.11.0", from_device=True),
        _item("pydantic", "2.14", ["pydantic-core==2.50", "typing-extensions"]),
        _item("pydantic-core", "2.50"),
        _item("typing-extensions", "4.16"),  # the image has it, version unknown
        _item("flashinfer-python", "0.6.14", ["apache-tvm-ffi", "pydantic"]),
        _item("tilelang", "0.1.9", ["apache-tvm-ffi", "z3-solver"]),
        _item("apache-tvm-ffi", "0.1.10"),  # needed only by the two skipped ones
        _item("z3-solver", "4.15"),
        _item("numba", "0.65.0", ["numpy<2.5"]),
        _item("numpy", "2.3.5"),
        _item("regex", "2026.1"),
    ]
    device = {"torch": "2.11.0", "typing-extensions": None, "numpy": "2.5.2", "numba": "0.66.0", "regex": "2026.1"}
    sel = select(items, device, {"numpy": "2.5.2", "numba": "0.66.0"})
    carry = {i["name"] for i in sel.carry}
    assert carry == {"vllm", "pydantic", "pydantic-core"}
    assert {i["name"] for i in sel.device} == {"torch"}
    assert {i["name"] for i in sel.device_unverified} == {"typing-extensions", "regex"}
    assert {i["name"] for i, _ in sel.kept_device} == {"numpy", "numba"}
    assert {i["name"] for i, _ in sel.skipped} == {"flashinfer-python", "tilelang", "z3-solver"}
    assert [(i["name"], why) for i, why in sel.pruned] == [("apache-tvm-ffi", "only needed by flashinfer-python, tilelang")]
    # pydantic is also needed by the skipped flashinfer, but vllm needs it too: it travels
    again = select(items, device, {"numpy": "2.5.2", "numba": "0.66.0"}, with_groups=("flashinfer",))
    assert {"flashinfer-python", "apache-tvm-ffi"} <= {i["name"] for i in again.carry}
    with pytest.raises(ValueError, match="unknown group"):
        select(items, device, {}, with_groups=("nope",))
    assert "cutedsl" in SKIP_GROUPS


def test_second_resolve_placeholders_mark_left_behind_packages():
    first = [_item("vllm", "0.26.0", ["flashinfer-python==0.6.14"]), _item("flashinfer-python", "0.6.14"),
             _item("nvidia-cutlass-dsl", "4.6.0"), _item("torch", "2.11.0", from_device=True)]
    assert left_behind_versions(first) == {"flashinfer-python": "0.6.14", "nvidia-cutlass-dsl": "4.6.0"}
    assert left_behind_versions(first, ("flashinfer",)) == {"nvidia-cutlass-dsl": "4.6.0"}
    second = [_item("vllm", "0.26.0", ["flashinfer-python==0.6.14"]),
              {**_item("flashinfer-python", "0.6.14"), "left_behind": True, "filename": None}]
    sel = select(second, {}, {})
    assert [i["name"] for i in sel.carry] == ["vllm"]
    assert [i["name"] for i, _ in sel.skipped] == ["flashinfer-python"]


def test_trim_wheel_drops_members_and_their_record_lines(tmp_path):
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("pkg/big.so", b"\0" * 10000)
        z.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\nVersion: 1.0\n")
        z.writestr("pkg-1.0.dist-info/RECORD", "pkg/__init__.py,sha256=a,6\npkg/big.so,sha256=b,10000\n"
                                                "pkg-1.0.dist-info/RECORD,,\n")
    dest = tmp_path / "out" / src.name
    dest.parent.mkdir()
    gone = trim_wheel(src, dest, {"pkg/big.so": "why", "pkg/absent.so": "why"})
    assert gone == ["pkg/big.so"]
    with zipfile.ZipFile(dest) as z:
        names = z.namelist()
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert "pkg/big.so" not in names and "pkg/__init__.py" in names
    assert "big.so" not in record and "pkg/__init__.py,sha256=a,6" in record


def test_plan_parts_respects_the_limit_and_covers_every_byte_once():
    sizes = {"huge.whl": 250, "a.whl": 40, "b.whl": 30, "c.whl": 29, "d.whl": 1}
    parts = plan_parts(sizes, 100)
    assert all(sum(c[2] for c in p) <= 100 for p in parts)
    covered: dict[str, list[tuple[int, int]]] = {}
    for p in parts:
        for name, off, length in p:
            covered.setdefault(name, []).append((off, length))
    for name, size in sizes.items():
        spans = sorted(covered[name])
        assert spans[0][0] == 0 and sum(length for _, length in spans) == size
        assert all(o1 + l1 == o2 for (o1, l1), (o2, _) in zip(spans, spans[1:]))
    assert len(parts) == 4  # 350 bytes need at least 4 parts of 100
    with pytest.raises(ValueError):
        plan_parts(sizes, 0)


def _tiny_wheel(folder: Path, name: str, payload: bytes) -> Path:
    dist = name.replace("-", "_")
    whl = folder / f"{dist}-1.0-py3-none-any.whl"
    info = f"{dist}-1.0.dist-info"
    with zipfile.ZipFile(whl, "w") as z:  # stored, so the payload keeps the wheel big enough to be cut
        z.writestr(f"{dist}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{dist}/blob.bin", payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return whl


def _sh(script: str, *args, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PEER / script), *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.timeout(120)
def test_parts_travel_join_verify_and_install(tmp_path):
    src = tmp_path / "wheels"
    src.mkdir()
    big = _tiny_wheel(src, "big-pkg", os.urandom(300_000))
    small = _tiny_wheel(src, "small-pkg", b"x" * 1000)
    work = tmp_path / "repo"  # the scripts read .vllm_whl/pK relative to the repo root they run in
    (work / "benchmarks" / "peers" / "vllm").mkdir(parents=True)
    dirs = write_parts({"big-pkg": big, "small-pkg": small}, work / ".vllm_whl", 128 * 1024)
    payload = [[f for f in d.iterdir() if f.name.endswith(".whl") or ".piece" in f.name] for d in dirs]
    assert len(dirs) == 3 and all(sum(f.stat().st_size for f in fs) <= 128 * 1024 for fs in payload)
    assert any(f.name.endswith(".piece00") for d in dirs for f in d.iterdir())
    env = {**os.environ, "VLLM_PARTS": str(tmp_path / "parts"), "VLLM_SITE": str(tmp_path / "site"),
           "VLLM_SKIP_AUDIT": "1", "PIP_CONFIG_FILE": os.devnull}

    r = _sh("device_install.sh", env=env, cwd=work)
    assert r.returncode == 2 and "nothing received" in r.stderr
    r = _sh("device_receive.sh", "p1", env=env, cwd=work)
    assert r.returncode == 0 and "missing: p2 p3" in r.stdout, r.stdout + r.stderr
    r = _sh("device_install.sh", env=env, cwd=work)
    assert r.returncode == 2 and "missing parts p2 p3" in r.stderr
    assert _sh("device_receive.sh", "p9", env=env, cwd=work).returncode == 2
    for p in ("p2", "p3"):
        assert _sh("device_receive.sh", p, env=env, cwd=work).returncode == 0

    # a damaged piece is caught by the checksum, before anything is installed
    piece = next((tmp_path / "parts").glob("*.piece01"))
    good = piece.read_bytes()
    piece.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    r = _sh("device_install.sh", env=env, cwd=work)
    assert r.returncode == 3 and not (tmp_path / "site").exists()
    piece.write_bytes(good)

    r = _sh("device_install.sh", env=env, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    joined = tmp_path / "parts" / big.name
    assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    out = subprocess.run([sys.executable, "-c", "import big_pkg, small_pkg; print(big_pkg.VALUE + small_pkg.VALUE)"],
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert out.stdout.strip() == "84", out.stderr


def test_repo_ignores_the_wheel_folder():
    r = subprocess.run(["git", "check-ignore", "-q", ".vllm_whl/p1/x.whl"], cwd=REPO)
    assert r.returncode == 0, ".vllm_whl/ must stay out of git"
