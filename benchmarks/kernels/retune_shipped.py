"""Re-time the shipped fused_moe choices that today's candidates have outgrown, so that a fresh machine does not
time them at start-up.

An entry of moeserve/kernels/tuned/<gpu>.json is stale when a candidate was added after it was timed
(autotune._covers): every engine start on a fresh card then times that shape again (session 23: 10 of 51 choices
of a 108.5 s start-up on an H200). On a GPU this script finds its card's stale fused_moe entries, runs each shape
once on random inputs (uniform routing, as bench_kernels) into an empty cache, which times it over today's
candidates, and writes the new entries to OUT/retuned-<gpu>.json. --merge puts such a file into the shipped one
(no GPU needed); --list prints a card's stale keys.

    python3 benchmarks/kernels/retune_shipped.py --out $OUT
    python3 benchmarks/kernels/retune_shipped.py --merge retuned-NVIDIA_H200.json
    python3 benchmarks/kernels/retune_shipped.py --list NVIDIA_H100_80GB_HBM3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moeserve.kernels import fused_moe as fm  # noqa: E402
from moeserve.kernels.autotune import _covers, shipped_path  # noqa: E402

DTYPES = ("bfloat16", "float16", "float32")


def parse(key: str) -> dict:
    """A fused_moe tuning key (fused_moe.fused_moe builds it) as the shape it names."""
    parts = key.split("|")
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    p = {name: int(fields[name]) for name in ("T", "E", "K", "H", "I")}
    p["dtype"] = next(d for d in parts if d in DTYPES)
    p["of"] = int(fields.get("of", p["E"]))
    p["fp8"] = tuple(int(v) for v in fields["fp8"].split("x")) if "fp8" in fields else None
    p["int4"] = (int(fields["int4"].rstrip("z")), fields["int4"].endswith("z")) if "int4" in fields else None
    return p


def blocks(p: dict) -> dict | None:
    """The scale blocks of the weights the key names: fp8 (bn, bk) for both (a per-row block spans each's own K),
    int4 (1, group)."""
    if p["fp8"]:
        bn, bk = p["fp8"]
        return {"w13": (bn, bk), "w2": (bn, bk) if bk < p["H"] else (bn, p["I"])}
    if p["int4"]:
        return {"w13": (1, p["int4"][0]), "w2": (1, p["int4"][0])}
    return None


def candidates(p: dict) -> list[dict]:
    """Today's candidates for the key, as fused_moe.fused_moe asks the tuner."""
    return fm.tuning_candidates(p["T"], p["K"], p["of"], 4 if p["dtype"] == "float32" else 2, blocks(p), p["H"],
                                p["I"], 8 if p["int4"] else 1)


def stale(entries: dict, min_hidden: int = 0) -> list[str]:
    """The stale fused_moe keys, of hidden size >= min_hidden (the CUDA tests' tiny shapes are below 256)."""
    return [k for k, v in entries.items() if k.startswith("fused_moe|") and parse(k)["H"] >= min_hidden
            and not _covers(v, candidates(parse(k)))]


def run_shape(p: dict, dev: str = "cuda") -> None:
    """fused_moe once over the key's shape: random weights and tokens, uniform routing over the id space; ids past
    the local experts (expert parallelism, `of`) belong to other ranks."""
    import torch

    dtype = getattr(torch, p["dtype"])
    T, E, K, H, inter = p["T"], p["E"], p["K"], p["H"], p["I"]
    x = torch.randn(T, H, device=dev).to(dtype)
    weights, ids = torch.randn(T, p["of"], device=dev).softmax(-1).topk(K)
    w13 = torch.randn(E, 2 * inter, H, device=dev) / H ** 0.5
    w2 = torch.randn(E, H, inter, device=dev) / inter ** 0.5
    kw: dict = {}
    if p["of"] != E:
        kw["expert_map"] = torch.where(torch.arange(p["of"], device=dev) < E, torch.arange(p["of"], device=dev),
                                       -1).int()
    b = blocks(p)
    if p["fp8"]:
        from moeserve.layers.quant.fp8 import quantize_blocks

        def q(w, block):  # per expert, then stacked: (e4m3 [E, N, K], fp32 scales [E, N blocks, K blocks])
            return (torch.stack(t) for t in zip(*[quantize_blocks(w[e], block) for e in range(E)]))

        (g, gs), (u, us), (w2, s2) = q(w13[:, :inter], b["w13"]), q(w13[:, inter:], b["w13"]), q(w2, b["w2"])
        w13 = torch.cat([g, u], 1)  # gate and up blocks apart, as fused_moe wants their scales
        kw.update(w13_scale=torch.cat([gs, us], 1), w2_scale=s2, blocks=b)
    elif p["int4"]:
        from moeserve.layers.quant.int4 import pack_int32

        group, zeros = p["int4"]

        def w4(*shape):
            q = torch.randint(0, 16, shape, device=dev)
            scales = (torch.rand(*shape[:-1], shape[-1] // group, device=dev) * 2e-3 + 1e-4).to(dtype)
            z = torch.randint(1, 16, scales.shape, device=dev).to(torch.uint8) if zeros else None
            return pack_int32(q, -1), scales, z

        (w13, s13, z13), (w2, s2, z2) = w4(E, 2 * inter, H), w4(E, H, inter)
        kw.update(w13_scale=s13, w2_scale=s2, blocks=b, w13_zeros=z13, w2_zeros=z2)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    fm.fused_moe(x, w13, w2, weights, ids.int(), **kw)
    if dev == "cuda":
        torch.cuda.synchronize()


def retune(out: Path, min_hidden: int) -> int:
    os.environ["MOESERVE_CACHE_DIR"] = tempfile.mkdtemp()  # an empty cache: stale shipped entries are timed
    from moeserve.kernels import autotune, runtime

    tuner = autotune.reset_tuner()
    shipped = json.loads(shipped_path().read_text())["entries"]
    keys = stale(shipped, min_hidden)
    print(f"{runtime.gpu_name()}: {len(keys)} of {sum(k.startswith('fused_moe|') for k in shipped)} fused_moe "
          f"entries stale (hidden size >= {min_hidden})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"retuned-{runtime.gpu_slug()}.json"
    done, failed = {}, []
    for key in keys:
        try:
            run_shape(parse(key))
            done[key] = tuner.stored(key)
            path.write_text(json.dumps({"gpu": runtime.gpu_name(), "entries": done}, indent=1))  # kept if cut short
        except Exception as exc:  # one shape's failure must not lose the others
            failed.append(key)
            print(f"FAILED {key}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    print(f"{len(done)} re-tuned, {len(failed)} failed -> {path}")
    return 1 if failed else 0


def merge(path: Path) -> int:
    new = json.loads(path.read_text())
    target = shipped_path(path.stem.removeprefix("retuned-"))
    shipped = json.loads(target.read_text())
    if shipped["gpu"] != new["gpu"]:
        raise SystemExit(f"{path} is for {new['gpu']}, {target} for {shipped['gpu']}")
    shipped["entries"].update(new["entries"])
    shipped["entries"] = dict(sorted(shipped["entries"].items()))
    target.write_text(json.dumps(shipped, indent=1))  # as autotune writes its cache
    print(f"{len(new['entries'])} entries merged into {target}; {len(stale(shipped['entries']))} stale left")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--merge", type=Path, help="a retuned-<gpu>.json to put into the shipped file")
    ap.add_argument("--list", metavar="GPU_SLUG", help="print that card's stale fused_moe keys")
    ap.add_argument("--min-hidden", type=int, default=256,
                    help="skip smaller shapes: the CUDA tests' tiny ones (a third of session 24's call went on them)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge)
    if args.list:
        keys = stale(json.loads(shipped_path(args.list).read_text())["entries"], args.min_hidden)
        print("\n".join(keys) or "none stale")
        return 0
    return retune(args.out, args.min_hidden)


if __name__ == "__main__":
    raise SystemExit(main())
