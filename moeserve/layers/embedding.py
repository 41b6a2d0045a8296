"""Token embedding and LM head with the vocabulary split over the tensor-parallel group.

The vocabulary is padded to a multiple of the TP size; rank r holds rows [r*V_r, (r+1)*V_r) of the padded table
(padding rows are zeros). The embedding looks up the ids in its range, gives zeros for the rest, and all-reduces;
the LM head computes this rank's logits and all-gathers the full [T, V] on every rank (padding dropped), so every
rank samples the same tokens. At TP=1 both are exactly F.embedding / F.linear over the whole table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.distributed.parallel_state import get_tp_group
from moeserve.layers.linear import attach_weight_loaders, check_shape, copy_into
from moeserve.loader.tensor_slices import narrow


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.rows_per_rank = -(-num_embeddings // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)  # real rows: [start, end)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim, device=device, dtype=dtype),
                                   requires_grad=False)
        attach_weight_loaders(self)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> int:
        check_shape(loaded, (self.num_embeddings, self.embedding_dim))
        n = max(self.vocab_end - self.vocab_start, 0)
        param.data[n:].zero_()
        if n:
            copy_into(param.data[:n], narrow(loaded, 0, self.vocab_start, n))
        return param.numel()

    # CPU GGUF, tied to an int4-packed LM head: the rows come from the head's bf16 copy (loader/gguf.py), in the
    # model's dtype; no table of its own
    lookup_table: torch.Tensor | None = None
    lookup_dtype: torch.dtype = torch.float32

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.lookup_table is not None:
            return F.embedding(input_ids, self.lookup_table).to(self.lookup_dtype)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return get_tp_group().all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits [T, V] (fp32), vocab-split weight. With tied embeddings it reads the embedding's table
    (same split) instead of owning one."""

    quant_method = None

    def __init__(self, num_embeddings: int, embedding_dim: int, tied_to: VocabParallelEmbedding | None = None,
                 device=None, dtype=None):
        if tied_to is None:
            super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        else:
            nn.Module.__init__(self)
            self.num_embeddings, self.tp_size = num_embeddings, tied_to.tp_size
            self._tied = (tied_to,)  # a tuple, so the embedding is not registered (and loaded) twice

    def table(self) -> torch.Tensor:
        return self._tied[0].weight if hasattr(self, "_tied") else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            logits = self.quant_method.apply(self, hidden)
        else:
            logits = F.linear(hidden, self.table())
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)[..., : self.num_embeddings]
        return logits.float()
