"""CUDA graphs cut around the calls that cannot be captured (MLA's attention over a mixed batch).

MLA's mixed-batch attention plans on the host which rows decode and how the prefill contexts are chunked, so a
graph cannot replay it for another step's lengths; everything around it can. A PiecewiseGraph captures a forward
pass as a chain of graphs with those calls cut out. Inside the graph before a cut, the cut's inputs are copied
into static buffers; at replay the cut runs eagerly with the step's own metadata and writes into a static output
that the graph after it reads. A mixed DeepSeek step's ~1,200 eager launches become one replay per layer plus the
attention's own launches.

Model code asks for a cut through `ForwardContext.cuts` (None outside piecewise capture): see
layers/mla.LatentAttention.forward.
"""

from __future__ import annotations

from typing import Callable

import torch

_capture_stream: torch.cuda.Stream | None = None


class StaticBuffers:
    """The cuts' inputs and outputs: one tensor per (role, trailing shape, dtype) with as many rows as the largest
    graph's tokens, shared by every layer and every graph (cuts run one at a time, in order). Allocated while the
    forward pass runs eagerly before its capture (graphs are captured largest first), outside any graph's pool."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, role, rows: int, trailing: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        key = (role, tuple(trailing), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < rows:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("piecewise graph: a cut's buffer must exist before capture (run the forward "
                                   "eagerly with the same cuts first)")
            buf = torch.zeros((rows, *trailing), dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:rows]


class _Cut:
    """One eager call between two graphs: fn(*inputs, ctx=, out=) over the first T rows of the static buffers."""

    def __init__(self, fn: Callable, inputs: list[torch.Tensor], out: torch.Tensor):
        self.fn, self.inputs, self.out = fn, inputs, out

    def run(self, ctx, T: int) -> None:
        self.fn(*(x[:T] for x in self.inputs), ctx=ctx, out=self.out[:T])


class PiecewiseGraph:
    """A forward pass over T_pad tokens as graphs and cuts. `cut` is called by the model (through
    ForwardContext.cuts) both in the eager run before capture (buffers made, kernels compiled) and during capture
    (where it closes the current graph, runs the call eagerly with `capture_ctx` and opens the next graph)."""

    def __init__(self, buffers: StaticBuffers, capture_ctx, pool=None):
        self.buffers = buffers
        self.capture_ctx = capture_ctx  # the cuts' context while capturing (the replay passes the step's own)
        self.pool = pool
        self.items: list[torch.cuda.CUDAGraph | _Cut] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        self._capturing = False

    # -- called by the model --
    def cut(self, fn: Callable, inputs: tuple[torch.Tensor, ...], out_trailing: tuple[int, ...],
            out_dtype: torch.dtype) -> torch.Tensor:
        """fn(*inputs, ctx=, out=) outside the graphs; returns the static tensor it writes (rows = inputs' rows)."""
        rows = inputs[0].shape[0]
        static = [self.buffers.get(("in", i), rows, x.shape[1:], x.dtype, x.device) for i, x in enumerate(inputs)]
        for s, x in zip(static, inputs):
            s.copy_(x)
        out = self.buffers.get("out", rows, out_trailing, out_dtype, inputs[0].device)
        if not self._capturing:  # the eager run before capture
            fn(*static, ctx=self.capture_ctx, out=out)
            return out
        self._close()
        fn(*static, ctx=self.capture_ctx, out=out)
        self.items.append(_Cut(fn, static, out))
        self._open()
        return out

    # -- called by the runner --
    def capture(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Capture forward() (which must have run eagerly with these cuts once before) and return its output."""
        global _capture_stream
        if _capture_stream is None:
            _capture_stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        _capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(_capture_stream):
            self._capturing = True
            self._open()
            try:
                out = forward()
            finally:
                self._close()
                self._capturing = False
        torch.cuda.current_stream().wait_stream(_capture_stream)
        torch.cuda.synchronize()
        return out

    def replay(self, ctx, T: int) -> None:
        """The graphs in order, each cut in between run eagerly over the step's T real tokens with ctx."""
        for item in self.items:
            if isinstance(item, _Cut):
                item.run(ctx, T)
            else:
                item.replay()

    @property
    def num_cuts(self) -> int:
        return sum(isinstance(i, _Cut) for i in self.items)

    def _open(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def _close(self) -> None:
        self._graph.capture_end()
        self.pool = self._graph.pool()  # every piece allocates from one pool, as one graph would
        self.items.append(self._graph)
