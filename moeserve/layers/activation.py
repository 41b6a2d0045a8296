from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def get_act(name: str):
    if name not in _ACTS:
        raise ValueError(f"Unsupported hidden_act {name!r}; supported: {sorted(_ACTS)}.")
    return _ACTS[name]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2*I] -> silu(first half) * second half."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
