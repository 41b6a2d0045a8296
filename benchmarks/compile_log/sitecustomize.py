"""Put this folder first on PYTHONPATH (with MOESERVE_LOG_COMPILES=1) and every Python process started with it,
spawned ranks included, prints one line per Triton kernel it compiles after import: when (time.time()), which
process, which kernel, how long, and the specialisation. Finds the shapes a warm-up missed: a compile inside a
served step stalls that step (and, under DP, every rank's step) for the compile's length."""

import os
import sys
import time

if os.environ.get("MOESERVE_LOG_COMPILES") == "1":
    try:
        from triton import knobs
    except Exception:  # no Triton: nothing to log
        knobs = None
    if knobs is not None:
        _started: dict = {}

        def _before(**kw):
            _started[kw.get("key")] = time.perf_counter()
            return None  # never skip the compile

        def _after(**kw):
            t0 = _started.pop(kw.get("key"), None)
            fn = kw.get("fn")
            name = getattr(fn, "name", None) or repr(fn)
            spent = f"{1e3 * (time.perf_counter() - t0):.0f} ms" if t0 is not None else "?"
            print(f"[compile] t={time.time():.3f} pid={os.getpid()} {name} {spent} {kw.get('repr', '')}",
                  file=sys.stderr, flush=True)
            return None

        knobs.runtime.jit_cache_hook = _before
        knobs.runtime.jit_post_compile_hook = _after

# This file shadows any sitecustomize further along the path (an image may have one): run that one too.
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
