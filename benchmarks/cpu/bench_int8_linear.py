"""int8 weights (1 byte/weight) through torch's CPU int8 matmuls vs the bf16 copy (2 bytes/weight) the batch path
uses now, on the default model's real linear shapes (issue 14: the bf16 copies are 212 MB of the resident set).

    python benchmarks/cpu/bench_int8_linear.py [--reps 9] [--threads 1,2] | tee benchmarks/cpu/results/DATE-int8.txt

Weights: all 30 layers' q/k/v (stacked), o, gate/up (stacked), down, and the tied LM head (the Q8_0 embedding),
decoded from the bundled SmolLM2-135M-Instruct Q4_1 GGUF. The fp32 reference W is the file's dequantized weight
(sum of the int4 terms with fp32 scales). The int8 weight is W requantized per output channel, symmetric:
s = max|W[n]| / 127, q = round(W / s) in -127..127.

Candidates (each: fp32 activations [M, K] in, fp32 [M, N] out, casts included, as Int4CPUMethod.apply pays them):
  bf16         F.linear on bf16 activations and the bf16 copy (dense_bf16: what the engine uses from 5 rows on)
  int4         torch's packed int4 kernel (what the engine uses below 5 rows), bf16 activations
  w8_int8pack  torch._weight_int8pack_mm: bf16 activations x int8 weight, per-channel bf16 scales
  dyn_fbgemm   torch.ops.quantized.linear_dynamic, engine fbgemm: activations quantized per tensor to uint8 inside
               the op, u8 x s8 -> s32, dequantized to fp32 (reduce_range=False: this CPU has VNNI, checked below)
  dyn_x86      the same with the 'x86' engine (torch's default on x86: picks fbgemm or oneDNN per weight)
  dyn_onednn   the same with the 'onednn' engine
  int_mm_tok   per-row (per-token) dynamic int8 activations in Python, torch._int_mm (s8 x s8 -> s32), scaled
  onednn_qlin  torch.ops.onednn.qlinear_pointwise: per-tensor s8 activations (quantized in Python), fp32 out
  fbgemm_2x    activations as two int8 halves on one per-tensor grid, x = sx * (q1 + q2 / 254) (q2: the rounding
               residual of q1, 254x finer), stacked as 2M rows through one fbgemm call with a given scale
               (quantized::linear_with_input_q_dq_qweight_dq_output_fp32, zero point 128), halves summed after:
               ~16-bit activations at the cost of 2M rows (plain per-tensor int8 activations lose the small
               channels beside the model's outlier channels: see the "real" accuracy rows)
  onednn_2x    the same two halves through onednn.qlinear_pointwise (s8, quantized in Python)

Timing: a "call" is one linear; weights rotate over the 30 layers (as in a model step, so a weight is not in
cache from its previous call: the LM head is one 49152 x 576 weight, never cached). Candidates interleaved in a
shuffled order within each repeat; the table shows medians over repeats of the per-call time, in microseconds.
Accuracy (M = 16): max |y - y_ref| / max |y_ref| and ||y - y_ref|| / ||y_ref||, with Gaussian activations and with
Gaussian activations whose 1% of channels are 20x larger (LLM-like outlier channels, the hard case for
per-tensor activation scales), max over layers 0/15/29; and with the real inputs of every linear (transformers'
fp32 model of the same file, last position of the 16 benchmark prompts), max over all layers. Resident bytes per
weight of each prepared form are measured from RSS in a fresh process per form (memory_worker).
--names/--rows/--no-accuracy narrow a run to some candidates and row counts (bf16 is always timed beside them).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
warnings.filterwarnings("ignore", message=".*deprecated.*")

ROWS = (1, 3, 5, 8, 16, 32)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_weights():
    """{kind: [terms per layer]} and the config, from the bundled GGUF."""
    from moeserve.layers.quant.gguf_blocks import decode_int4_terms, stack_rows
    from moeserve.loader.gguf import default_model_path, read_gguf

    f = read_gguf(default_model_path())
    cfg = f.config

    def terms(names):
        per = []
        for n in names:
            t = f.tensors[n]
            per.append(decode_int4_terms(t.qtype, t.data, *t.shape))
        return stack_rows(per) if len(per) > 1 else per[0]

    kinds = {"qkv": [], "o": [], "gate_up": [], "down": []}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        kinds["qkv"].append(terms([p + f"self_attn.{x}_proj.weight" for x in "qkv"]))
        kinds["o"].append(terms([p + "self_attn.o_proj.weight"]))
        kinds["gate_up"].append(terms([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]))
        kinds["down"].append(terms([p + "mlp.down_proj.weight"]))
    head = "lm_head.weight" if "lm_head.weight" in f.tensors else "model.embed_tokens.weight"
    kinds["lm_head"] = [terms([head])]
    qtypes = {k: f.tensors[n].qtype for k, n in (("layers", "model.layers.0.mlp.down_proj.weight"), ("lm_head", head))}
    return kinds, cfg, qtypes


def fp32_weight(terms) -> torch.Tensor:
    from moeserve.layers.quant.gguf_blocks import GROUP

    n, k = terms[0].q.shape
    w = torch.zeros(n, k)
    for t in terms:
        q = torch.from_numpy(t.q).float().sub_(8).view(n, k // GROUP, GROUP)
        w += (q * torch.from_numpy(t.scale)[..., None] + torch.from_numpy(t.zero)[..., None]).view(n, k)
    return w


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8), s


def make_candidates(terms, w: torch.Tensor) -> dict:
    """{name: call(x fp32 [M, K]) -> fp32 [M, N]} for one weight."""
    from moeserve.layers.quant.gguf_blocks import GROUP
    from moeserve.layers.quant.int4_cpu import dense_bf16, pack_term

    n = w.shape[0]
    c = {}
    wb = dense_bf16(terms)
    c["bf16"] = lambda x: F.linear(x.to(torch.bfloat16), wb).float()
    packs = [pack_term(t) for t in terms]

    def int4(x):
        xb = x.to(torch.bfloat16)
        out = None
        for pw, sz in packs:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, pw, GROUP, sz).float()
            out = y if out is None else out.add_(y)
        return out[:, :n]

    c["int4"] = int4
    wq, s = int8_per_channel(w)
    sb = s.to(torch.bfloat16)
    c["w8_int8pack"] = lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), wq, sb).float()
    for eng in ("fbgemm", "x86", "onednn"):
        torch.backends.quantized.engine = eng
        qw = torch.quantize_per_channel(w, s.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        del qw
        c[f"dyn_{eng}"] = (lambda p: lambda x: torch.ops.quantized.linear_dynamic(x, p, False))(packed)
    torch.backends.quantized.engine = "fbgemm"
    qw = torch._make_per_channel_quantized_tensor(wq, s.double(), torch.zeros(n, dtype=torch.long), 0)
    packed_fb = torch.ops.quantized.linear_prepack(qw, None)
    del qw
    static_fp32 = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32

    def fbgemm_2x(x):
        # x = sx * (q1 + q2 / 254) with q1, q2 in -127..127: both halves through one call on the same grid
        m, k = x.shape
        sx = float(x.abs().max()) / 127 or 1.0
        both = torch.empty(2 * m, k)
        both[:m] = x
        low = torch.mul(x, 1 / sx, out=both[m:])
        low.sub_(torch.round(low)).mul_(254 * sx)  # the rounding residual, 254x: on the same grid as x
        y = static_fp32(both, sx, 128, packed_fb)
        return y[:m].add_(y[m:], alpha=1 / 254)

    c["fbgemm_2x"] = fbgemm_2x
    torch.backends.quantized.engine = "x86"
    wqt = wq.t().contiguous()  # [K, N]
    sf = s.float()

    def int_mm_tok(x):
        sx = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)
        xq = torch.round(x / sx).to(torch.int8)
        return torch._int_mm(xq, wqt).float().mul_(sx).mul_(sf)

    c["int_mm_tok"] = int_mm_tok
    pw8 = torch.ops.onednn.qlinear_prepack(wq, None)
    wz = torch.zeros(n, dtype=torch.int32)
    xz = torch.zeros((), dtype=torch.int32)

    def onednn_qlin(x):
        sx = x.abs().amax().clamp_min(1e-12).div_(127)
        xq = torch.round(x / sx).to(torch.int8)
        return torch.ops.onednn.qlinear_pointwise.tensor(xq, sx, xz, pw8, sf, wz, None, 1.0, 0, torch.float32,
                                                         "none", [], "")

    c["onednn_qlin"] = onednn_qlin

    def onednn_2x(x):
        sx = x.abs().amax().clamp_min(1e-12).div_(127)
        q1 = torch.round(x / sx)
        q2 = torch.round((x - q1 * sx).mul_(254).div_(sx)).clamp_(-127, 127)
        y = torch.ops.onednn.qlinear_pointwise.tensor(torch.cat([q1, q2]).to(torch.int8), sx, xz, pw8, sf, wz, None,
                                                      1.0, 0, torch.float32, "none", [], "")
        m = x.shape[0]
        return y[:m].add_(y[m:], alpha=1 / 254)

    c["onednn_2x"] = onednn_2x
    return c


def real_activations() -> dict:
    """{kind: [per layer: [16, K] fp32]}: the inputs of each linear at the last position of the 16 prompts of
    bench_default_model.py (30 tokens each, one batch), from transformers' fp32 model of the same GGUF."""

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeserve.loader.gguf import default_model_path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_default_model import TEXT, prompts

    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    ids = torch.tensor(prompts(tok(TEXT)["input_ids"]))
    n_layers = model.config.num_hidden_layers
    acts = {k: [None] * n_layers for k in ("qkv", "o", "gate_up", "down")}
    acts["lm_head"] = [None]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind, mod in (("qkv", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                          ("gate_up", layer.mlp.gate_proj), ("down", layer.mlp.down_proj)):
            def hook(m, inp, out, kind=kind, i=i):
                acts[kind][i] = inp[0][:, -1].detach().clone()
            hooks.append(mod.register_forward_hook(hook))

    def head_hook(m, inp, out):
        acts["lm_head"][0] = inp[0][:, -1].detach().clone()

    hooks.append(model.lm_head.register_forward_hook(head_hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    del model
    gc.collect()
    return acts


def accuracy(kinds, names, real) -> dict:
    """{(kind, act, name): (max rel, norm rel)} at M = 16. Synthetic activations: max over layers 0/15/29;
    real ones: max over every layer."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for kind, layers in kinds.items():
        for li in range(len(layers)):
            synthetic = li in {0, len(layers) // 2, len(layers) - 1}
            w = fp32_weight(layers[li])
            cands = make_candidates(layers[li], w)
            k = w.shape[1]
            xs = [("real", real[kind][li])]
            if synthetic:
                gauss = torch.randn(16, k, generator=g)
                outl = gauss.clone()
                idx = torch.randperm(k, generator=g)[: max(1, k // 100)]
                outl[:, idx] *= 20
                xs += [("gauss", gauss), ("outlier", outl)]
            for act, x in xs:
                ref = x @ w.T
                for name in names:
                    y = cands[name](x)
                    e = (y - ref)
                    r = ((e.abs().max() / ref.abs().max()).item(), (e.norm() / ref.norm()).item())
                    key = (kind, act, name)
                    old = out.get(key, (0.0, 0.0))
                    out[key] = (max(old[0], r[0]), max(old[1], r[1]))
            del cands, w
            gc.collect()
    return out


def saturation_check() -> dict:
    """u8 x s8 pairs summed in int16 (vpmaddubsw, AVX2/AVX-512 without VNNI) saturate at 2 * 255 * 127 > 32767:
    the worst case (adjacent activations both at 255, weights all +-127 along a row) through each path, vs fp32."""
    res = {}
    k, n = 576, 64
    w = torch.full((n, k), 0.5)
    w[1::2] = -0.5
    s = torch.full((n,), 0.5 / 127)
    x = torch.full((4, k), 3.0)
    x[:, :4] = -1.0  # sets the minimum: every other activation quantizes to 255
    ref = x @ w.T
    for eng in ("fbgemm", "x86", "onednn"):
        torch.backends.quantized.engine = eng
        qw = torch.quantize_per_channel(w, s.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        p = torch.ops.quantized.linear_prepack(qw, None)
        y = torch.ops.quantized.linear_dynamic(x, p, False)
        res[f"dynamic {eng}"] = ((y - ref).abs().max() / ref.abs().max()).item()
        if eng == "fbgemm":
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 3.0 / 127, 128, p)
            res["fbgemm given scale, zero point 128 (fbgemm_2x's call)"] = ((y - ref).abs().max() / ref.abs().max()).item()
    torch.backends.quantized.engine = "x86"
    return res


MEMORY_FORMS = ("bf16 (dense_bf16)", "int8 tensor + scales", "linear_prepack fbgemm", "linear_prepack x86",
                "linear_prepack onednn", "onednn.qlinear_prepack")


def memory_worker(form: str) -> None:
    """Resident bytes per weight of one prepared form, over the 30 layers' gate/up, in a fresh process. Packed
    params are opaque objects, so RSS is what shows: the int8 inputs (weights + scales) are made first, then
    RSS0; the form is built from them; the inputs are dropped (a form that keeps a reference keeps them alive);
    RSS1 after returning glibc's free heap (malloc_trim). Bytes of the form = RSS1 - RSS0 + the inputs' bytes."""
    import ctypes

    from moeserve.layers.quant.int4_cpu import dense_bf16

    trim = ctypes.CDLL("libc.so.6").malloc_trim
    kinds, _, _ = load_weights()
    layers = kinds["gate_up"]
    n = layers[0][0].q.shape[0]
    inputs = []
    for t in layers:
        inputs.append(int8_per_channel(fp32_weight(t)))
    nweights = sum(wq.numel() for wq, _ in inputs)
    input_bytes = sum(wq.numel() + s.numel() * s.element_size() for wq, s in inputs)

    def prepack(eng):
        def b(t, wq, s):
            torch.backends.quantized.engine = eng
            qw = torch._make_per_channel_quantized_tensor(wq, s.double(), torch.zeros(n, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, None)
        return b

    builders = {
        MEMORY_FORMS[0]: lambda t, wq, s: dense_bf16(t),
        MEMORY_FORMS[1]: lambda t, wq, s: (wq.clone(), s.clone()),
        MEMORY_FORMS[2]: prepack("fbgemm"),
        MEMORY_FORMS[3]: prepack("x86"),
        MEMORY_FORMS[4]: prepack("onednn"),
        MEMORY_FORMS[5]: lambda t, wq, s: torch.ops.onednn.qlinear_prepack(wq, None),
    }
    gc.collect()
    trim(0)
    before = rss_bytes()
    kept = [builders[form](t, wq, s) for t, (wq, s) in zip(layers, inputs)]
    del inputs
    gc.collect()
    trim(0)
    print(f"{(rss_bytes() - before + input_bytes) / nweights:.3f}")
    del kept


def memory_per_weight() -> dict:
    import subprocess

    res = {}
    for form in MEMORY_FORMS:
        out = subprocess.run([sys.executable, __file__, "--memory-worker", form], capture_output=True, text=True,
                             check=True).stdout
        res[form] = float(out.strip().splitlines()[-1])
    return res


def timing(kinds, names, threads, reps, target_s=0.02) -> dict:
    """{(kind, M, name): median us per call}"""
    torch.set_num_threads(threads)
    res: dict = {}
    rng = random.Random(threads)
    for kind, layers in kinds.items():
        ws = [fp32_weight(t) for t in layers]
        cands = [make_candidates(t, w) for t, w in zip(layers, ws)]
        k = ws[0].shape[1]
        del ws
        gc.collect()
        xs = {m: torch.randn(m, k) for m in ROWS}
        # calls per sample: enough passes over the layers for ~target_s with the bf16 path
        passes = {}
        for m in ROWS:
            for c in cands:
                c["bf16"](xs[m])
            t = time.perf_counter()
            for c in cands:
                c["bf16"](xs[m])
            passes[m] = max(1, round(target_s / (time.perf_counter() - t)))
        for m in ROWS:
            for name in names:  # warm-up
                for c in cands:
                    c[name](xs[m])
        samples = {(m, name): [] for m in ROWS for name in names}
        for _ in range(reps):
            for m in ROWS:
                order = list(names)
                rng.shuffle(order)
                x = xs[m]
                for name in order:
                    fs = [c[name] for c in cands]
                    t = time.perf_counter()
                    for _ in range(passes[m]):
                        for fn in fs:
                            fn(x)
                    samples[(m, name)].append((time.perf_counter() - t) / (passes[m] * len(fs)) * 1e6)
        for (m, name), v in samples.items():
            res[(kind, m, name)] = statistics.median(v)
        del cands
        gc.collect()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--kinds", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--names", default=None, help="candidates to time (default: all)")
    ap.add_argument("--rows", default=None, help="M values to time (default: 1,3,5,8,16,32)")
    ap.add_argument("--no-accuracy", action="store_true", help="timing only (no accuracy, memory, saturation)")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    names = ["bf16", "int4", "w8_int8pack", "dyn_fbgemm", "dyn_x86", "dyn_onednn", "int_mm_tok", "onednn_qlin",
             "fbgemm_2x", "onednn_2x"]
    global ROWS
    if args.rows:
        ROWS = tuple(int(m) for m in args.rows.split(","))
    if args.names:
        names = ["bf16"] + [n for n in args.names.split(",") if n != "bf16"]

    kinds, cfg, qtypes = load_weights()
    kinds = {k: v for k, v in kinds.items() if k in args.kinds.split(",")}
    flags = open("/proc/cpuinfo").read()
    feats = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in flags]
    print("# command: python benchmarks/cpu/bench_int8_linear.py " + " ".join(sys.argv[1:]))
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"features {' '.join(feats)}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"# model: hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
          f"{cfg['num_hidden_layers']} layers, heads {cfg['num_attention_heads']}/{cfg['num_key_value_heads']}; "
          f"linears {qtypes['layers']}, head {qtypes['lm_head']}")
    for kind, layers in kinds.items():
        n, k = layers[0][0].q.shape
        print(f"#   {kind}: N x K = {n} x {k}, {len(layers)} weight(s), {len(layers[0])} int4 term(s)")

    if args.no_accuracy:
        return timing_tables(kinds, names, args)
    print("\n## u8 x s8 int16 saturation, worst-case input (max rel error vs fp32; saturated would be ~0.5)")
    for eng, e in saturation_check().items():
        print(f"  {eng}: {e:.2e}")

    print("\n## resident bytes per weight of each prepared form (30 layers of gate_up, RSS in a fresh process each)")
    for name, b in memory_per_weight().items():
        print(f"  {name:28s} {b:.3f}")

    print("\n## accuracy at M = 16 vs x @ W_fp32.T: max-abs rel / norm rel (gauss, outlier: max over layers "
          "0/15/29; real: the model's own inputs to each linear, max over all layers)")
    acc = accuracy(kinds, names, real_activations())
    print(f"{'kind':8s} {'act':8s} " + " ".join(f"{n:>19s}" for n in names))
    for kind in kinds:
        for act in ("gauss", "outlier", "real"):
            print(f"{kind:8s} {act:8s} " + " ".join(
                f"{acc[(kind, act, n)][0]:9.2e}/{acc[(kind, act, n)][1]:9.2e}" for n in names))

    timing_tables(kinds, names, args)


def timing_tables(kinds, names, args) -> None:
    for threads in (int(t) for t in args.threads.split(",")):
        t0 = time.time()
        load0 = os.getloadavg()[0]
        res = timing(kinds, names, threads, args.reps)
        print(f"\n## time per call, us, median of {args.reps} interleaved repeats, {threads} thread(s) "
              f"(load average {load0:.2f} -> {os.getloadavg()[0]:.2f}, {time.time() - t0:.0f} s); "
              f"in brackets: time / bf16's")
        print(f"{'kind':8s} {'M':>3s} " + " ".join(f"{n:>17s}" for n in names))
        for kind in kinds:
            for m in ROWS:
                b = res[(kind, m, "bf16")]
                print(f"{kind:8s} {m:3d} " + " ".join(
                    f"{res[(kind, m, n)]:8.1f} ({res[(kind, m, n)] / b:5.2f})" for n in names))
        # per model step: 30 x (qkv + o + gate_up + down) + head
        if all(k in kinds for k in ("qkv", "o", "gate_up", "down", "lm_head")):
            print(f"{'step':8s} {'M':>3s}  (ms: 30 layers x 4 linears + the head)")
            for m in ROWS:
                tot = {n: (30 * sum(res[(k, m, n)] for k in ("qkv", "o", "gate_up", "down"))
                           + res[("lm_head", m, n)]) / 1e3 for n in names}
                print(f"{'step':8s} {m:3d} " + " ".join(f"{tot[n]:8.2f} ({tot[n] / tot['bf16']:5.2f})" for n in names))
        if all(k in kinds for k in ("qkv", "o", "gate_up", "down")):
            print(f"{'linears':8s} {'M':>3s}  (ms: 30 layers x 4 linears, no head)")
            for m in ROWS:
                tot = {n: 30 * sum(res[(k, m, n)] for k in ("qkv", "o", "gate_up", "down")) / 1e3 for n in names}
                print(f"{'linears':8s} {m:3d} " + " ".join(f"{tot[n]:8.2f} ({tot[n] / tot['bf16']:5.2f})" for n in names))


if __name__ == "__main__":
    main()
