"""FP8 (e4m3) weights: the block-scaled checkpoints DeepSeek-V3/R1, Kimi K2 and Qwen3-*-FP8 ship, and online
quantization of a bf16 checkpoint (`--quantization fp8`).

Checkpoint format (block): `<m>.weight` float8_e4m3fn [N, K] and `<m>.weight_scale_inv` fp32
[ceil(N/bn), ceil(K/bk)] (despite the name it multiplies: W = weight * scale over each bn x bk block), with
`quantization_config = {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [bn, bk]}`.
Online (per channel): each output row quantized on load with scale = amax(row) / 448, stored as a [N, 1] scale
(one "block" of 1 x K), so both modes share one representation: `weight` fp8 + `weight_scale_inv` fp32 blocks.
Per-channel and per-tensor checkpoints (compressed-tensors `float-quantized`, strategy channel / tensor; and
`quant_method: fp8` without `weight_block_size`, AutoFP8's per-tensor format) ship `<m>.weight_scale` fp32, [N, 1]
or one value per tensor: loaded into the same [N, 1] rows (a tensor's one scale repeated over its rows, so merged
q/k/v and gate/up keep each part's scale). Their static `input_scale`s are not used: activations are quantized per
token, dynamically, on CUDA as for the other modes. compressed-tensors block strategy (`block_structure`) is
the block format under the name `weight_scale`.

How it plugs in: `apply_fp8(model, cfg)` runs on the model built on the meta device, before storage is given; it
replaces the weight of every linear layer and routed-experts module not in `modules_to_not_convert` /
`ignored_layers` with fp8 storage plus its scale parameter, and sets `layer.quant_method`. Each parameter keeps a
weight loader that reads only this rank's part: the scale shards with its weight in block units, and a TP split
that cuts a block is refused when the model is built.

Forward: CPU dequantizes (weight * scale -> activation dtype) and runs the dense matmul: the reference. CUDA
(chosen once in `finalize`): kernels.fp8_linear's W8A8 GEMM (block or per-channel) for the linear layers;
kernels.fused_moe with the scales for the experts (W8A16: fp8 weight tiles widened and scaled inside the kernel).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from moeserve.layers.quant import compressed_tensors_group
from moeserve.loader.tensor_slices import materialize, narrow, shape_of

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE = "weight_scale_inv"


class ScaleError(ValueError):
    """A scale tensor that does not fit its weight; the loader prefixes the tensor's name."""


@dataclass
class Fp8Config:
    block: tuple[int, int] | None  # (bn, bk) from the checkpoint; None: one scale per output row
    ignored: list[str] = field(default_factory=list)
    online: bool = False  # block None: the row scales are computed on load (--quantization fp8), not read
    scale_name: str = SCALE  # what the checkpoint calls its scale tensors (compressed-tensors, AutoFP8: weight_scale)

    def skips(self, prefix: str) -> bool:
        """vLLM's reading of modules_to_not_convert / ignored_layers / compressed-tensors' ignore: a listed name
        matches a module whose dotted name equals it, ends with it, or contains it as a dotted component path;
        "re:<pattern>" matches by regular expression."""
        return any(re.match(n[3:], prefix) if n.startswith("re:") else
                   prefix == n or prefix.endswith("." + n) or f".{n}." in f".{prefix}." for n in self.ignored)


def resolve_quantization(flag: str | None, hf_config: dict) -> Fp8Config | None:
    """The weight precision: the checkpoint's quantization_config, or the --quantization flag (vLLM semantics: the
    flag may be omitted when the checkpoint says fp8; a conflicting flag is an error)."""
    q = hf_config.get("quantization_config") or (hf_config.get("text_config") or {}).get("quantization_config")
    method = (q or {}).get("quant_method")
    if flag not in (None, "fp8", "compressed-tensors"):
        raise ValueError(f"--quantization {flag}: only fp8 is implemented (block-scaled FP8 checkpoints, or "
                         f"online FP8 of a bf16/fp32 checkpoint).")
    if method is None:
        if flag == "compressed-tensors":
            raise ValueError("--quantization compressed-tensors: the checkpoint has no quantization_config.")
        return Fp8Config(block=None, online=True) if flag == "fp8" else None
    if method == "compressed-tensors" and flag in (None, "compressed-tensors"):
        return _compressed_tensors_fp8(q)
    if method != "fp8" or flag == "compressed-tensors":
        raise ValueError(f"the checkpoint's quantization_config says quant_method={method!r}"
                         + (f", which conflicts with --quantization {flag}" if flag else "")
                         + "; moeserve loads quant_method 'fp8' only (for now).")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"fp8 checkpoint with fmt={q.get('fmt')!r}: only e4m3 weights are supported.")
    ignored = list(q.get("modules_to_not_convert") or []) + list(q.get("ignored_layers") or [])
    block = q.get("weight_block_size")
    if block is None:  # per-tensor weight_scale (AutoFP8); a static input_scale is not used (module docstring)
        return Fp8Config(block=None, ignored=ignored, scale_name="weight_scale")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("block fp8 checkpoint with static activation scales: only activation_scheme 'dynamic' is "
                         "supported.")
    return Fp8Config(block=(int(block[0]), int(block[1])), ignored=ignored)


def _compressed_tensors_fp8(q: dict) -> Fp8Config:
    """compressed-tensors float8 weights: one scale per output channel, per tensor, or per block."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"compressed-tensors checkpoint with {what}: not supported (moeserve loads float8 "
                             f"weights with per-channel, per-tensor or block scales, and int4 pack-quantized ones).")

    g, w, fmt = compressed_tensors_group(q, need)
    a = g.get("input_activations")
    need(fmt in ("float-quantized", "naive-quantized"), f"format={fmt!r}")
    need(w.get("num_bits") == 8 and w.get("type") == "float",
         f"config_groups weights num_bits={w.get('num_bits')} type={w.get('type')!r}")
    strategy = w.get("strategy")
    need(strategy in ("channel", "tensor", "block"), f"config_groups weights strategy={strategy!r}")
    need(a is None or (a.get("num_bits") == 8 and a.get("type") == "float"),
         f"config_groups input_activations {a}")
    ignored = list(q.get("ignore") or [])
    if strategy == "block":
        block = w.get("block_structure")
        need(isinstance(block, list) and len(block) == 2, f"config_groups weights block_structure={block!r}")
        return Fp8Config(block=(int(block[0]), int(block[1])), ignored=ignored, scale_name="weight_scale")
    return Fp8Config(block=None, ignored=ignored, scale_name="weight_scale")


# ---- building ----------------------------------------------------------------------------------------------

def apply_fp8(model: nn.Module, cfg: Fp8Config) -> None:
    """Give every convertible linear layer and experts module fp8 weights + scales (model on the meta device)."""
    from moeserve.layers.experts import Experts
    from moeserve.layers.linear import LinearBase

    for name, m in model.named_modules():
        if cfg.skips(name):
            continue
        if isinstance(m, LinearBase) and m.quant_method is None:
            Fp8LinearMethod(cfg).create_weights(m, name)
        elif isinstance(m, Experts) and getattr(m, "quant_method", None) is None:
            Fp8MoEMethod(cfg).create_weights(m, name)


# Layers whose weight the model reads directly instead of calling them (MLA absorbs kv_b_proj into its attention):
# loaded as fp8 with their scales, then dequantized once to the model dtype.
DENSE_AFTER_LOAD = ("kv_b_proj",)


def finalize(model: nn.Module) -> None:
    """After the weights are in: each fp8 layer chooses its forward (CPU reference or CUDA kernel) once."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point and p.dtype != FP8), None)
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if isinstance(qm, (Fp8LinearMethod, Fp8MoEMethod)):
            qm.finalize(m)
            if isinstance(qm, Fp8LinearMethod) and name.rsplit(".", 1)[-1] in DENSE_AFTER_LOAD:
                m.weight = nn.Parameter(qm.dequantize(m, dtype), requires_grad=False)
                delattr(m, SCALE)
                m.quant_method = None


def _check_aligned(what: str, start: int, n: int, full: int, block: int) -> None:
    if start % block or (n % block and start + n != full):
        raise ValueError(f"{what}: this rank's part [{start}, {start + n}) of {full} cuts a {block}-wide fp8 scale "
                         f"block; choose a tensor-parallel size whose split is a multiple of the block size.")


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


def _row_pieces(layer, shard_id) -> tuple[int, list[tuple[int, int, int, int]]]:
    """How the layer's loader places a checkpoint tensor (or shard) along the split dim:
    (dim, [(start in the logical output, length, first row of the local param, full length of that output)]);
    with shard_id None a merged layer lists its outputs in order (the loaded tensor is their concatenation)."""
    from moeserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                        RowParallelLinear)

    if isinstance(layer, QKVParallelLinear) or isinstance(layer, MergedColumnParallelLinear):
        ids = range(len(layer.output_sizes)) if shard_id is None else [{"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)]
        pieces = []
        for i in ids:
            n = layer.local_sizes[i]
            if isinstance(layer, QKVParallelLinear):
                start = (layer.tp_rank * layer.num_heads if i == 0 else layer.kv_head_start) * layer.head_dim
            else:
                start = layer.tp_rank * n
            pieces.append((start, n, sum(layer.local_sizes[:i]), layer.output_sizes[i]))
        return 0, pieces
    if isinstance(layer, ColumnParallelLinear):
        n = layer.out_features
        return 0, [(layer.tp_rank * n, n, 0, layer.output_size)]
    if isinstance(layer, RowParallelLinear):
        k = layer.in_features
        return 1, [(layer.tp_rank * k, k, 0, layer.input_size)]
    return 0, [(0, layer.out_features, 0, layer.out_features)]


class Fp8LinearMethod:
    name = "fp8"

    def __init__(self, cfg: Fp8Config):
        self.cfg = cfg
        self.use_kernel = False

    def create_weights(self, layer: nn.Module, name: str) -> None:
        n, k = layer.out_features, layer.in_features
        dim, all_pieces = _row_pieces(layer, None)
        if self.cfg.block is None:
            bn, bk = 1, k
        else:
            bn, bk = self.cfg.block
            for src, length, _, full in all_pieces:
                _check_aligned(name, src, length, full, bn if dim == 0 else bk)
        # scale rows per local segment along dim 0 (merged layers keep each logical output's blocks apart)
        row_segments = [(dst, length) for _, length, dst, _ in all_pieces] if dim == 0 else [(0, n)]
        self.block = (bn, bk)
        self.segments = []  # (first local row, rows, first scale row)
        s = 0
        for dst, length in sorted(row_segments):
            self.segments.append((dst, length, s))
            s += _blocks(length, bn)
        device = layer.weight.device
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=FP8, device=device), requires_grad=False)
        scale = torch.empty(s, _blocks(k, bk), dtype=torch.float32, device=device)
        if self.cfg.online:  # computed on load, not read from the checkpoint: a buffer
            layer.register_buffer(SCALE, scale)
        else:
            layer.register_parameter(SCALE, nn.Parameter(scale, requires_grad=False))
        layer.quant_method = self
        _attach(layer, self)

    # ---- loading -----------------------------------------------------------------------------------------
    def scale_loader(self, layer, param, loaded, shard_id=None) -> int:
        """The scale blocks of this rank's part, placed as the layer's loader places the weight rows."""
        bn, bk = self.block
        dim, pieces = _row_pieces(layer, shard_id)
        b = bn if dim == 0 else bk
        written = 0
        if shard_id is None and dim == 0 and len(pieces) > 1:  # merged tensor arriving whole: split in blocks
            offsets, start = [], 0
            for _, _, _, full in pieces:
                offsets.append(start)
                start += _blocks(full, bn)
            expected = (start, param.shape[1])
            if shape_of(loaded) != expected:
                raise ScaleError(f"scale tensor has shape {shape_of(loaded)}, expected {expected}")
            for (src, length, dst, full), off in zip(pieces, offsets):
                written += self._copy_piece(layer, param, narrow(loaded, 0, off, _blocks(full, bn)), src, length, dst)
            return written
        for src, length, dst, full in pieces:
            full_shape = [_blocks(full, bn), _blocks(layer.in_features, bk)] if dim == 0 else \
                [_blocks(layer.out_features, bn), _blocks(full, bk)]
            if shape_of(loaded) != tuple(full_shape):
                raise ScaleError(f"scale tensor has shape {shape_of(loaded)}, but the weight implies "
                                 f"{tuple(full_shape)} ({bn}x{bk} blocks)")
            if dim == 1:
                part = materialize(narrow(loaded, 1, src // b, _blocks(length, b)))
                param.data.copy_(part)
                written += part.numel()
            else:
                written += self._copy_piece(layer, param, loaded, src, length, dst)
        return written

    def row_scale_loader(self, layer, param, loaded, shard_id=None) -> int:
        """A per-channel ([rows] or [rows, 1]) or per-tensor ([] or [1]) checkpoint scale into the local rows' [N, 1]
        scales: the rows this rank holds, a tensor's one scale repeated over its rows."""
        dim, pieces = _row_pieces(layer, shard_id)
        if dim == 1:  # the input dim is split (row-parallel): every output row is on this rank
            pieces = [(0, layer.out_features, 0, layer.out_features)]
        offsets, rows = [], 0  # where each logical output starts in the tensor (merged ones arriving whole)
        for *_, full in pieces:
            offsets.append(rows)
            rows += full
        t = _row_scales(loaded, rows, "the weight")
        for (src, length, dst, _), off in zip(pieces, offsets):
            param.data[dst:dst + length, 0] = t if t.numel() == 1 else t[off + src:off + src + length]
        return sum(length for _, length, _, _ in pieces)

    def _copy_piece(self, layer, param, loaded, src: int, length: int, dst: int) -> int:
        bn = self.block[0]
        seg = next(s for s in self.segments if s[0] == dst)
        part = materialize(narrow(loaded, 0, src // bn, _blocks(length, bn)))
        param.data.narrow(0, seg[2], part.shape[0]).copy_(part)
        return part.numel()

    # ---- forward -----------------------------------------------------------------------------------------
    def finalize(self, layer) -> None:
        bn, bk = self.block
        n, k = layer.out_features, layer.in_features
        rows = torch.empty(n, dtype=torch.long)
        for first, length, srow in self.segments:
            rows[first:first + length] = srow + torch.arange(length) // bn
        self.row_index = rows.to(layer.weight.device)
        self.col_index = (torch.arange(k) // bk).to(layer.weight.device)
        self.use_kernel = layer.weight.is_cuda and (self.cfg.block is None or self._kernel_fits(layer))

    def _kernel_fits(self, layer) -> bool:
        """The Triton GEMM wants one scale row per bn rows of the whole weight (no partial block inside)."""
        bn, bk = self.block
        return bk >= 32 and not bk & (bk - 1) and all(first % bn == 0 and (length % bn == 0 or first + length == layer.out_features)
                   for first, length, _ in self.segments)

    def dequantize(self, layer, dtype=torch.float32) -> torch.Tensor:
        scale = getattr(layer, SCALE)
        full = scale.index_select(0, self.row_index).index_select(1, self.col_index)
        return (layer.weight.to(torch.float32) * full).to(dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None | bool = True) -> torch.Tensor:
        b = layer.bias if bias is True else (None if bias is False else bias)
        if self.use_kernel and x.dim() >= 2:
            from moeserve.kernels.fp8_linear import fp8_block_linear, fp8_channel_linear

            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if self.cfg.block is None:
                y = fp8_channel_linear(x2, layer.weight, getattr(layer, SCALE), b)
            else:
                y = fp8_block_linear(x2, layer.weight, getattr(layer, SCALE), self.block, b)
            return y.reshape(*shape[:-1], y.shape[-1])
        return torch.nn.functional.linear(x, self.dequantize(layer, x.dtype), b)

    def apply_nobias(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.apply(layer, x, bias=False)


def _attach(layer: nn.Module, qm: Fp8LinearMethod) -> None:
    from moeserve.layers.linear import attach_weight_loaders

    attach_weight_loaders(layer)


def weight_loader_for(module: nn.Module, pname: str, default):
    """The loader of one parameter of a quantized module (linear.attach_weight_loaders asks)."""
    qm = getattr(module, "quant_method", None)
    if isinstance(qm, Fp8LinearMethod):
        if pname == SCALE:
            return partial(qm.scale_loader if qm.cfg.block else qm.row_scale_loader, module)
        if pname == "weight" and qm.cfg.online:
            return partial(online_loader, module, default)
    return default


# ---- online quantization -----------------------------------------------------------------------------------

def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: (e4m3 weight, fp32 scale [N, 1]) with w ~= q * scale."""
    w = w.to(torch.float32)
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def online_loader(layer, layer_loader, param, loaded, shard_id=None) -> int:
    """Load a bf16/fp32 tensor into an fp8 weight. The layer's own loader writes this rank's part into a staging
    tensor of the local shard's size (one layer at a time, on the weight's device); once every row has arrived
    (merged layers get their parts one by one) it is quantized per row and freed."""
    staging = getattr(layer, "_fp8_staging", None)
    if staging is None:
        staging = layer._fp8_staging = [torch.empty(param.shape, dtype=torch.float32, device=param.device), 0]
    n = layer_loader(staging[0], loaded) if shard_id is None else layer_loader(staging[0], loaded, shard_id)
    staging[1] += n
    if staging[1] >= param.numel():
        q, s = quantize_rows(staging[0])
        param.data.copy_(q)
        getattr(layer, SCALE).data.copy_(s)
        del layer._fp8_staging
    return n


# ---- experts ---------------------------------------------------------------------------------------------

class Fp8MoEMethod:
    """Routed experts with fp8 w13 [E, 2I, H] / w2 [E, H, I] and per-expert scale blocks
    w13_weight_scale_inv [E, 2*ceil(I/bn), ceil(H/bk)], w2_weight_scale_inv [E, ceil(H/bn), ceil(I/bk)]; online:
    one scale per row (w13 [E, 2I, 1], w2 [E, H, 1]), computed as each expert's rows arrive."""

    name = "fp8"

    def __init__(self, cfg: Fp8Config):
        self.cfg = cfg

    def create_weights(self, experts: nn.Module, name: str) -> None:
        e, i_loc, h = experts.num_local, experts.local_intermediate, experts.w13.shape[2]
        if self.cfg.block is None:
            self.blocks = {"w13": (1, h), "w2": (1, i_loc)}
        else:
            bn, bk = self.cfg.block
            self.blocks = {"w13": (bn, bk), "w2": (bn, bk)}
            if experts.shard_count > 1:
                _check_aligned(f"{name} (moe intermediate)", experts.shard_rank * i_loc, i_loc,
                               experts.intermediate_size, math.lcm(bn, bk))
        (bn1, bk1), (bn2, bk2) = self.blocks["w13"], self.blocks["w2"]
        device = experts.w13.device
        experts.w13 = nn.Parameter(torch.empty(e, 2 * i_loc, h, dtype=FP8, device=device), requires_grad=False)
        experts.w2 = nn.Parameter(torch.empty(e, h, i_loc, dtype=FP8, device=device), requires_grad=False)
        scales = {"w13": torch.empty(e, 2 * _blocks(i_loc, bn1), _blocks(h, bk1), device=device),
                  "w2": torch.empty(e, _blocks(h, bn2), _blocks(i_loc, bk2), device=device)}
        for w, t in scales.items():
            if self.cfg.online:  # computed on load, not read from the checkpoint: buffers
                experts.register_buffer(f"{w}_{SCALE}", t.to(torch.float32))
            else:
                experts.register_parameter(f"{w}_{SCALE}", nn.Parameter(t.to(torch.float32), requires_grad=False))
        if self.cfg.online:
            experts.load_weight = partial(self.online_load_weight, experts, experts.load_weight)
        experts.quant_method = self

    def online_load_weight(self, experts, load_weight, param: str, tensor, expert_id: int | None, proj: str) -> int:
        """Experts.load_weight into a float staging tensor (one expert's rows; a fused tensor: the layer's), then
        every row it wrote quantized with its own scale."""
        target = getattr(experts, param)
        if expert_id is None:
            staging = torch.empty(target.shape, dtype=torch.float32, device=target.device)
        else:  # every expert's slot is the same buffer: only expert_id's is written
            staging = torch.empty(target.shape[1:], dtype=torch.float32, device=target.device).expand(target.shape)
        experts._parameters[param] = nn.Parameter(staging, requires_grad=False)
        try:
            n = load_weight(param, tensor, expert_id, proj)
        finally:
            experts._parameters[param] = target
        if n == 0:
            return 0
        i_loc = experts.local_intermediate
        first, count = {"gate": (0, i_loc), "up": (i_loc, i_loc)}.get(proj, (0, target.shape[1]))
        experts_here = slice(None) if expert_id is None else slice(l := experts.local_id(expert_id), l + 1)
        rows = staging[experts_here, first:first + count]
        q, s = quantize_rows(rows.reshape(-1, rows.shape[-1]))
        target.data[experts_here, first:first + count] = q.reshape(rows.shape)
        getattr(experts, f"{param}_{SCALE}")[experts_here, first:first + count] = s.reshape(*rows.shape[:-1], 1)
        return n

    def load_scale(self, experts, param: str, tensor, expert_id: int | None, proj: str) -> int:
        """One expert's scale blocks (gate / up [ceil(I/bn), ceil(H/bk)], down [ceil(H/bn), ceil(I/bk)]), or its
        per-channel / per-tensor scales."""
        if expert_id is None:
            raise ValueError("fused (all-experts) fp8 scale tensors are not supported yet; per-expert ones are.")
        local = experts.local_id(expert_id)
        if local < 0:
            return 0
        if self.cfg.block is None:
            return self._load_row_scale(experts, param, tensor, local, proj)
        bn, bk = self.cfg.block
        inter, h, i_loc = experts.intermediate_size, experts.w13.shape[2], experts.local_intermediate
        if proj in ("gate", "up"):
            full, dim, b = (_blocks(inter, bn), _blocks(h, bk)), 0, bn
        elif proj == "down":
            full, dim, b = (_blocks(h, bn), _blocks(inter, bk)), 1, bk
        else:
            raise ValueError(f"fp8 scale for projection {proj!r} is not supported (per-expert gate/up/down only).")
        if shape_of(tensor) != full:
            raise ScaleError(f"scale tensor has shape {shape_of(tensor)}, but the weight implies {full} "
                             f"({bn}x{bk} blocks)")
        part = materialize(narrow(tensor, dim, experts.shard_rank * i_loc // b, _blocks(i_loc, b)))
        target = getattr(experts, f"{param}_weight_scale_inv").data[local]
        if proj != "down":
            half = target.shape[0] // 2
            target = target[:half] if proj == "gate" else target[half:]
        target.copy_(part)
        return part.numel()

    def _load_row_scale(self, experts, param: str, tensor, local: int, proj: str) -> int:
        """gate / up: [I] or [I, 1] (this rank's 1/tp of them under TP) or one value; down: [H] or [H, 1] or one."""
        if proj not in ("gate", "up", "down"):
            raise ValueError(f"fp8 scale for projection {proj!r} is not supported (per-expert gate/up/down only).")
        rows = experts.intermediate_size if proj in ("gate", "up") else experts.w13.shape[2]
        t = _row_scales(tensor, rows, f"the {proj} weight")
        target = getattr(experts, f"{param}_{SCALE}").data[local, :, 0]
        if proj != "down":
            i_loc = experts.local_intermediate
            target = target[:i_loc] if proj == "gate" else target[i_loc:]
            if t.numel() > 1:
                t = t[experts.shard_rank * i_loc:(experts.shard_rank + 1) * i_loc]
        target.copy_(t.expand(target.shape[0]))
        return target.numel()

    def finalize(self, experts) -> None:
        """CUDA: kernels.fused_moe with the scales (W8A16: fp8 tiles widened and scaled in the kernel), chosen once
        here; CPU: the reference."""
        self.use_kernel = experts.w13.is_cuda

    def dequantize(self, experts, which: str, dtype) -> torch.Tensor:
        bn, bk = self.blocks[which]
        w = getattr(experts, which)
        s = getattr(experts, f"{which}_weight_scale_inv")
        if which == "w13":  # gate and up blocks apart: expand each half on its own
            half = w.shape[1] // 2
            sh = s.shape[1] // 2
            parts = [_expand(w[:, j * half:(j + 1) * half], s[:, j * sh:(j + 1) * sh], bn, bk) for j in (0, 1)]
            return torch.cat(parts, dim=1).to(dtype)
        return _expand(w, s, bn, bk).to(dtype)

    def apply(self, experts, x, weights, ids) -> torch.Tensor:
        from moeserve.layers.experts import experts_reference

        if getattr(self, "use_kernel", False):
            from moeserve.kernels.fused_moe import fused_moe

            return fused_moe(x, experts.w13, experts.w2, weights, ids, expert_map=experts.expert_map,
                             w13_scale=experts.w13_weight_scale_inv, w2_scale=experts.w2_weight_scale_inv,
                             blocks=self.blocks)
        w13, w2 = self.dequantize(experts, "w13", x.dtype), self.dequantize(experts, "w2", x.dtype)
        return experts_reference(x, w13, w2, weights, ids, experts.expert_map)


def _row_scales(loaded, rows: int, what: str) -> torch.Tensor:
    """A per-channel ([rows] or [rows, 1]) or per-tensor ([] or [1]) checkpoint scale, flat fp32; ScaleError for
    any other shape."""
    t = materialize(loaded).to(torch.float32).reshape(-1)
    if t.numel() not in (1, rows):
        raise ScaleError(f"scale tensor has shape {shape_of(loaded)}, but {what} implies one scale per tensor or per "
                         f"output row ({rows})")
    return t


def _expand(w: torch.Tensor, s: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """w [..., N, K] fp8 times its block scales s [..., ceil(N/bn), ceil(K/bk)], in fp32."""
    n, k = w.shape[-2:]
    full = s.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return w.to(torch.float32) * full


def quantize_act_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of kernels.fp8_linear's dynamic activation quantization: x [M, K] -> (e4m3 [M, K], fp32 scales
    [M, ceil(K/group)]), per token per group of columns, scale = amax / 448."""
    m, k = x.shape
    g = _blocks(k, group)
    pad = torch.zeros(m, g * group, dtype=torch.float32, device=x.device)
    pad[:, :k] = x.float()
    tiles = pad.reshape(m, g, group)
    scale = tiles.abs().amax(dim=2).clamp(min=1e-10) / FP8_MAX
    q = (tiles / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(m, -1)[:, :k].to(FP8)
    return q, scale


# ---- test and dummy helpers ----------------------------------------------------------------------------------

def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's block quantization of w [N, K]: (e4m3 weight, fp32 weight_scale_inv [ceil(N/bn), ceil(K/bk)])."""
    bn, bk = block
    n, k = w.shape
    w = w.to(torch.float32)
    pad = torch.zeros(_blocks(n, bn) * bn, _blocks(k, bk) * bk, device=w.device)
    pad[:n, :k] = w
    tiles = pad.reshape(_blocks(n, bn), bn, _blocks(k, bk), bk)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(pad.shape)[:n, :k].to(FP8)
    return q.contiguous(), scale


def scales_named_weight_scale(model: nn.Module) -> bool:
    """Whether the checkpoint of the model's fp8 layers names their scales `weight_scale` (compressed-tensors,
    AutoFP8), beside static `input_scale`s, rather than `weight_scale_inv`."""
    return any(isinstance(qm := getattr(m, "quant_method", None), (Fp8LinearMethod, Fp8MoEMethod))
               and qm.cfg.scale_name == "weight_scale" for m in model.modules())


def fill_dummy_fp8(model: nn.Module, gen: torch.Generator, high: float = 1e-3) -> set[int]:
    """Random fp8 weights with scales such that weight * scale lies in [-high, high] (as the bf16 dummy); returns
    the ids of the parameters filled."""
    done = set()
    for m in model.modules():
        qm = getattr(m, "quant_method", None)
        if not isinstance(qm, (Fp8LinearMethod, Fp8MoEMethod)):
            continue
        for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if p.dtype == FP8:
                r = torch.empty(p.shape, device=p.device).uniform_(-FP8_MAX, FP8_MAX, generator=gen)
                p.data.copy_(r.to(FP8))
            elif pname.endswith(SCALE):
                p.data.fill_(high / FP8_MAX)
            else:
                continue
            done.add(id(p))
    return done
