"""Routed experts, stacked, as one rank holds them: w13 [E_local, 2*I_local, H] (gate rows then up rows),
w2 [E_local, H, I_local]. The layout is read from parallel_state once, at construction:

  one rank:  every expert whole.
  TP only:   every expert, each with its 1/tp slice of the intermediate dim (w13 = [gate shard | up shard], w2 the
             matching columns); a rank's result is a partial sum, all-reduced over the TP group.
  EP:        experts placed whole in contiguous ranges over the EP ranks (the first E % ep ranks take one more);
             expert_map[global id] = local id or -1. The kernels look the map up themselves, so the router's global
             ids go in unchanged and a non-local expert contributes exact zeros.
             DP = 1: the EP group is the TP group and its ranks hold the same tokens: local MoE, all-reduce.
             DP > 1: each DP rank holds its own tokens; they are padded to the largest count, all-gathered over
             DP, run through the local experts, reduce-scattered over EP and all-gathered over TP. A rank with
             no tokens still joins every collective.

`extra_partial` (a TP-partial shared-expert output) is added to the local partial before the one reduction:
over TP it is what a separate all-reduce would give; with DP > 1 it lands in this rank's rows of the gathered
batch, and the EP reduction (which spans this DP rank's TP ranks) sums it with no collective of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.distributed.parallel_state import get_dp_group, get_ep_group, get_tp_group, layout
from moeserve.layers.activation import silu_and_mul
from moeserve.loader.tensor_slices import materialize, narrow, shape_of

_PARAM_OF = {"gate": "w13", "up": "w13", "gate_up": "w13", "down": "w2"}

# Tokens per DP rank this step, when the runner knows it (set_dp_max_tokens): saves a count all-gather (and, on
# CUDA, a host sync) per MoE layer.
_dp_max_tokens: int | None = None


def set_dp_max_tokens(n: int | None) -> None:
    """The largest token count over the DP ranks for the coming step (None: each MoE layer all-gathers counts)."""
    global _dp_max_tokens
    _dp_max_tokens = n


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """(first global expert, count) placed on ep_rank: contiguous, the first num_experts % ep_size ranks one more."""
    base, extra = divmod(num_experts, ep_size)
    return ep_rank * base + min(ep_rank, extra), base + (ep_rank < extra)


class Experts(nn.Module):
    quant_method = None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        lay = layout()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.expert_parallel = lay.enable_expert_parallel and lay.ep > 1
        self.data_parallel = self.expert_parallel and lay.dp > 1
        if self.expert_parallel:
            ep = get_ep_group()
            if num_experts < ep.size:
                raise ValueError(f"{num_experts} experts cannot be spread over {ep.size} expert-parallel ranks.")
            self.first_local, self.num_local = expert_range(num_experts, ep.size, ep.rank)
            self.shard_rank, self.shard_count = 0, 1
            self.register_buffer("expert_map", torch.empty(num_experts, dtype=torch.int32), persistent=False)
            self._fill_expert_map()
        else:
            tp = get_tp_group()
            if intermediate_size % tp.size:
                raise ValueError(f"moe_intermediate_size {intermediate_size} does not split over TP={tp.size}.")
            self.first_local, self.num_local = 0, num_experts
            self.shard_rank, self.shard_count = tp.rank, tp.size
            self.expert_map = None
        self.local_intermediate = intermediate_size // self.shard_count
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.local_intermediate, hidden_size))
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden_size, self.local_intermediate))

    def local_id(self, expert_id: int) -> int:
        """This rank's index of a global expert, -1 when another rank holds it."""
        local = expert_id - self.first_local
        return local if 0 <= local < self.num_local else -1

    # ---- forward -------------------------------------------------------------------------------------------

    def _fill_expert_map(self) -> None:
        """Global expert id -> local row, -1 elsewhere."""
        with torch.no_grad():
            self.expert_map.fill_(-1)
            self.expert_map[self.first_local:self.first_local + self.num_local] = torch.arange(
                self.num_local, dtype=torch.int32, device=self.expert_map.device)

    def post_load(self) -> None:
        """The model is built on the meta device and given uninitialised storage (loader.build_empty): the map is
        data, not a weight, so it is filled again here."""
        if self.expert_map is not None:
            self._fill_expert_map()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                extra_partial: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], weights/ids [T, K] (global expert ids) -> [T, H], reduced over every rank that holds a part."""
        if self.data_parallel:
            return self._forward_gathered(x, weights, ids, extra_partial)
        out = self._local(x, weights, ids)
        if extra_partial is not None:
            out += extra_partial
        return (get_ep_group() if self.expert_parallel else get_tp_group()).all_reduce(out)

    def _local(self, x, weights, ids) -> torch.Tensor:
        if self.quant_method is not None:  # layers/quant (fp8): its own weights and forward
            return self.quant_method.apply(self, x, weights, ids)
        if x.is_cuda:
            from moeserve.kernels.fused_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids, expert_map=self.expert_map)
        return experts_reference(x, self.w13, self.w2, weights, ids, self.expert_map)

    def _forward_gathered(self, x, weights, ids, extra_partial) -> torch.Tensor:
        """DP x EP: all-gather the DP ranks' tokens (padded to one length), local experts, reduce-scatter back."""
        dp, tp, ep = get_dp_group(), get_tp_group(), get_ep_group()
        n, hidden = x.shape
        most = _dp_max_tokens
        if most is None:
            most = int(dp.all_gather(torch.tensor([n], device=x.device)).max())
        pad = -(-most // tp.size) * tp.size  # the reduce-scatter hands each TP rank pad / tp rows
        if pad == 0:
            return x.new_zeros(0, hidden)
        x_all, w_all, ids_all = _gather_routed(dp, x, weights, ids, pad)
        partial = self._local(x_all, w_all, ids_all)
        mine = slice(dp.rank * pad, dp.rank * pad + n)
        if extra_partial is not None:
            partial[mine] += extra_partial
        # EP ranks are ordered [dp][tp]: rank (d, t) keeps rows d*pad + t*pad/tp onwards, its TP group rejoins them
        return tp.all_gather(ep.reduce_scatter(partial))[:n]

    # ---- weights -------------------------------------------------------------------------------------------

    def load_weight(self, param: str, tensor, expert_id: int | None, proj: str) -> int:
        """Copy this rank's part of a checkpoint tensor into w13 or w2; returns the elements written.

        proj: 'gate' / 'up' ([I, H]), 'gate_up' ([2I, H]), 'down' ([H, I]) for one expert (expert_id given), or
        the same with a leading expert dim for a fused tensor (expert_id None); either may come with its last two
        dims transposed. `tensor` may be a lazy safetensors slice: only the rank's part is read.
        """
        if _PARAM_OF.get(proj) != param:
            raise ValueError(f"experts: projection {proj!r} does not belong to parameter {param!r}.")
        inter, hidden = self.intermediate_size, self.w13.shape[2]
        per_expert = {"gate": (inter, hidden), "up": (inter, hidden), "gate_up": (2 * inter, hidden),
                      "down": (hidden, inter)}[proj]
        target = self.w13.data if param == "w13" else self.w2.data
        if expert_id is None:
            lead, full = 1, (self.num_experts,) + per_expert
            if self.num_local != self.num_experts:
                tensor = narrow(tensor, 0, self.first_local, self.num_local)
        else:
            local = self.local_id(expert_id)
            if local < 0:
                return 0
            lead, full, target = 0, per_expert, target[local]
        shape = shape_of(tensor)[lead:]
        transposed = shape != full[lead:] and shape == full[lead:][::-1]
        if shape != full[lead:] and not transposed:
            raise ValueError(f"experts: {proj} tensor of shape {shape_of(tensor)} does not fit "
                             f"{(self.num_experts,) + per_expert} (one expert: {per_expert}).")
        inter_dim = lead + (1 if (proj == "down") != transposed else 0)  # where the intermediate dim sits
        part = self.local_intermediate
        start = self.shard_rank * part
        if proj == "gate_up":
            pieces = [(start, 0), (inter + start, part)]  # (offset in the tensor, first row of w13)
        else:
            pieces = [(start, part if proj == "up" else 0)]
        written = 0
        for offset, row in pieces:
            src = materialize(narrow(tensor, inter_dim, offset, part))
            if transposed:
                src = src.transpose(-1, -2)
            dst = target if proj == "down" else target.narrow(lead, row, part)
            dst.copy_(src)
            written += src.numel()
        return written


def _gather_routed(dp, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, pad: int):
    """Every DP rank's tokens with their routing, in one all-gather: each row of the message is the token's hidden
    state then its K fp32 weights and K int32 expert ids, their bytes viewed as x's dtype. Three all-gathers (tokens,
    weights, ids) were three NCCL launches per MoE layer; in a DP=2+EP decode step on 2xH200 the 144 all-gathers
    took 1.2 ms of 18 ms. Rows past a rank's own tokens carry no expert (-1). Returns (tokens [dp * pad, H], a
    strided view of the message, weights [dp * pad, K] fp32, ids [dp * pad, K] int32)."""
    n, hidden = x.shape
    k = ids.shape[1]
    route = torch.empty(pad, 2 * k, dtype=torch.int32, device=x.device)
    route[:n, :k] = weights.float().view(torch.int32)
    route[n:, :k] = 0
    route[:n, k:] = ids
    route[n:, k:] = -1  # no expert: rows that are sliced off after the experts
    msg = x.new_empty(pad, hidden + route.view(x.dtype).shape[1])
    msg[:n, :hidden] = x
    msg[n:, :hidden] = 0
    msg[:, hidden:] = route.view(x.dtype)
    got = dp.all_gather(msg)
    route = got[:, hidden:].contiguous().view(torch.int32)
    return got[:, :hidden], route[:, :k].contiguous().view(torch.float32), route[:, k:].contiguous()


def experts_reference(x, w13, w2, weights, ids, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert: gather its tokens, run the gated MLP, scale by the routing weight, scatter-add back.
    With expert_map, ids are global and map to rows of w13/w2 (-1: not here); unmapped or out-of-range ids add
    nothing."""
    out = torch.zeros_like(x)
    flat_ids = ids.reshape(-1).long()
    num_ids = w13.shape[0] if expert_map is None else expert_map.numel()
    valid = (flat_ids >= 0) & (flat_ids < num_ids)
    flat_ids = torch.where(valid, flat_ids, 0)
    if expert_map is not None:
        flat_ids = expert_map.long()[flat_ids]
        valid &= flat_ids >= 0
    flat_ids = torch.where(valid, flat_ids, w13.shape[0])  # one bucket past the last expert, never run
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0] + 1).tolist()
    tokens = order // ids.shape[1]
    start = 0
    for e, n in enumerate(counts[:-1]):
        if n == 0:
            continue
        sel, rows = tokens[start:start + n], order[start:start + n]
        start += n
        h = silu_and_mul(x[sel] @ w13[e].t()) @ w2[e].t()
        out.index_add_(0, sel, h * weights.reshape(-1)[rows].unsqueeze(1).to(h.dtype))
    return out
