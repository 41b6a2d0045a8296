"""INT4 weight-only (W4A16) checkpoints: AWQ, GPTQ, and compressed-tensors `pack-quantized` (the format Kimi K2
Thinking / K2.5 ship for their routed experts).

Checkpoint layouts (per linear layer of logical shape W [N out, K in], G = group_size, 8 nibbles per int32):

  awq                qweight int32 [K, N/8]    packed along N, nibble j holds column AWQ_ORDER[j] of its 8
                     qzeros  int32 [K/G, N/8]  same packing; w = (q - z) * s
                     scales  fp16  [K/G, N]
  gptq               qweight int32 [K/8, N]    packed along K, nibble j of word r holds row 8r + j
                     qzeros  int32 [K/G, N/8]  packed along N in order; checkpoint_format 'gptq' (v1) stores
                                               z - 1 (w = (q - (stored + 1)) * s), 'gptq_v2' stores z
                     scales  fp16  [K/G, N]
                     g_idx   int32 [K]         k // G when desc_act is false; with desc_act (activation order)
                                               any order in which every group has G rows
  compressed-tensors weight_packed int32 [N, K/8]  packed along K, q + 8 stored (symmetric: w = (u - 8) * s)
                     weight_scale  bf16  [N, K/G]
                     weight_shape  int   [2]       (N, K): checked against the layer

In memory every format becomes one layout, the one the kernel reads: `packed` int32 [N, K/8] (nibble j of word c =
q[n, 8c + j], unsigned), `scales` [N, K/G] in the format's scale dtype (fp16 for AWQ/GPTQ, bf16 for
compressed-tensors: 2 bytes per group, as the planner sizes int4) and `zeros` uint8 [N, K/G] (none for
compressed-tensors, which is symmetric: zero 8; GPTQ sym ships its zeros and keeps them), each under
the checkpoint's own tensor name so the weight loader finds it (experts: `w13_<name>`, `w2_<name>`). The
conversion happens in the per-parameter weight loader on this rank's part only: a TP split is taken in checkpoint
coordinates (a split that cuts a quantization group, or an 8-column pack, is refused when the model is built).

Activation order (GPTQ desc_act=true): `finalize` sorts the input columns by group (the stored integers permuted
once, a `act_perm` buffer kept), so every kernel sees contiguous groups again, and the forward gathers the
activations' columns by `act_perm` first. Parts merged into one layer (q/k/v, gate/up) share their input and so
their order; a layer whose input a TP split cuts (row-parallel) and the experts refuse it.

CPU reference: dequantize on each call, w = (q - z) * s per group in fp32, cast to the activation dtype, then the
dense matmul (layers keep 0.5 byte/weight + scales resident, as the planner sizes them; the reference is exactly
the stored integers). CUDA (chosen once in `finalize`): kernels.int4_linear's W4A16 GEMM for linear layers,
kernels.fused_moe with the codes, scales and zeros for the experts (unpacked in its kernels, the bf16 experts' own
configs and tuning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from moeserve.layers.quant import compressed_tensors_group, compressed_tensors_weights
from moeserve.loader.tensor_slices import materialize, narrow, shape_of

INT4_METHODS = ("awq", "gptq", "compressed-tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column AWQ_ORDER[j] of its 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)

# kind -> (output dim, output unit, input dim, input unit) of the checkpoint tensor; unit "G" is the group size
_LAYOUT = {
    "awq": {"qweight": (1, 8, 0, 1), "qzeros": (1, 8, 0, "G"), "scales": (1, 1, 0, "G")},
    "gptq": {"qweight": (1, 1, 0, 8), "qzeros": (1, 8, 0, "G"), "scales": (1, 1, 0, "G"), "g_idx": (None, 1, 0, 1)},
    "compressed-tensors": {"weight_packed": (0, 1, 1, 8), "weight_scale": (0, 1, 1, "G"),
                           "weight_shape": (None, 1, None, 1)},
}
_ROLE = {"qweight": "packed", "weight_packed": "packed", "scales": "scales", "weight_scale": "scales",
         "qzeros": "zeros", "g_idx": "g_idx", "weight_shape": "shape"}


class Int4Error(ValueError):
    """A checkpoint tensor that does not fit its layer; the loader prefixes the tensor's name."""


@dataclass
class Int4Config:
    method: str  # awq | gptq | compressed-tensors
    group: int
    sym: bool
    ignored: list[str] = field(default_factory=list)
    zero_offset: int = 0  # gptq v1 stores z - 1
    act_order: bool = False  # gptq desc_act: g_idx in activation order (see finalize)

    @property
    def scale_dtype(self) -> torch.dtype:
        """How scales are held: the dtype the format's checkpoints ship them in (exact, 2 bytes per group)."""
        return torch.bfloat16 if self.method == "compressed-tensors" else torch.float16

    @property
    def kinds(self) -> tuple[str, ...]:
        """The checkpoint tensors of one quantized weight."""
        return tuple(_LAYOUT[self.method])

    def name_of(self, role: str) -> str | None:
        return next((k for k in self.kinds if _ROLE[k] == role), None)

    def _listed(self, name: str) -> bool:
        for n in self.ignored:
            if n.startswith("re:"):
                if re.match(n[3:], name):
                    return True
            elif name == n or name.endswith("." + n) or f".{n}." in f".{name}.":
                return True
        return False

    def skips(self, prefix: str, parts: list[str] | None = None) -> bool:
        """Whether a module stays unquantized (`ignore` / `modules_to_not_convert`, exact, suffix, dotted
        component or `re:` regex). A merged module (qkv_proj) is judged by its checkpoint parts (q/k/v_proj): all
        listed or none, else it is refused."""
        if self._listed(prefix):
            return True
        if not parts:
            return False
        head, _, last = prefix.rpartition(".")
        listed = [self._listed(f"{head}.{p}" if head else p) for p in parts]
        if any(listed) and not all(listed):
            raise ValueError(f"{prefix}: the checkpoint quantizes some of {parts} and not others "
                             f"(quantization ignore list); moeserve merges them into one layer and needs all or none.")
        return all(listed)


def _q(hf_config: dict) -> dict:
    return hf_config.get("quantization_config") or (hf_config.get("text_config") or {}).get("quantization_config") \
        or {}


def is_int4(flag: str | None, hf_config: dict) -> bool:
    q = _q(hf_config)
    method = str(q.get("quant_method", "")).lower()
    if method == "compressed-tensors" and compressed_tensors_weights(q).get("type") == "float":
        return False  # float8 weights: layers/quant/fp8
    return flag in INT4_METHODS or method in INT4_METHODS


def resolve_int4(flag: str | None, hf_config: dict) -> Int4Config:
    """The int4 config of a checkpoint (vLLM semantics: --quantization may be omitted, and must match when given);
    unsupported variants are refused naming the field."""
    q = _q(hf_config)
    method = str(q.get("quant_method", "")).lower() or None
    if flag is not None and method is None:
        raise ValueError(f"--quantization {flag}: the checkpoint has no quantization_config; moeserve does not "
                         f"quantize to int4 on load: point it at a {flag} checkpoint.")
    if flag is not None and flag != method:
        raise ValueError(f"the checkpoint's quantization_config says quant_method={method!r}, which conflicts with "
                         f"--quantization {flag}.")
    ignored = list(q.get("modules_to_not_convert") or []) + list(q.get("ignore") or [])

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{method} checkpoint with {what}: not supported (moeserve loads 4-bit weight-only "
                             f"int checkpoints with group-wise scales).")

    if method == "awq":
        bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
        need(bits == 4, f"quantization_config.bits={bits}")
        need(q.get("zero_point", True) is True, "quantization_config.zero_point=false")
        need(str(q.get("version", "gemm")).lower() == "gemm", f"quantization_config.version={q.get('version')!r}")
        sym, offset = False, 0
    elif method == "gptq":
        bits, group = q.get("bits"), q.get("group_size")
        need(bits == 4, f"quantization_config.bits={bits}")
        fmt = str(q.get("checkpoint_format", "gptq")).lower()
        need(fmt in ("gptq", "gptq_v2"), f"quantization_config.checkpoint_format={fmt!r}")
        sym, offset = bool(q.get("sym", True)), 1 if fmt == "gptq" else 0
        act_order = bool(q.get("desc_act", False))
    elif method == "compressed-tensors":
        g, w, fmt = compressed_tensors_group(q, need)
        need(fmt == "pack-quantized", f"format={fmt!r} (pack-quantized is supported)")
        need(w.get("num_bits") == 4 and w.get("type", "int") == "int",
             f"config_groups weights num_bits={w.get('num_bits')} type={w.get('type')!r}")
        need(w.get("strategy") == "group", f"config_groups weights strategy={w.get('strategy')!r} (group is supported)")
        need(w.get("actorder") in (None, False, "static"), f"config_groups weights actorder={w.get('actorder')!r}")
        need(g.get("input_activations") is None, "config_groups input_activations (W4A16 only: weights alone)")
        group, sym, offset = w.get("group_size"), True, 0
    else:
        raise ValueError(f"quant_method {method!r} is not an int4 method ({', '.join(INT4_METHODS)}).")
    need(isinstance(group, int) and group > 0 and group % 8 == 0,
         f"group_size={group} (a positive multiple of 8 is supported; per-channel -1 is not)")
    return Int4Config(method, group, sym, ignored, offset, act_order if method == "gptq" else False)


# ---- packing ---------------------------------------------------------------------------------------------------

def unpack_int32(p: torch.Tensor, dim: int, order=None) -> torch.Tensor:
    """int32 words -> their 8 nibbles (int32, 0..15) along dim (8x longer); nibble j of a word goes to position
    order[j] of its 8 (in order when None)."""
    p = p.movedim(dim, -1).to(torch.int32)
    v = (p.unsqueeze(-1) >> _SHIFTS.to(p.device)) & 0xF
    if order is not None:
        inv = [0] * 8
        for j, pos in enumerate(order):
            inv[pos] = j
        v = v[..., inv]
    return v.reshape(*p.shape[:-1], p.shape[-1] * 8).movedim(-1, dim)


def pack_int32(v: torch.Tensor, dim: int, order=None) -> torch.Tensor:
    """unpack_int32's inverse: values 0..15 along dim (a multiple of 8) -> int32 words."""
    v = v.movedim(dim, -1).to(torch.int64)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    if order is not None:
        v = v[..., list(order)]
    words = (v << _SHIFTS.to(v.device).to(torch.int64)).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).movedim(-1, dim)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
               dtype=torch.float32) -> torch.Tensor:
    """The CPU reference: packed [..., N, K/8], scales/zeros [..., N, K/G] -> w [..., N, K] = (q - z) * s
    (zeros None: symmetric, 8)."""
    q = unpack_int32(packed, -1).to(torch.float32)
    z = 8.0 if zeros is None else zeros.to(torch.float32).repeat_interleave(group, dim=-1)
    s = scales.to(torch.float32).repeat_interleave(group, dim=-1)
    return ((q - z) * s).to(dtype)


def _to_canonical(cfg: Int4Config, kind: str, t: torch.Tensor) -> torch.Tensor:
    """One checkpoint tensor (this rank's part) -> the in-memory layout ([n, ...] rows first)."""
    m = cfg.method
    if kind in ("qweight", "weight_packed"):
        if m == "awq":  # [k, n/8] along N, AWQ order -> [n, k/8]
            return pack_int32(unpack_int32(t, 1, AWQ_ORDER).t(), 1)
        if m == "gptq":  # [k/8, n] along K -> [n, k/8]
            return t.t().contiguous().to(torch.int32)
        return t.to(torch.int32)
    if kind in ("scales", "weight_scale"):
        return (t.t() if m != "compressed-tensors" else t).to(torch.float32)
    if kind == "qzeros":  # [k/G, n/8] -> [n, k/G] uint8
        z = unpack_int32(t, 1, AWQ_ORDER if m == "awq" else None) + cfg.zero_offset
        return z.t().to(torch.uint8)
    raise AssertionError(kind)


def _from_canonical(cfg: Int4Config, kind: str, t: torch.Tensor) -> torch.Tensor:
    """_to_canonical's inverse: a full layer's in-memory tensors -> the checkpoint's (the test helpers write
    checkpoints with it)."""
    m = cfg.method
    if kind in ("qweight", "weight_packed"):
        if m == "awq":
            return pack_int32(unpack_int32(t, 1).t(), 1, AWQ_ORDER)
        if m == "gptq":
            return t.t().contiguous()
        return t.contiguous()
    if kind in ("scales", "weight_scale"):
        return (t.t() if m != "compressed-tensors" else t).contiguous()
    if kind == "qzeros":
        return pack_int32((t.to(torch.int32) - cfg.zero_offset).t() & 0xF, 1, AWQ_ORDER if m == "awq" else None)
    raise AssertionError(kind)


def quantize(w: torch.Tensor, cfg: Int4Config) -> dict[str, torch.Tensor]:
    """A checkpoint's quantization of w [N, K] in cfg's format: {kind: tensor} (round-to-nearest per group of G
    inputs; symmetric: zero 8, scale amax / 7; asymmetric: min/max, zero in [1, 15] so that GPTQ v1's stored z - 1
    fits 4 bits). Scales are rounded to the file's dtype (fp16; bf16 for compressed-tensors)."""
    n, k = w.shape
    g = cfg.group
    tiles = w.to(torch.float32).reshape(n, k // g, g)
    if cfg.sym:
        scale = (tiles.abs().amax(-1) / 7).clamp(min=1e-8)
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = tiles.amin(-1).clamp(max=0), tiles.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(1, 15)
    dt = torch.bfloat16 if cfg.method == "compressed-tensors" else torch.float16
    scale = scale.to(dt).to(torch.float32)  # what the file holds
    q = (tiles / scale[..., None] + zero[..., None]).round().clamp(0, 15).reshape(n, k)
    packed = pack_int32(q, 1)
    zeros = zero.to(torch.uint8)  # in memory: the true zero
    out = {}
    for kind in cfg.kinds:
        role = _ROLE[kind]
        if role == "packed":
            out[kind] = _from_canonical(cfg, kind, packed)
        elif role == "scales":
            out[kind] = _from_canonical(cfg, kind, scale).to(dt)
        elif role == "zeros":
            out[kind] = _from_canonical(cfg, kind, zeros)
        elif role == "g_idx":
            out[kind] = (torch.arange(k) // g).to(torch.int32)
        elif role == "shape":
            out[kind] = torch.tensor([n, k], dtype=torch.int64)
    return out


# ---- building ----------------------------------------------------------------------------------------------

def apply_int4(model: nn.Module, cfg: Int4Config) -> None:
    """Give every linear layer and experts module not ignored int4 storage (model on the meta device)."""
    from moeserve.layers.experts import Experts
    from moeserve.layers.linear import LinearBase

    packed = getattr(model, "packed_modules", None) or {}
    for name, m in model.named_modules():
        if isinstance(m, LinearBase) and m.quant_method is None:
            if not cfg.skips(name, packed.get(name.rsplit(".", 1)[-1])):
                Int4LinearMethod(cfg).create_weights(m, name)
        elif isinstance(m, Experts) and m.quant_method is None:
            if not cfg.skips(name):
                Int4MoEMethod(cfg).create_weights(m, name)


DENSE_AFTER_LOAD = ("kv_b_proj",)  # read as a weight by MLA: dequantized once after load


def finalize(model: nn.Module) -> None:
    """After the weights are in: the forward chosen once; MLA's kv_b_proj dequantized."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if isinstance(qm, (Int4LinearMethod, Int4MoEMethod)):
            try:
                qm.finalize(m)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            if isinstance(qm, Int4LinearMethod) and name.rsplit(".", 1)[-1] in DENSE_AFTER_LOAD:
                w = qm.dequantize(m, dtype)
                for k in [k for k, _ in m.named_parameters(recurse=False) if k != "bias"]:
                    delattr(m, k)
                for k in [k for k, _ in m.named_buffers(recurse=False)]:
                    delattr(m, k)
                m.weight = nn.Parameter(w, requires_grad=False)
                m.quant_method = None


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _make(layer: nn.Module, cfg: Int4Config, prefix: str, lead: tuple, n: int, k: int, parts: int,
          device) -> None:
    """Register the in-memory tensors of an [.., n, k] int4 weight under the checkpoint's names."""
    g = cfg.group
    shapes = {"packed": ((*lead, n, k // 8), torch.int32), "scales": ((*lead, n, k // g), cfg.scale_dtype),
              "zeros": ((*lead, n, k // g), torch.uint8), "g_idx": ((*lead, parts, k), torch.int32)}
    for kind in cfg.kinds:
        role = _ROLE[kind]
        if role == "shape":
            continue  # checked as it arrives (WeightLoader), not stored
        shape, dt = shapes[role]
        layer.register_parameter(prefix + kind, nn.Parameter(torch.empty(shape, dtype=dt, device=device),
                                                             requires_grad=False))


def _zeros_of(module: nn.Module, cfg: Int4Config, prefix: str = "") -> torch.Tensor | None:
    name = cfg.name_of("zeros")
    return None if name is None else getattr(module, prefix + name)


def _convert_part(cfg: Int4Config, kind: str, loaded, out_range, in_range, full: tuple[int, int]) -> torch.Tensor:
    """The [out_range] x [in_range] part of a checkpoint tensor of logical weight shape full = (N, K), read
    (only that part) and converted to the in-memory layout."""
    od, ou, idim, iu = _LAYOUT[cfg.method][kind]
    ou, iu = (cfg.group if u == "G" else u for u in (ou, iu))
    n_full, k_full = full
    expected = [0, 0]
    expected[od], expected[idim] = n_full // ou, k_full // iu
    if shape_of(loaded) != tuple(expected):
        raise Int4Error(f"has shape {shape_of(loaded)}, but the config implies {tuple(expected)} "
                        f"({cfg.method}, weight {n_full}x{k_full}, group {cfg.group})")
    (o0, on), (i0, in_) = out_range, in_range
    part = materialize(narrow(narrow(loaded, od, o0 // ou, on // ou), idim, i0 // iu, in_ // iu))
    if _ROLE[kind] == "scales" and part.dtype != cfg.scale_dtype and \
            not torch.equal(part.to(cfg.scale_dtype).to(part.dtype), part):
        raise Int4Error(f"holds {part.dtype} scales that {cfg.scale_dtype} (how {cfg.method} scales are kept) does "
                        f"not represent exactly")
    return _to_canonical(cfg, kind, part)


def _check_gidx(loaded, full_k: int, k0: int, k: int, group: int, act_order: bool = False) -> torch.Tensor:
    if shape_of(loaded) != (full_k,):
        raise Int4Error(f"has shape {shape_of(loaded)}, but the config implies ({full_k},)")
    part = materialize(narrow(loaded, 0, k0, k)).to(torch.int32)
    if act_order:  # finalize checks that every group has `group` rows
        if part.numel() and (int(part.min()) < 0 or int(part.max()) >= full_k // group):
            raise Int4Error(f"holds group indices outside [0, {full_k // group})")
        return part
    if not torch.equal(part.cpu(), (torch.arange(k0, k0 + k) // group).to(torch.int32)):
        raise Int4Error("is not the trivial k // group_size order (an activation-order g_idx), but the "
                        "quantization_config says desc_act=false")
    return part


def _check_shape_tensor(loaded, full: tuple[int, int]) -> int:
    got = tuple(int(v) for v in materialize(loaded).reshape(-1).tolist())
    if got != tuple(full):
        raise Int4Error(f"says {got}, but the config implies {tuple(full)}")
    return 0


class Int4LinearMethod:
    name = "int4"

    def __init__(self, cfg: Int4Config):
        self.cfg = cfg
        self.use_kernel = False

    def create_weights(self, layer: nn.Module, name: str) -> None:
        from moeserve.layers.quant.fp8 import _row_pieces

        n, k, g = layer.out_features, layer.in_features, self.cfg.group
        dim, pieces = _row_pieces(layer, None)
        full_k = pieces[0][3] if dim == 1 else k
        _check(full_k % g == 0, f"{name}: in_features {full_k} is not a multiple of the int4 group_size {g}.")
        for src, length, _, full in pieces:
            unit = g if dim == 1 else 8
            _check(src % unit == 0 and length % unit == 0,
                   f"{name}: this rank's part [{src}, {src + length}) of {full} cuts a {unit}-wide int4 "
                   + ("quantization group" if dim == 1 else "pack of 8 columns")
                   + "; choose a tensor-parallel size whose split is a multiple of it.")
        _check(not (self.cfg.act_order and dim == 1 and pieces[0][1] != full_k),
               f"{name}: an activation-order (desc_act) GPTQ layer whose input a tensor-parallel split cuts "
               f"(row-parallel) is not supported: serve it with a tensor-parallel size of 1, or a desc_act=false "
               f"checkpoint.")
        parts = len(getattr(layer, "output_sizes", [0])) if dim == 0 else 1
        device = layer.weight.device
        del layer.weight
        layer.register_parameter("weight", None)
        _make(layer, self.cfg, "", (), n, k, parts, device)
        layer.quant_method = self
        from moeserve.layers.linear import attach_weight_loaders

        attach_weight_loaders(layer)

    # ---- loading -----------------------------------------------------------------------------------------
    def loader(self, layer, kind: str, param, loaded, shard_id=None) -> int:
        from moeserve.layers.quant.fp8 import _row_pieces

        dim, pieces = _row_pieces(layer, shard_id)
        n, k = layer.out_features, layer.in_features
        if dim == 1:  # row-parallel: all outputs, this rank's inputs
            src, length, _, full_k = pieces[0]
            if _ROLE[kind] == "g_idx":
                param.data[0].copy_(_check_gidx(loaded, full_k, src, length, self.cfg.group, self.cfg.act_order))
                return length
            if _ROLE[kind] == "shape":
                return _check_shape_tensor(loaded, (n, full_k))
            part = _convert_part(self.cfg, kind, loaded, (0, n), (src, length), (n, full_k))
            param.data.copy_(part)
            return part.numel()
        offsets, at = [], 0
        for _, _, _, full in pieces:
            offsets.append(at if shard_id is None else 0)
            at += full
        written = 0
        ids = range(len(pieces)) if shard_id is None else [{"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)]
        for (src, length, dst, full), off, i in zip(pieces, offsets, ids):
            n_full = at if shard_id is None else full
            if _ROLE[kind] == "g_idx":
                param.data[i].copy_(_check_gidx(loaded, k, 0, k, self.cfg.group, self.cfg.act_order))
                written += k
                continue
            if _ROLE[kind] == "shape":
                _check_shape_tensor(loaded, (n_full, k))
                continue
            part = _convert_part(self.cfg, kind, loaded, (off + src, length), (0, k), (n_full, k))
            param.data.narrow(0, dst, length).copy_(part)
            written += part.numel()
        return written

    # ---- forward -----------------------------------------------------------------------------------------
    def tensors(self, layer):
        c = self.cfg
        return getattr(layer, c.name_of("packed")), getattr(layer, c.name_of("scales")), _zeros_of(layer, c)

    def finalize(self, layer) -> None:
        packed, _, _ = self.tensors(layer)
        self.use_kernel = packed.is_cuda and self.cfg.group % 16 == 0  # the GEMM's K tile divides the group
        layer.act_perm = _sort_by_group(layer, self.cfg) if self.cfg.act_order else None

    def dequantize(self, layer, dtype=torch.float32) -> torch.Tensor:
        w = dequantize(*self.tensors(layer), self.cfg.group, dtype)
        perm = getattr(layer, "act_perm", None)
        if perm is None:
            return w
        out = torch.empty_like(w)  # back to the checkpoint's input order
        out[:, perm] = w
        return out

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None | bool = True) -> torch.Tensor:
        b = layer.bias if bias is True else (None if bias is False else bias)
        perm = getattr(layer, "act_perm", None)
        if perm is not None:  # the inputs in the order the stored columns were sorted into
            x = x.index_select(-1, perm)
        if self.use_kernel and x.dim() >= 2:
            from moeserve.kernels.int4_linear import int4_linear

            shape = x.shape
            y = int4_linear(x.reshape(-1, shape[-1]), *self.tensors(layer), self.cfg.group, b)
            return y.reshape(*shape[:-1], y.shape[-1])
        return torch.nn.functional.linear(x, dequantize(*self.tensors(layer), self.cfg.group, x.dtype), b)

    def apply_nobias(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.apply(layer, x, bias=False)


def _sort_by_group(layer: nn.Module, cfg: Int4Config) -> torch.Tensor | None:
    """Activation order: permute the stored columns (inputs) so that each group's rows are contiguous, in group
    order, as without desc_act; returns the permutation (int64 [K], on the weights' device) the forward gathers
    the inputs by, or None when the stored order already is the groups'. Merged parts must share one order (they share their input: GPTQ orders by the same Hessian)."""
    g_idx = getattr(layer, cfg.name_of("g_idx")).data
    if not all(torch.equal(g_idx[0], g_idx[i]) for i in range(1, g_idx.shape[0])):
        raise ValueError("the parts merged into this layer (q/k/v or gate/up) have different activation orders "
                         "(g_idx); moeserve needs them equal.")
    perm = torch.argsort(g_idx[0].to(torch.int64), stable=True)
    k = perm.numel()
    if not torch.equal(g_idx[0][perm].cpu(), (torch.arange(k) // cfg.group).to(torch.int32)):
        raise ValueError(f"g_idx does not give every group exactly {cfg.group} inputs.")
    if torch.equal(perm, torch.arange(k, device=perm.device)):
        return None  # already in group order (a dummy load, or an order GPTQ left as it was): nothing to gather
    packed = getattr(layer, cfg.name_of("packed"))
    packed.data = pack_int32(unpack_int32(packed.data, -1).index_select(-1, perm.to(packed.device)), -1)
    g_idx.copy_((torch.arange(k, device=g_idx.device) // cfg.group).to(g_idx.dtype).expand_as(g_idx))
    return perm.to(packed.device)


def weight_loader_for(module: nn.Module, pname: str, default):
    """The loader of one parameter of an int4 module (linear.attach_weight_loaders asks)."""
    qm = getattr(module, "quant_method", None)
    if isinstance(qm, Int4LinearMethod) and pname in _ROLE:
        return partial(qm.loader, module, pname)
    return default


# ---- experts ---------------------------------------------------------------------------------------------

class Int4MoEMethod:
    """Routed experts: w13_<kind> [E, 2I, H...] (gate rows then up rows) and w2_<kind> [E, H, I...] in the
    in-memory layout; loaded per expert and projection (gate/up/down), this rank's experts (EP) or intermediate
    slice (TP) only."""

    name = "int4"

    def __init__(self, cfg: Int4Config):
        self.cfg = cfg
        self.use_kernel = False

    def create_weights(self, experts: nn.Module, name: str) -> None:
        g = self.cfg.group
        _check(not self.cfg.act_order, f"{name}: activation-order (desc_act) GPTQ experts are not supported; a "
                                       f"desc_act=false checkpoint is.")
        e, i_loc, h = experts.num_local, experts.local_intermediate, experts.w13.shape[2]
        _check(h % g == 0 and experts.intermediate_size % g == 0,
               f"{name}: hidden {h} / moe intermediate {experts.intermediate_size} is not a multiple of the int4 "
               f"group_size {g}.")
        if experts.shard_count > 1:
            _check(i_loc % g == 0, f"{name} (moe intermediate): this rank's part [{experts.shard_rank * i_loc}, "
                                   f"{(experts.shard_rank + 1) * i_loc}) of {experts.intermediate_size} cuts a "
                                   f"{g}-wide int4 quantization group; choose a tensor-parallel size whose split is "
                                   f"a multiple of it (or --enable-expert-parallel).")
        self.hidden = h
        device = experts.w13.device
        experts.register_parameter("w13", None)
        experts.register_parameter("w2", None)
        _make(experts, self.cfg, "w13_", (e,), 2 * i_loc, h, 2, device)
        _make(experts, self.cfg, "w2_", (e,), h, i_loc, 1, device)
        experts.quant_method = self

    def param_name(self, param: str, kind: str) -> str:
        return f"{param}_{kind}"

    def load(self, experts, param: str, kind: str, tensor, expert_id: int | None, proj: str) -> int:
        if expert_id is None:
            raise Int4Error("fused (all-experts) int4 tensors are not supported; per-expert ones are.")
        if kind not in self.cfg.kinds:
            raise Int4Error(f"is not a {self.cfg.method} tensor (expected {', '.join(self.cfg.kinds)})")
        local = experts.local_id(expert_id)
        if local < 0:
            return 0
        inter, h, i_loc = experts.intermediate_size, self.hidden, experts.local_intermediate
        start = experts.shard_rank * i_loc
        role = _ROLE[kind]
        if proj in ("gate", "up"):
            full, out_r, in_r, dst, row = (inter, h), (start, i_loc), (0, h), (0 if proj == "gate" else i_loc), \
                (0 if proj == "gate" else 1)
        elif proj == "down":
            full, out_r, in_r, dst, row = (h, inter), (0, h), (start, i_loc), 0, 0
        else:
            raise Int4Error(f"int4 projection {proj!r} is not supported (per-expert gate/up/down only).")
        if role == "shape":
            return _check_shape_tensor(tensor, full)
        target = getattr(experts, self.param_name(param, kind)).data[local]
        if role == "g_idx":
            part = _check_gidx(tensor, full[1], in_r[0], in_r[1], self.cfg.group)
            target[row].copy_(part)
            return part.numel()
        part = _convert_part(self.cfg, kind, tensor, out_r, in_r, full)
        target.narrow(0, dst, part.shape[0]).copy_(part)
        return part.numel()

    def tensors(self, experts, which: str):
        c = self.cfg
        return (getattr(experts, f"{which}_{c.name_of('packed')}"), getattr(experts, f"{which}_{c.name_of('scales')}"),
                _zeros_of(experts, c, f"{which}_"))

    def finalize(self, experts) -> None:
        self.use_kernel = self.tensors(experts, "w13")[0].is_cuda

    def dequantize(self, experts, which: str, dtype) -> torch.Tensor:
        return dequantize(*self.tensors(experts, which), self.cfg.group, dtype)

    def apply(self, experts, x, weights, ids) -> torch.Tensor:
        from moeserve.layers.experts import experts_reference

        if self.use_kernel:
            from moeserve.kernels.fused_moe import fused_moe

            (p13, s13, z13), (p2, s2, z2) = self.tensors(experts, "w13"), self.tensors(experts, "w2")
            g = self.cfg.group
            return fused_moe(x, p13, p2, weights, ids, expert_map=experts.expert_map, w13_scale=s13, w2_scale=s2,
                             blocks={"w13": (1, g), "w2": (1, g)}, w13_zeros=z13, w2_zeros=z2)
        w13, w2 = self.dequantize(experts, "w13", x.dtype), self.dequantize(experts, "w2", x.dtype)
        return experts_reference(x, w13, w2, weights, ids, experts.expert_map)


# ---- dummy weights -------------------------------------------------------------------------------------------

def fill_dummy_int4(model: nn.Module, gen: torch.Generator, high: float = 1e-3) -> set[int]:
    """Random 4-bit codes with scales such that (q - z) * s lies in [-high, high] (as the bf16 dummy); the ids of
    the tensors filled."""
    done = set()
    for m in model.modules():
        qm = getattr(m, "quant_method", None)
        if not isinstance(qm, (Int4LinearMethod, Int4MoEMethod)):
            continue
        for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            base = pname.split("_", 1)[1] if pname.startswith(("w13_", "w2_")) else pname
            role = _ROLE.get(base)
            if role == "packed":
                p.data.copy_(torch.randint(-2 ** 31, 2 ** 31, p.shape, generator=gen, dtype=torch.int64,
                                           device=p.device).to(torch.int32))
            elif role == "scales":
                p.data.fill_(high / 8)
            elif role == "zeros":
                p.data.fill_(8)
            elif role == "g_idx":
                p.data.copy_((torch.arange(p.shape[-1], device=p.device) // qm.cfg.group).expand(p.shape))
            else:
                continue
            done.add(id(p))
    return done
