"""Mixture-of-Experts: one router that the config parameterises, stacked experts, optional shared experts.

Routing variants are data (RouterConfig), not copies:
  softmax top-k (Mixtral renormalises, Qwen2-MoE does not, Qwen3-MoE per norm_topk_prob),
  sigmoid scores with a correction bias that only *chooses* experts (DeepSeek-V3, GLM-4.5),
  group-limited top-k (n_group / topk_group), routed_scaling_factor.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.activation import silu_and_mul
from moeserve.layers.expert_load import count_routed
from moeserve.distributed.parallel_state import get_tp_group
from moeserve.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear, linear


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = False  # divide the chosen weights by their sum
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # how a group is ranked: "max" (DeepSeek-V2) | "top2_sum" (DeepSeek-V3)
    correction_bias: bool = False  # e_score_correction_bias: added to scores for the choice only
    routed_scaling_factor: float = 1.0

    @property
    def plain_softmax(self) -> bool:
        """Softmax over all experts, no groups, no bias (Qwen3-MoE, Mixtral, DeepSeek-V2-Lite)."""
        return self.scoring == "softmax" and self.n_group == 1 and not self.correction_bias


class Router(nn.Module):
    def __init__(self, hidden_size: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        if cfg.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.expert_counts: torch.Tensor | None = None  # layers/expert_load.py: set when telemetry is on
        self.valid_tokens: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] fp32, expert ids [T, k] int32)."""
        weights, ids, counted = self._route(x)
        if self.expert_counts is not None and not counted:
            count_routed(self.expert_counts, ids, self.valid_tokens)
        return weights, ids

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(weights, ids, whether the telemetry counts were already added)."""
        cfg = self.cfg
        if x.is_cuda and x.is_contiguous():
            from moeserve.kernels.router import grouped_topk_supported, route_grouped_topk, route_softmax_topk

            if cfg.plain_softmax:
                w, ids = route_softmax_topk(x, self.weight, cfg.top_k, cfg.renormalize, cfg.routed_scaling_factor,
                                            counts=self.expert_counts, valid_tokens=self.valid_tokens)
                return w, ids, True
            if grouped_topk_supported(cfg.num_experts, cfg.n_group):  # DeepSeek-V2/V3, GLM-4.x
                w, ids = route_grouped_topk(
                    x, self.weight, self.e_score_correction_bias if cfg.correction_bias else None, cfg.top_k,
                    cfg.n_group, cfg.topk_group, cfg.scoring == "sigmoid", cfg.group_score == "top2_sum",
                    cfg.renormalize, cfg.routed_scaling_factor, counts=self.expert_counts,
                    valid_tokens=self.valid_tokens)
                return w, ids, True
        return (*self._route_torch(x), False)

    def _route_torch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = linear(x, self.weight).float()
        if cfg.plain_softmax:
            # Softmax is monotonic: choose on the logits, then weigh with as few kernels as possible.
            top, ids = logits.topk(cfg.top_k, dim=-1)
            weights = top.softmax(dim=-1) if cfg.renormalize else (top - logits.logsumexp(-1, keepdim=True)).exp()
            if cfg.routed_scaling_factor != 1.0:
                weights = weights * cfg.routed_scaling_factor
            return weights, ids.to(torch.int32)
        scores = logits.softmax(dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float() if cfg.correction_bias else scores
        if cfg.n_group > 1:
            choice = self._limit_to_groups(choice)
        ids = choice.topk(cfg.top_k, dim=-1, sorted=True).indices
        weights = scores.gather(1, ids)
        if cfg.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if cfg.scoring == "sigmoid" else 0.0))
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        return weights, ids.to(torch.int32)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        grouped = choice.view(choice.shape[0], cfg.n_group, -1)
        if cfg.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        top_groups = group_scores.topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        # -inf, not 0: with a correction bias a kept expert's choice score can be negative.
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)


from moeserve.layers.experts import Experts, experts_reference  # noqa: E402,F401  (re-exported)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) (dense MLPs and shared experts): gate and up in one column-parallel GEMM
    (checkpoints' gate_proj / up_proj load into gate_up_proj), down row-parallel. reduce_results=False leaves
    the TP all-reduce to the caller (a shared expert reduced together with the routed experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def takes_extra_partial(experts: nn.Module) -> bool:
    """Whether the experts add an un-reduced partial output before their own TP reduction."""
    return "extra_partial" in inspect.signature(experts.forward).parameters


def routed_plus_shared(experts: nn.Module, fused_reduce: bool, x: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor, shared_partial: torch.Tensor | None) -> torch.Tensor:
    """Routed experts' output plus the shared experts' partial (this rank's share, not yet reduced over TP):
    handed to the experts so one all-reduce covers both, or, with experts that do not take it, reduced here."""
    if fused_reduce:
        return experts(x, weights, ids, extra_partial=shared_partial)
    out = experts(x, weights, ids)
    return out if shared_partial is None else out + get_tp_group().all_reduce(shared_partial)


class SparseMoE(nn.Module):
    """router -> routed experts (+ shared experts, optionally behind a sigmoid gate)."""

    def __init__(self, hidden_size: int, moe_intermediate_size: int, router: RouterConfig,
                 shared_intermediate_size: int = 0, shared_gate: bool = False):
        super().__init__()
        self.gate = Router(hidden_size, router)
        self.experts = Experts(router.num_experts, hidden_size, moe_intermediate_size)
        self.shared_expert = (GatedMLP(hidden_size, shared_intermediate_size, reduce_results=False)
                              if shared_intermediate_size else None)
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, bias=False) if shared_gate else None
        self.fused_reduce = takes_extra_partial(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return routed_plus_shared(self.experts, self.fused_reduce, x, weights, ids, shared)
