"""Import every vLLM module the offline benchmark path loads, and say what is missing and where each came from.

    PYTHONPATH=/tmp/vllm_site python3 benchmarks/peers/vllm/import_audit.py [--json out.json] [--site DIR]

Used twice: here, on a CPU machine, to learn which of vLLM's dependencies the offline `LLM` path for the
benchmark shapes imports at all (the rest need not travel); and on the device right after the install, as the
smoke test, where a missing module is reported by name before any GPU time is spent on a start-up.
Exit status 1 when a module of the path fails to import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import json
import os
import sys
import traceback
from pathlib import Path

# The modules an offline LLM(..., load_format="dummy") run of Qwen3-MoE / DeepSeek-V2 goes through on a Hopper GPU:
# front end, engine core, executor, worker and model runner, the two model files, the dummy loader, the attention
# backends a Hopper picks (FA3, and for MLA: FlashMLA / FA-MLA / Triton-MLA), fused MoE, sampler, compilation.
PATH_MODULES = (
    "vllm",
    "vllm.entrypoints.llm",
    "vllm.sampling_params",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.executor.abstract",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.platforms.cuda",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.sample.sampler",
    "vllm.v1.structured_output",
    "vllm.model_executor.model_loader.dummy_loader",
    "vllm.model_executor.models.qwen3_moe",
    "vllm.model_executor.models.deepseek_v2",
    "vllm.model_executor.layers.fused_moe.fused_moe",
    "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.attention.backends.mla.flashmla",
    "vllm.v1.attention.backends.mla.flashattn_mla",
    "vllm.v1.attention.backends.mla.triton_mla",
    "vllm.compilation.backends",
    "vllm.model_executor.warmup.kernel_warmup",
)


# `vllm serve` (benchmarks/serve_pair.py) and the fp8/int4 checkpoints of the flagship runs: reported, never a
# reason to fail the install (the offline path above is what the suite needs).
EXTRA_MODULES = (
    "vllm.entrypoints.cli.main",
    "vllm.entrypoints.openai.api_server",
    "vllm.model_executor.layers.quantization.fp8",
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors",
)


class MissRecorder(importlib.abc.MetaPathFinder):
    """Sits last on sys.meta_path: every module no other finder found passes through here."""

    def __init__(self) -> None:
        self.missed: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002 - the finder protocol
        self.missed.add(fullname.split(".", 1)[0])
        return None


def distribution_of_files(site: Path) -> dict[str, str]:
    """{top-level module name: distribution} for the distributions installed in `site` (from their RECORD)."""
    owners: dict[str, str] = {}
    for info in site.glob("*.dist-info"):
        dist = info.name.removesuffix(".dist-info").split("-", 1)[0]
        record = info / "RECORD"
        if not record.exists():
            continue
        for line in record.read_text().splitlines():
            first = line.split(",", 1)[0].split("/", 1)[0]
            if first.endswith((".dist-info", ".data")) or first in ("..", "") or first.startswith("__"):
                continue
            owners.setdefault(first.removesuffix(".py").split(".", 1)[0], dist)
    return owners


def loaded_top_levels() -> dict[str, str]:
    """{top-level module: the folder it was loaded from} for every imported module with a file."""
    out: dict[str, str] = {}
    for name, mod in list(sys.modules.items()):
        top = name.split(".", 1)[0]
        if top in out:
            continue
        f = getattr(mod, "__file__", None)
        if f:
            p = Path(f).resolve()
            out[top] = str(p.parent.parent if p.name == "__init__.py" else p.parent)
    return out


def audit(modules=PATH_MODULES, site: str | None = None) -> dict:
    rec = MissRecorder()
    sys.meta_path.append(rec)
    failed: dict[str, str] = {}
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - every failure is recorded by module
            failed[m] = f"{type(e).__name__}: {e}"
            if os.environ.get("AUDIT_TRACEBACK"):
                traceback.print_exc()
    sys.meta_path.remove(rec)
    loaded = loaded_top_levels()
    res = {"python": sys.version.split()[0], "failed": failed, "looked_for_but_absent": sorted(rec.missed - set(loaded))}
    if site:
        site_p = Path(site).resolve()
        owners = distribution_of_files(site_p)
        from_site = sorted({owners.get(t, t) for t, where in loaded.items() if where.startswith(str(site_p))})
        res["site"] = str(site_p)
        res["site_distributions_imported"] = from_site
        res["site_distributions_not_imported"] = sorted(set(owners.values()) - set(from_site))
        res["outside_site_imported"] = sorted(t for t, where in loaded.items()
                                              if not where.startswith(str(site_p)) and "python3." not in where
                                              and not t.startswith("_"))
    try:
        import vllm

        res["vllm_version"] = getattr(vllm, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", default=os.environ.get("VLLM_SITE"), help="the --target folder vLLM was installed into")
    ap.add_argument("--json", help="also write the findings here")
    a = ap.parse_args(argv)
    if a.site and a.site not in sys.path:
        sys.path.insert(0, a.site)
    res = audit(site=a.site)
    res["extra_failed"] = {}
    for m in EXTRA_MODULES:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - reported only
            res["extra_failed"][m] = f"{type(e).__name__}: {e}"
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if res["failed"]:
        print(f"import audit: {len(res['failed'])} module(s) of the vLLM path failed to import:", file=sys.stderr)
        for m, err in res["failed"].items():
            print(f"  {m}: {err}", file=sys.stderr)
        return 1
    print(f"import audit: all {len(PATH_MODULES)} modules of the vLLM path imported (vllm {res.get('vllm_version')})")
    for m, err in res["extra_failed"].items():
        print(f"import audit (not needed offline): {m}: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
