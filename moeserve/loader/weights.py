"""Put checkpoint tensors into a model's parameters, each through its parameter's `weight_loader`, which reads
only this rank's part (tensors may be lazy safetensors slices).

Names map one to one, except:
  - merged parameters: the model's `packed_modules` (e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}) send
    `...q_proj.weight` to `...qkv_proj.weight` with shard id 0, `k_proj` with 1, and so on;
  - experts, which checkpoints store one tensor per expert (gate/up/down or w1/w3/w2) or fused, and we store
    stacked: handed to the experts module's `load_weight(param, tensor, expert_id, proj)`.

On every rank each local parameter must be filled exactly once and every tensor must land somewhere (a tensor
for an expert on another rank lands there); the first mismatch is named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from moeserve.distributed.pipeline import missing_prefixes
from moeserve.layers.attention import KV_SCALE_NAMES, load_kv_scale
from moeserve.layers.linear import WeightShapeError
from moeserve.layers.quant.fp8 import ScaleError, scales_named_weight_scale
from moeserve.layers.quant.int4 import Int4Error
from moeserve.loader.tensor_slices import materialize, shape_of

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|w1|up_proj|w3|down_proj|w2)"
                         r"\.(?P<kind>weight|weight_scale_inv|qweight|qzeros|scales|g_idx|weight_packed|weight_scale"
                         r"|weight_shape)$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down",
         "gate_up_proj": "gate_up"}


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> int:
    """A parameter held whole on every rank (norms, router weights)."""
    if shape_of(loaded) != tuple(param.shape):
        raise WeightShapeError(shape_of(loaded), tuple(param.shape))
    param.data.copy_(materialize(loaded))
    return param.numel()


class WeightLoader:
    def __init__(self, model: nn.Module, source: str = "checkpoint"):
        self.params = dict(model.named_parameters())
        self.modules = dict(model.named_modules())
        self.source = source
        self.filled: dict[str, int] = {}  # parameter -> number of elements written on this rank
        self.shards_filled: dict[str, set] = {}  # merged parameter -> shard ids loaded (to name a missing one)
        self.tied = bool(getattr(model, "tie_word_embeddings", False))
        # e.g. DeepSeek-V3 / GLM-4.5 multi-token-prediction layers, stored after the last decoder layer
        self.skip = getattr(model, "skip_checkpoint_tensor", None)
        # modules held by other pipeline stages: their tensors are not this rank's
        self.elsewhere = missing_prefixes(model)
        self.packed = [(packed, i, part) for packed, parts in (getattr(model, "packed_modules", None) or {}).items()
                       for i, part in enumerate(parts)]
        self.model = model
        self.scale_alias = scales_named_weight_scale(model)

    def load(self, tensors: Iterable[tuple[str, object]]) -> None:
        for name, tensor in tensors:
            self.load_one(name, tensor)
        self.check_complete()

    def load_one(self, name: str, tensor, label: str | None = None) -> None:
        """label: the checkpoint's name of the tensor, when `name` is the parameter-side name it loads under."""
        label = label or name
        if self.skip is not None and self.skip(name):
            return
        if self.elsewhere and self._on_other_stage(name):
            return
        if self.scale_alias:  # compressed-tensors and AutoFP8 fp8 checkpoints (layers/quant/fp8)
            if name.endswith(".input_scale"):
                return  # static activation scales: activations are quantized per token instead
            if name.endswith(".weight_scale"):  # loads as weight_scale_inv, fp8's one name for a scale that multiplies
                return self.load_one(name + "_inv", tensor, label)
        if name in self.params:
            return self._load(name, label, tensor)
        if name == "lm_head.weight" and self.tied:
            return  # tied checkpoints sometimes store it anyway
        if name.endswith("rotary_emb.inv_freq"):
            return
        if name.rpartition(".")[2] in KV_SCALE_NAMES and load_kv_scale(self.model, name, materialize(tensor)):
            return  # an fp8 KV-cache scale onto its attention front (a host float, read once)
        if name.endswith(".weight_shape") and not _PER_EXPERT.match(name):
            return self._check_int4_shape(name, tensor)
        m = _PER_EXPERT.match(name)
        if m:
            param = "w2" if m["proj"] in ("down_proj", "w2") else "w13"
            if m["kind"] not in ("weight", "weight_scale_inv"):  # int4 tensors (layers/quant/int4)
                return self._load_expert_int4(m["prefix"], param, m["kind"], tensor, int(m["e"]), m["proj"], label)
            if m["kind"] == "weight_scale_inv":  # fp8 scales (layers/quant/fp8)
                return self._load_expert_scale(m["prefix"], param, tensor, int(m["e"]), m["proj"], label)
            return self._load_expert(m["prefix"], param, tensor, int(m["e"]), m["proj"], label)
        m = _FUSED.match(name)
        if m:
            return self._load_expert(m["prefix"], "w13" if m["proj"] == "gate_up_proj" else "w2", tensor, None,
                                     m["proj"], label)
        for packed, shard_id, part in self.packed:
            if f".{part}." in name:
                pname = name.replace(f".{part}.", f".{packed}.")
                if pname in self.params:
                    self.shards_filled.setdefault(pname, set()).add(shard_id)
                    return self._load(pname, label, tensor, shard_id)
        raise ValueError(f"{self.source}: tensor {label!r} matches no parameter of the model "
                         f"(the checkpoint does not match config.json).")

    def _on_other_stage(self, name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in self.elsewhere for i in range(1, len(parts)))

    def _load(self, pname: str, label: str, tensor, shard_id=None) -> None:
        param = self.params[pname]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            n = loader(param, tensor) if shard_id is None else loader(param, tensor, shard_id)
        except WeightShapeError as e:
            raise ValueError(f"{self.source}: tensor {label!r} has shape {e.got}, but the config implies "
                             f"{e.expected}.") from None
        except ScaleError as e:  # an fp8 scale that does not fit its weight
            raise ValueError(f"{self.source}: tensor {label!r}: {e}.") from None
        except Int4Error as e:  # an int4 tensor that does not fit its layer
            raise ValueError(f"{self.source}: tensor {label!r} {e}.") from None
        self._count(pname, label, n)

    def _count(self, pname: str, label: str, n: int) -> None:
        self.filled[pname] = self.filled.get(pname, 0) + n
        if self.filled[pname] > self.params[pname].numel():
            raise ValueError(f"{self.source}: tensor {label!r} writes parameter {pname!r} a second time.")

    def _load_expert(self, prefix: str, param: str, tensor, expert_id: int | None, proj: str, label: str) -> None:
        pname = f"{prefix}.{param}"
        if pname not in self.params:
            raise ValueError(f"{self.source}: tensor {label!r} matches no parameter of the model.")
        experts = self.modules[prefix]
        if hasattr(experts, "load_weight"):
            try:
                n = experts.load_weight(param, tensor, expert_id, _PROJ[proj])
            except ValueError as e:
                raise ValueError(f"{self.source}: tensor {label!r}: {e}") from None
            return self._count(pname, label, n)
        self._copy_expert(pname, tensor, expert_id, _PROJ[proj], label)

    def _load_expert_scale(self, prefix: str, param: str, tensor, expert_id: int, proj: str, label: str) -> None:
        pname = f"{prefix}.{param}_weight_scale_inv"
        qm = getattr(self.modules.get(prefix), "quant_method", None)
        if pname not in self.params or qm is None:
            raise ValueError(f"{self.source}: tensor {label!r} is an fp8 scale, but {prefix} is not quantized "
                             f"(config.json has no fp8 quantization_config for it).")
        try:
            n = qm.load_scale(self.modules[prefix], param, tensor, expert_id, _PROJ[proj])
        except ValueError as e:
            raise ValueError(f"{self.source}: tensor {label!r}: {e}") from None
        self._count(pname, label, n)

    def _check_int4_shape(self, name: str, tensor) -> None:
        """compressed-tensors' weight_shape (N, K) of a linear layer: checked against the layer, not stored."""
        from moeserve.layers.quant.int4 import Int4LinearMethod

        prefix, shard_id = name[:-len(".weight_shape")], None
        if prefix not in self.modules:
            for packed, i, part in self.packed:
                if prefix.endswith(f".{part}") and prefix[:-len(part)] + packed in self.modules:
                    prefix, shard_id = prefix[:-len(part)] + packed, i
                    break
        m = self.modules.get(prefix)
        qm = getattr(m, "quant_method", None)
        if not isinstance(qm, Int4LinearMethod):
            raise ValueError(f"{self.source}: tensor {name!r} is an int4 tensor, but {prefix} is not int4-quantized.")
        try:
            qm.loader(m, "weight_shape", None, tensor, shard_id)
        except Int4Error as e:
            raise ValueError(f"{self.source}: tensor {name!r} {e}.") from None

    def _load_expert_int4(self, prefix: str, param: str, kind: str, tensor, expert_id: int, proj: str,
                          label: str) -> None:
        from moeserve.layers.quant.int4 import Int4MoEMethod

        qm = getattr(self.modules.get(prefix), "quant_method", None)
        if not isinstance(qm, Int4MoEMethod):
            raise ValueError(f"{self.source}: tensor {label!r} is an int4 tensor, but {prefix} is not int4-quantized "
                             f"(config.json has no awq/gptq/compressed-tensors quantization_config for it).")
        try:
            n = qm.load(self.modules[prefix], param, kind, tensor, expert_id, _PROJ[proj])
        except ValueError as e:
            raise ValueError(f"{self.source}: tensor {label!r} {e}") from None
        if n:
            self._count(f"{prefix}.{qm.param_name(param, kind)}", label, n)

    def _copy_expert(self, pname: str, tensor, expert_id: int | None, proj: str, label: str) -> None:
        """Experts held whole on every rank (until the experts module loads its own shards)."""
        target = self.params[pname].data
        if expert_id is not None:
            target = target[expert_id]
            if proj in ("gate", "up"):
                half = target.shape[0] // 2
                target = target[:half] if proj == "gate" else target[half:]
        shape = shape_of(tensor)
        if expert_id is None and shape != tuple(target.shape) and (shape[0], shape[2], shape[1]) == tuple(target.shape):
            tensor = materialize(tensor).transpose(1, 2)
            shape = tuple(tensor.shape)
        if shape != tuple(target.shape):
            raise ValueError(f"{self.source}: tensor {label!r} has shape {shape}, but the config implies "
                             f"{tuple(target.shape)}.")
        target.copy_(materialize(tensor))
        self._count(pname, label, target.numel())

    def check_complete(self) -> None:
        for pname, p in self.params.items():
            if self.filled.get(pname, 0) < p.numel():
                missing = self._missing_name(pname)
                if self.scale_alias and missing.endswith(".weight_scale_inv"):
                    missing = missing.removesuffix("_inv")  # the checkpoint's name of the scale
                raise ValueError(f"{self.source}: no weights for parameter {missing!r} "
                                 f"(the checkpoint does not match config.json).")

    def _missing_name(self, pname: str) -> str:
        """A merged parameter is named by the checkpoint tensor that did not come (e.g. ...up_proj.weight)."""
        for packed, shard_id, part in self.packed:
            if f".{packed}." in pname and shard_id not in self.shards_filled.get(pname, set()):
                return pname.replace(f".{packed}.", f".{part}.")
        return pname


def fill_dummy(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """Seeded small uniform values, as vLLM's dummy format does: no checkpoint needed. Parameters are this
    rank's shards, built directly; replicated ones come out equal on every rank (same shapes, same order)."""
    from moeserve.layers.quant.fp8 import fill_dummy_fp8
    from moeserve.layers.quant.int4 import fill_dummy_int4

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        done = fill_dummy_fp8(model, gen, high)  # fp8 weights with their scales (layers/quant/fp8)
        done |= fill_dummy_int4(model, gen, high)  # packed int4 codes, scales, zeros (layers/quant/int4)
        for p in model.parameters():
            if p.dtype.is_floating_point and id(p) not in done:
                p.uniform_(low, high, generator=gen)
