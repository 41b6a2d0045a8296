"""A checkpoint tensor that is read only as far as a rank needs it.

`iterate_safetensors(..., lazy=True)` yields safetensors slices instead of tensors; a layer's weight loader asks
for its part with `shard(t, dim, index, count)` or `narrow(t, dim, start, length)` and only those bytes are
read. Plain torch tensors (GGUF, tests) go through the same two functions.
"""

from __future__ import annotations

import torch


def shape_of(t) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


def narrow(t, dim: int, start: int, length: int) -> torch.Tensor:
    """t[..., start:start + length, ...] along dim, as a tensor, reading only that range from a lazy slice."""
    if isinstance(t, torch.Tensor):
        return t.narrow(dim, start, length)
    index = [slice(None)] * len(shape_of(t))
    index[dim] = slice(start, start + length)
    return t[tuple(index)]


def shard(t, dim: int, index: int, count: int) -> torch.Tensor:
    """The index-th of `count` equal parts of t along dim."""
    size = shape_of(t)[dim]
    if size % count:
        raise ValueError(f"dimension {dim} of size {size} does not split into {count} equal parts")
    part = size // count
    return narrow(t, dim, index * part, part)


def materialize(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t[...]  # `...`, not `:`: a 0-d slice (a scale) takes no slice
