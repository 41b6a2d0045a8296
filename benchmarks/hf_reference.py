"""HF transformers on the pinned workloads, in its own process: the reference every figure is set against.

The model is built directly on the GPU in bf16 from the shape's config.json with weight init skipped, then every
parameter is filled with small uniform values (as a dummy loader does) so nothing overflows through the layers.
EOS is switched off (ignore_eos), so every request produces exactly its output length.

Throughput: `generate` over the first B of the workload's requests for each B in --hf-batch-sizes (one call
each; the best output tok/s is the reference), then transformers' continuous-batching API (`generate_batch`)
on --hf-cb-requests requests where this version has it. Latency: `generate` per batch size, times taken by a
stopping criterion that synchronises and stamps every step.
"""

from __future__ import annotations

import json
import time

from worker_common import (Partial, base_parser, latency_table, require_device, specs, summarize_latency_runs,
                           sync, workloads_of)
from workloads import latency_prompts, median, throughput_prompts


def load_config_dict(a) -> dict:
    if a.model:
        from pathlib import Path

        return json.loads((Path(a.model) / "config.json").read_text())
    from shapes import get_shape, load_config

    return load_config(get_shape(a.shape))


def build_model(cfg_dict: dict, device, dtype, p: Partial, init_scale: float, experts_impl: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in cfg_dict.items() if k not in ("model_type", "transformers_version")}
    cfg = AutoConfig.for_model(cfg_dict["model_type"], **d)
    cfg.eos_token_id = None  # ignore_eos
    kw = {"dtype": dtype}
    if experts_impl:
        kw["experts_implementation"] = experts_impl
    t = time.perf_counter()
    with torch.device(device), _no_init():
        model = AutoModelForCausalLM.from_config(cfg, **kw)
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(0)
        for prm in model.parameters():
            prm.uniform_(-init_scale, init_scale, generator=g)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    sync(device)
    p.phase("build_model", time.perf_counter() - t)
    p.data["model"] = {
        "class": type(model).__name__,
        "params": sum(x.numel() for x in model.parameters()),
        "dtype": str(dtype),
        "init": f"uniform(-{init_scale}, {init_scale})",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    p.save()
    return model


def _no_init():
    """transformers' switch that skips weight init (its home moved between versions); a no-op if absent."""
    import contextlib

    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


class StepClock:
    """A stopping criterion that never stops: it stamps the time (after a device sync) each time a token is out."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_generate(model, prompts, max_new_tokens: int, device) -> dict:
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=None, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    clock = StepClock(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc,
                             stopping_criteria=StoppingCriteriaList([clock]))
    sync(device)
    t1 = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    if new != max_new_tokens or len(clock.stamps) != max_new_tokens:
        raise RuntimeError(f"generate produced {new} tokens ({len(clock.stamps)} steps stamped), want {max_new_tokens}")
    s = clock.stamps
    gaps = [b - a for a, b in zip(s, s[1:])]
    return {
        "e2e_ms": 1e3 * (t1 - t0),
        "ttft_ms": 1e3 * (s[0] - t0),
        "tpot_ms": 1e3 * (s[-1] - s[0]) / (max_new_tokens - 1) if max_new_tokens > 1 else None,
        "decode_step_ms": 1e3 * median(gaps) if gaps else None,
    }


def _is_oom(e: Exception) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def run_latency_round(model, lat, vocab, device, p: Partial, per_batch: dict, repeat: int) -> bool:
    for b in lat.batch_sizes:
        last = per_batch.get(b, {}).get("runs", [])
        need = 1.3 * (last[-1]["e2e_ms"] / 1e3 if last else 0.0)
        if p.time_left() < need + 5:
            p.note(f"latency batch {b} repeat {repeat} skipped: {p.time_left():.0f} s left before the deadline")
            return False
        t = time.perf_counter()
        try:
            run = hf_generate(model, latency_prompts(lat, b, repeat, vocab), lat.output_len, device)
        except Exception as e:
            if not _is_oom(e):
                raise
            _free(device)
            p.note(f"latency batch {b}: out of memory ({str(e)[:160]})")
            per_batch.setdefault(b, {"repeats_done": 0, "runs": [], "error": "out of memory"})
            continue
        run["repeat"] = repeat
        per_batch[b] = summarize_latency_runs(last + [run])
        p.data["latency"] = {**latency_table({k: v for k, v in per_batch.items() if v.get("runs")}),
                             "spec": p.data["latency"]["spec"], "timing": p.data["latency"]["timing"],
                             "per_batch": {str(k): v for k, v in per_batch.items()}}
        p.phase(f"latency_b{b}_r{repeat}", time.perf_counter() - t)
    return True


def run_throughput_generate(model, tp, vocab, device, p: Partial, batch_sizes) -> None:
    prompts = throughput_prompts(tp, vocab)
    runs = p.data["throughput"].setdefault("generate_runs", [])
    for b in batch_sizes:
        if b > len(prompts):
            p.note(f"throughput generate batch {b} skipped: only {len(prompts)} requests")
            continue
        done = [r for r in runs if r.get("wall_s")]
        need = 1.3 * done[-1]["wall_s"] * b / done[-1]["batch"] if done else 0.0
        if p.time_left() < need + 5:
            p.note(f"throughput generate batch {b} skipped: needs ~{need:.0f} s, {p.time_left():.0f} s left")
            break
        try:
            r = hf_generate(model, prompts[:b], tp.output_len, device)
        except Exception as e:
            if not _is_oom(e):
                raise
            _free(device)
            runs.append({"batch": b, "error": "out of memory"})
            p.note(f"throughput generate batch {b}: out of memory; larger batches skipped")
            break
        wall = r["e2e_ms"] / 1e3
        runs.append({"api": "generate", "batch": b, "num_requests": b, "wall_s": wall,
                     "output_tok_s": b * tp.output_len / wall, "total_tok_s": b * (tp.input_len + tp.output_len) / wall,
                     "ttft_ms": r["ttft_ms"], "decode_step_ms": r["decode_step_ms"]})
        _set_best(p)
        p.phase(f"throughput_generate_b{b}", wall)


def run_throughput_cb(model, tp, vocab, device, p: Partial, n: int) -> None:
    import torch
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        p.data["throughput"]["continuous_batching"] = {"error": "this transformers has no generate_batch"}
        return
    if p.time_left() < 60:
        p.note(f"continuous batching skipped: {p.time_left():.0f} s left")
        return
    prompts = throughput_prompts(tp, vocab)[:n]
    gc = GenerationConfig(max_new_tokens=tp.output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    res: dict = {"api": "generate_batch", "num_requests": len(prompts)}
    sync(device)
    t0 = time.perf_counter()
    try:
        # no inference_mode here: its tensors would be shared with the manager's worker thread, which refuses them
        outs = model.generate_batch(inputs=prompts, generation_config=gc, progress_bar=False)
        sync(device)
        wall = time.perf_counter() - t0
        gen = [len(o.generated_tokens) for o in outs.values()]
        errors = [o.error for o in outs.values() if getattr(o, "error", None)]
        res.update(wall_s=wall, generated_tokens=sum(gen), all_full_length=all(g == tp.output_len for g in gen),
                   errors=errors[:3], wall_output_tok_s=sum(gen) / wall)
        # The call's wall time includes the manager's one-time set-up (cache allocation, graph capture); the
        # reference figure is its steady rate, first request admitted to last finished, where it says when.
        spans = [getattr(o, "lifespan", (-1, -1)) for o in outs.values()]
        if spans and all(s[0] > 0 and s[1] > 0 for s in spans):
            busy = max(s[1] for s in spans) - min(s[0] for s in spans)
            res["steady_s"] = busy
            wall = busy
        res.update(output_tok_s=sum(gen) / wall, total_tok_s=(sum(gen) + len(prompts) * tp.input_len) / wall,
                   rate_over="first admitted to last finished" if "steady_s" in res else "the whole call")
        if errors or len(gen) != len(prompts):
            res["error"] = f"{len(errors)} of {len(prompts)} requests failed, {len(gen)} came back"
        p.phase("throughput_continuous_batching", res["wall_s"])
    except Exception as e:
        _free(device)
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        p.note(f"continuous batching failed: {res['error']}")
    p.data["throughput"]["continuous_batching"] = res
    _set_best(p)


def _set_best(p: Partial) -> None:
    """The reference figure is transformers' best: the fastest of its generate runs and its continuous batching."""
    th = p.data["throughput"]
    cands = [r for r in th.get("generate_runs", []) if r.get("output_tok_s")]
    cb = th.get("continuous_batching") or {}
    if cb.get("output_tok_s") and cb.get("all_full_length"):
        cands.append(cb)
    if cands:
        best = max(cands, key=lambda r: r["output_tok_s"])
        th.update(output_tok_s=best["output_tok_s"], total_tok_s=best["total_tok_s"],
                  wall_s=best.get("steady_s", best["wall_s"]),
                  num_requests=best["num_requests"],
                  best_of=f"{best['api']}" + (f" batch {best['batch']}" if "batch" in best else f" of {best['num_requests']} requests"))
    p.save()


def main(argv=None) -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--hf-batch-sizes", default="64,128", help="generate batch sizes tried for throughput")
    ap.add_argument("--hf-cb-requests", type=int, default=128, help="requests for generate_batch; 0 skips it")
    ap.add_argument("--init-scale", type=float, default=1e-3)
    ap.add_argument("--experts-implementation", default=None,
                    help="transformers' experts kernel (default: its own choice, grouped_mm where it can)")
    ap.set_defaults(latency_repeats=1)
    a = ap.parse_args(argv)
    if not (a.shape or a.model):
        ap.error("--shape or --model is required")
    wl = workloads_of(a)
    tp, lat = specs(a)
    p = Partial(a.out, "transformers", a.deadline)
    device = require_device(a.allow_cpu)
    import torch
    import transformers
    from workloads import spec_dict

    cfg = load_config_dict(a)
    vocab = int(cfg["vocab_size"])
    p.data.update(device=str(device), workloads=wl, transformers=transformers.__version__, vocab_size=vocab)
    if "throughput" in wl:
        p.data["throughput"] = {"spec": spec_dict(tp)}
    if "latency" in wl:
        p.data["latency"] = {"spec": spec_dict(lat),
                             "timing": "generate with a step-stamping stopping criterion; median over runs"}
    try:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(cfg, device, dtype, p, a.init_scale, a.experts_implementation)
        t = time.perf_counter()
        hf_generate(model, latency_prompts(lat, 2, -1, vocab), 4, device)  # warm-up: handles, kernels
        p.phase("warmup", time.perf_counter() - t)
        per_batch: dict = {}
        # Order by what the suite needs first inside its deadline: one throughput figure (the smallest batch),
        # one latency round, then the larger batches, continuous batching and more latency rounds.
        sizes = [int(x) for x in a.hf_batch_sizes.split(",") if x]
        if "throughput" in wl and sizes:
            run_throughput_generate(model, tp, vocab, device, p, sizes[:1])
        if "latency" in wl:
            run_latency_round(model, lat, vocab, device, p, per_batch, 0)
        if "throughput" in wl:
            if sizes[1:]:
                run_throughput_generate(model, tp, vocab, device, p, sizes[1:])
            if a.hf_cb_requests:
                run_throughput_cb(model, tp, vocab, device, p, a.hf_cb_requests)
        if "latency" in wl:
            for r in range(1, lat.repeats):
                if not run_latency_round(model, lat, vocab, device, p, per_batch, r):
                    break
    except Exception as e:
        import traceback

        traceback.print_exc()
        p.data["error"] = f"{type(e).__name__}: {e}"
        p.save()
        return 1
    p.done()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
