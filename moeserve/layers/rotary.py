"""Rotary position embedding (the rotate-half / NeoX convention HF checkpoints use), with rope scaling variants.

cos/sin tables are built once per device for all positions; applying them is an index and a few multiplies.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; returns (inv_freq, attention factor)."""
    factor = s["factor"]
    old_len = s.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
    extrapolation_weight = 1 - ramp.clamp(0, 1)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    mscale, mscale_all = s.get("mscale", 1.0), s.get("mscale_all_dim", 0.0)
    if "attention_factor" in s and s["attention_factor"] is not None:
        attn_factor = float(s["attention_factor"])
    elif mscale_all:
        attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attn_factor = yarn_mscale(factor, mscale)
    return inv_freq, attn_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, max_position: int, base: float, scaling: dict | None = None,
                 interleaved: bool = False):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.interleaved = interleaved  # GPT-J style pairs (x0,x1),(x2,x3)... instead of halves
        with torch.device("cpu"):  # models are built on the meta device; the tables are real data
            self.inv_freq, self.attention_factor = self._inv_freq(rotary_dim, base, scaling)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step: tuple | None = None  # _rows' last positions, their version, cos and sin rows

    def signature(self) -> tuple:
        """Equal signatures, equal tables: layers with the same one can share a single RotaryEmbedding."""
        return (self.rotary_dim, self.max_position, self.interleaved, self.attention_factor,
                tuple(self.inv_freq.tolist()))

    @staticmethod
    def _inv_freq(rotary_dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        attention_factor = 1.0
        kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
        if kind == "default":
            pass
        elif kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(rotary_dim, base, scaling)
        else:
            raise ValueError(f"Unsupported rope_scaling type {kind!r}; supported: default, linear, llama3, yarn.")
        return inv_freq, attention_factor

    def _cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            pos = torch.arange(self.max_position, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq)
            self._cache[device] = ((freqs.cos() * self.attention_factor).to(device),
                                   (freqs.sin() * self.attention_factor).to(device))
        return self._cache[device]

    def _rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of these positions laid out as _rotate multiplies them, [T, 1, rotary_dim] each:
        rotate-half [c | c] and [-s | s], interleaved (c0, c0, c1, c1, ..) and (-s0, s0, -s1, s1, ..).
        Gathered once per step, not per layer: all layers of a step share this module and pass the same
        positions tensor (its version counter catches a refill in place; an inference tensor has none and is
        gathered on every call)."""
        step = self._step
        if (step is not None and step[0] is positions and not positions.is_inference()
                and step[1] == positions._version):
            return step[2], step[3]
        cos, sin = self._cos_sin(positions.device)
        c, s = cos[positions], sin[positions]  # [T, rotary_dim / 2]
        if self.interleaved:
            c, s = torch.stack((c, c), dim=-1).flatten(-2), torch.stack((-s, s), dim=-1).flatten(-2)
        else:
            c, s = torch.cat((c, c), dim=-1), torch.cat((-s, s), dim=-1)
        c, s = c.unsqueeze(1), s.unsqueeze(1)
        if not positions.is_inference():
            self._step = (positions, positions._version, c, s)
        return c, s

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] -> x with its first rotary_dim dims rotated: rot * cos + swapped * sin in fp32, swapped the
        pairs' other halves ([x2 | x1], or (x1, x0, x3, x2, ..) interleaved), the same bits as x1 c - x2 s and
        x2 c + x1 s (a + (-b) is a - b)."""
        R = self.rotary_dim
        rot = x[..., :R] if R < x.shape[-1] else x
        if rot.dtype != torch.float32:
            rot = rot.float()
        if self.interleaved:
            swapped = rot.unflatten(-1, (R // 2, 2)).flip(-1).flatten(-2)
        else:
            swapped = rot.roll(R // 2, -1)
        out = (rot * cos).add_(swapped.mul_(sin))
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return torch.cat((out, x[..., R:]), dim=-1) if R < x.shape[-1] else out

    def apply_fused(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm=None, k_norm=None,
                    kv_write: tuple | None = None) -> None:
        """CUDA: optional per-head RMSNorm then rotary, in place, in one kernel; with kv_write = (v, cache, slots)
        the same kernel stores K and V into the paged cache."""
        if self.interleaved:
            raise NotImplementedError("the fused rotary kernel covers the rotate-half convention only")
        from moeserve.kernels.rotary import apply_rope

        cos, sin = self._cos_sin(q.device)
        apply_rope(q, k, positions, cos, sin, q_norm.weight if q_norm is not None else None,
                   k_norm.weight if k_norm is not None else None, q_norm.eps if q_norm is not None else 1e-6,
                   kv_write=kv_write)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, KVH, D] -> (q, k) rotated: the reference, and the CPU models' path (CUDA models call
        apply_fused)."""
        cos, sin = self._rows(positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
