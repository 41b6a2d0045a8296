"""Tiny INT4 (W4A16) checkpoints for the tests, packed here independently of moeserve's loader, in each format's
published layout:

  AWQ (AutoAWQ GEMM):    qweight int32 [K, N/8]: word c of row k holds columns 8c..8c+7, nibble i = column
                         8c + [0,2,4,6,1,3,5,7][i]; qzeros int32 [K/G, N/8] the same; scales fp16 [K/G, N]
  GPTQ (AutoGPTQ v1):    qweight int32 [K/8, N]: nibble i of word r = row 8r + i; qzeros int32 [K/G, N/8], nibble
                         i = column 8c + i, holding zero - 1; scales fp16 [K/G, N]; g_idx int32 [K] = k // G
  compressed-tensors:    weight_packed int32 [N, K/8]: nibble i of word c = input 8c + i, value q + 8 (q signed in
  (pack-quantized)       [-8, 7]); weight_scale bf16 [N, K/G]; weight_shape int64 [N, K]

Each quantizable weight w [N, K] is quantized round-to-nearest per group of G inputs; the dequantized checkpoint
holds (q - z) * s computed here in float32 from the same integers and file-dtype scales.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import make_tiny_checkpoint

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantizable(name: str, t: torch.Tensor) -> bool:
    """Every projection (attention, MLP, experts); not embeddings, head, norms or the router."""
    return (t.dim() == 2 and name.endswith(".weight") and ".mlp.gate." not in name
            and not any(s in name for s in ("embed_tokens", "lm_head", "norm")))


def quantize_ints(w: torch.Tensor, group: int, sym: bool, scale_dtype):
    """w [N, K] -> (q uint in [0, 15] [N, K], zero [N, K/G], scale [N, K/G] in scale_dtype) with w ~ (q - z) * s."""
    n, k = w.shape
    t = w.float().reshape(n, k // group, group)
    if sym:
        scale = (t.abs().amax(-1) / 7).clamp(min=1e-8)
        zero = torch.full_like(scale, 8)
    else:
        lo, hi = t.amin(-1).clamp(max=0), t.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(1, 15)  # >= 1: GPTQ v1 stores zero - 1
    scale = scale.to(scale_dtype)
    q = (t / scale.float()[..., None] + zero[..., None]).round().clamp(0, 15).reshape(n, k)
    return q.to(torch.int64), zero.to(torch.int64), scale


def _words(nibbles: np.ndarray) -> torch.Tensor:
    """[..., 8] uint values (nibble i last) -> int32 words."""
    w = np.zeros(nibbles.shape[:-1], dtype=np.uint32)
    for i in range(8):
        w |= (nibbles[..., i].astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return torch.from_numpy(w.view(np.int32).copy())


def pack_awq(q, zero, scale):
    """AWQ GEMM: interleaved packing along the output dim of the transposed weight."""
    iw = q.t().numpy()  # [K, N]
    k, n = iw.shape
    qweight = _words(iw.reshape(k, n // 8, 8)[..., AWQ_ORDER])
    z = zero.t().numpy()  # [K/G, N]
    qzeros = _words(z.reshape(z.shape[0], n // 8, 8)[..., AWQ_ORDER])
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.t().contiguous()}


def pack_gptq(q, zero, scale, group, v2=False, g_idx=None):
    """GPTQ: sequential packing along the input dim; zeros along the output dim, stored minus one (v1). g_idx: the
    group of each input (activation order), else k // G."""
    iw = q.t().numpy()  # [K, N]
    k, n = iw.shape
    qweight = _words(iw.reshape(k // 8, 8, n).transpose(0, 2, 1))  # [K/8, N, 8]
    z = zero.t().numpy() - (0 if v2 else 1)
    qzeros = _words(z.reshape(z.shape[0], n // 8, 8))
    return {"qweight": qweight, "qzeros": qzeros, "scales": scale.t().contiguous(),
            "g_idx": (torch.arange(k) // group).to(torch.int32) if g_idx is None else g_idx}


def pack_ct(q, zero, scale):
    """compressed-tensors pack-quantized: signed q (u - 8) stored with offset 8, packed along the input dim."""
    assert (zero == 8).all()
    n, k = q.shape
    return {"weight_packed": _words(q.numpy().reshape(n, k // 8, 8)), "weight_scale": scale.contiguous(),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64)}


def qconfig(method: str, group: int, sym: bool = True, ignored: list[str] | None = None,
            act_order: bool = False) -> dict:
    if method == "awq":
        return dict(quant_method="awq", bits=4, group_size=group, zero_point=True, version="gemm",
                    **({"modules_to_not_convert": ignored} if ignored else {}))
    if method == "gptq":
        return dict(quant_method="gptq", bits=4, group_size=group, desc_act=act_order, sym=sym, checkpoint_format="gptq",
                    **({"modules_to_not_convert": ignored} if ignored else {}))
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                          "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                      "strategy": "group", "group_size": group, "dynamic": False,
                                                      "actorder": None, "observer": "minmax"}}},
            "ignore": ["lm_head"] + list(ignored or [])}


def _ignored(name: str, ignored: list[str]) -> bool:
    import re

    module = name.rsplit(".", 1)[0]
    for i in ignored:
        if i.startswith("re:") and re.match(i[3:], module):
            return True
        if not i.startswith("re:") and f".{i}." in f".{name}":
            return True
    return False


def act_order_perm(name: str, k: int) -> torch.Tensor:
    """A GPTQ activation order for the weight `name` ([N, k]): random, one per layer input, so the projections that
    read the same input (q/k/v, gate/up) share it as GPTQ's (one Hessian per input) do."""
    base = name.rsplit(".", 2)[0]
    family = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(name.rsplit(".", 2)[1],
                                                                               name.rsplit(".", 2)[1])
    seed = sum(map(ord, f"{base}.{family}")) * 31 + k
    return torch.randperm(k, generator=torch.Generator().manual_seed(seed))


def make_int4_pair(tmp: Path, arch: str, method: str, group: int, sym: bool = True,
                   ignored: list[str] | None = None, act_order: bool = False, **overrides) -> tuple[str, str]:
    """(int4 checkpoint dir, dequantized fp32 checkpoint dir) of one tiny random model. act_order (GPTQ): each
    input's group follows a random activation order (desc_act=true), as GPTQ writes when it quantizes the inputs
    in decreasing Hessian order."""
    src = Path(make_tiny_checkpoint(tmp / "src", arch, **overrides))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    sym = {"awq": False, "compressed-tensors": True}.get(method, sym)  # AWQ has zeros; pack-quantized is symmetric
    scale_dtype = torch.bfloat16 if method == "compressed-tensors" else torch.float16
    qt, deq = {}, {}
    for name, t in tensors.items():
        if quantizable(name, t) and not _ignored(name, ignored or []):
            k = t.shape[1]
            perm = act_order_perm(name, k) if act_order else torch.arange(k)
            q_sorted, zero, scale = quantize_ints(t[:, perm], group, sym, scale_dtype)  # groups of the sorted inputs
            q = torch.empty_like(q_sorted)
            q[:, perm] = q_sorted  # stored in the checkpoint's input order
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
            packed = {"awq": lambda: pack_awq(q, zero, scale),
                      "gptq": lambda: pack_gptq(q, zero, scale, group, g_idx=g_idx),
                      "compressed-tensors": lambda: pack_ct(q, zero, scale)}[method]()
            base = name[:-len(".weight")]
            for kind, v in packed.items():
                qt[f"{base}.{kind}"] = v
            z = zero.float()[:, g_idx.long()]
            s = scale.float()[:, g_idx.long()]
            deq[name] = (q.float() - z) * s
        else:
            qt[name] = deq[name] = t
    cfg = json.loads((src / "config.json").read_text())
    out = []
    for sub, weights, qcfg in ((method, qt, qconfig(method, group, sym, ignored, act_order)), ("deq", deq, None)):
        d = tmp / sub
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
        c = dict(cfg, **({"quantization_config": qcfg} if qcfg else {}))
        (d / "config.json").write_text(json.dumps(c))
        out.append(str(d))
    return out[0], out[1]
