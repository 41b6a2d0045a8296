"""Linear layers, replicated or split over the tensor-parallel group, with the decode-sized GEMM of
kernels.linear on CUDA.

    ReplicatedLinear            every rank holds the whole weight (nn.Linear's parameters and names)
    ColumnParallelLinear        output features split: rank r holds rows [r*out/tp, (r+1)*out/tp) of W
    MergedColumnParallelLinear  several column-parallel outputs (gate | up) stored as [part_0 | part_1] per rank
    QKVParallelLinear           q, k, v heads split over ranks; KV heads replicated when fewer than ranks
    RowParallelLinear           input features split (the input is already split); partial sums all-reduced

A column-parallel layer followed by a row-parallel one needs a single all-reduce (Megatron's MLP/attention split).
Every parameter carries `weight_loader(param, loaded, shard_id=None) -> elements written`, which narrows the
checkpoint tensor (a torch tensor or a lazy safetensors slice) to this rank's part before reading it, so no rank
ever holds a full-size copy. At TP=1 each layer runs exactly the matmul a plain Linear runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.distributed.parallel_state import get_tp_group
from moeserve.loader.tensor_slices import materialize, narrow, shape_of


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through kernels.linear for a 2-D CUDA input."""
    if x.is_cuda and x.dim() == 2:
        from moeserve.kernels.linear import linear as cuda_linear

        return cuda_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class WeightShapeError(ValueError):
    """A checkpoint tensor whose full shape is not what the layer was built for; the loader names the tensor."""

    def __init__(self, got: tuple[int, ...], expected: tuple[int, ...]):
        super().__init__(f"has shape {got}, but the config implies {expected}")
        self.got, self.expected = got, expected


def check_shape(loaded, expected: tuple[int, ...]) -> None:
    got = shape_of(loaded)
    if got != tuple(expected):
        raise WeightShapeError(got, tuple(expected))


def copy_into(target: torch.Tensor, part) -> int:
    """Read `part` (already narrowed to this rank) into target; the number of elements written."""
    target.copy_(materialize(part))
    return target.numel()


def attach_weight_loaders(module: nn.Module) -> None:
    """Point each parameter's `weight_loader` at its layer's. Layers call this when built; model loading calls it
    again after `to_empty`, which replaces parameters (and drops their attributes) when leaving the meta device."""
    from moeserve.layers.quant import weight_loader_for

    for m in module.modules():
        loader = getattr(m, "weight_loader", None)
        if callable(loader):
            for name, p in m.named_parameters(recurse=False):
                p.weight_loader = (weight_loader_for(m, name, loader) if getattr(m, "quant_method", None) is not None
                                   else loader)


def divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} ({n}) does not split over {parts} tensor-parallel ranks.")
    return n // parts


class LinearBase(nn.Linear):
    """nn.Linear over this rank's part of the weight. `quant_method` (layers/quant/), once set, owns the weight:
    forward calls quant_method.apply(self, x) (bias included) instead of the dense matmul."""

    quant_method = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        attach_weight_loaders(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (small projections: MLA's down-projections, gates, routers)."""

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> int:
        check_shape(loaded, param.shape)
        return copy_into(param.data, loaded)


Linear = ReplicatedLinear  # the name the models used before tensor parallelism


class ColumnParallelLinear(LinearBase):
    """y_r = x W_r^T + b_r with W split by output rows; gather_output=True concatenates the ranks' y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 device=None, dtype=None):
        self.output_size = out_features
        self.gather_output = gather_output
        out_local = divide(out_features, get_tp_group().size, "output features")
        super().__init__(in_features, out_local, bias, device, dtype)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> int:
        full = (self.output_size,) + tuple(param.shape[1:])
        check_shape(loaded, full)
        n = param.shape[0]
        return copy_into(param.data, narrow(loaded, 0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return get_tp_group().all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one GEMM: each logical output (gate, up) is split over the ranks on its
    own, and rank r stores [gate_r | up_r]. Checkpoint tensors arrive one logical output at a time
    (shard_id = its index), or already merged (shard_id None: [gate | up] at full size)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True, device=None, dtype=None):
        tp = get_tp_group().size
        self.output_sizes = list(output_sizes)
        self.local_sizes = [divide(n, tp, "output features") for n in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, gather_output=False, device=device, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int | None = None) -> int:
        tail = tuple(param.shape[1:])
        if shard_id is None:
            check_shape(loaded, (sum(self.output_sizes),) + tail)
            start, written = 0, 0
            for i, size in enumerate(self.output_sizes):
                written += self.weight_loader(param, narrow(loaded, 0, start, size), i)
                start += size
            return written
        check_shape(loaded, (self.output_sizes[shard_id],) + tail)
        n = self.local_sizes[shard_id]
        target = param.data.narrow(0, sum(self.local_sizes[:shard_id]), n)
        return copy_into(target, narrow(loaded, 0, self.tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections in one GEMM, heads split over the TP ranks. Rank r holds query heads
    [r*H/tp, (r+1)*H/tp) and the KV heads those query heads read: KV/tp of them, or, with fewer KV heads than
    ranks, the one KV head its query heads share (replicated on tp/KV ranks). `num_heads` and `num_kv_heads`
    are this rank's counts."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = True, device=None, dtype=None):
        tp = get_tp_group()
        self.head_dim, self.total_num_heads, self.total_num_kv_heads = head_dim, total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp.size, "attention heads")
        if total_num_kv_heads >= tp.size:
            self.num_kv_heads = divide(total_num_kv_heads, tp.size, "KV heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            divide(tp.size, total_num_kv_heads, "the TP size over fewer KV heads")
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank // (tp.size // total_num_kv_heads)
        self.output_sizes = [total_num_heads * head_dim, total_num_kv_heads * head_dim, total_num_kv_heads * head_dim]
        self.local_sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]
        LinearBase.__init__(self, hidden_size, sum(self.local_sizes), bias, device, dtype)
        self.output_size, self.gather_output = sum(self.output_sizes), False

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int | str | None = None) -> int:
        tail = tuple(param.shape[1:])
        if shard_id is None:
            check_shape(loaded, (sum(self.output_sizes),) + tail)
            start, written = 0, 0
            for i, size in enumerate(self.output_sizes):
                written += self.weight_loader(param, narrow(loaded, 0, start, size), i)
                start += size
            return written
        i = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)
        check_shape(loaded, (self.output_sizes[i],) + tail)
        n = self.local_sizes[i]
        first_head = self.tp_rank * self.num_heads if i == 0 else self.kv_head_start
        target = param.data.narrow(0, sum(self.local_sizes[:i]), n)
        return copy_into(target, narrow(loaded, 0, first_head * self.head_dim, n))


class RowParallelLinear(LinearBase):
    """y = sum_r x_r W_r^T + b with W split by input columns and x already split the same way (the output of a
    column-parallel layer). The partial sums are all-reduced unless reduce_results=False (the caller reduces,
    e.g. once for routed and shared experts together); the bias is added once: after the reduce, or on rank 0
    only when the caller reduces."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce_results: bool = True,
                 device=None, dtype=None):
        self.input_size = in_features
        self.reduce_results = reduce_results
        in_local = divide(in_features, get_tp_group().size, "input features")
        super().__init__(in_local, out_features, bias, device, dtype)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> int:
        if param.dim() == 1:  # the bias: whole on every rank
            check_shape(loaded, param.shape)
            return copy_into(param.data, loaded)
        check_shape(loaded, (param.shape[0], self.input_size))
        n = param.shape[1]
        return copy_into(param.data, narrow(loaded, 1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        if self.quant_method is not None and not hasattr(self.quant_method, "apply_nobias"):
            raise NotImplementedError("quantized row-parallel layers at TP > 1 are not supported yet")
        add_bias_here = self.bias is not None and (self.reduce_results or self.tp_rank == 0)
        y = self.quant_method.apply_nobias(self, x) if self.quant_method is not None else linear(x, self.weight)
        if self.reduce_results:
            y = get_tp_group().all_reduce(y)
        return y + self.bias if add_bias_here else y
