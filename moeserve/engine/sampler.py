"""From the last position's logits to the next token of each request, batched.

Order: penalties -> min_tokens ban -> grammar mask (structured outputs) -> (logprobs of the model's raw
distribution) -> greedy argmax, or
temperature, top-k, top-p, min-p, then a draw. The draw is argmax(p / q) with q ~ Exp(1) noise, which samples
exactly from p; a seeded request draws its noise from its own generator, so its tokens do not depend on what
else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeserve.engine.request import Request
from moeserve.kernels.runtime import upload
from moeserve.outputs import Logprob


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    token_logprobs: list[float | None]
    errors: dict[int, str] = field(default_factory=dict)  # row -> why that row's own sampling failed


class PendingSample:
    """A step's draws, still on their way to the host: the token tensor stays on the device (the next step of
    async scheduling reads its input tokens from it) while copies into host memory run behind the GPU's work.
    `result()` waits for those copies only."""

    def __init__(self, tokens: torch.Tensor, reqs: list[Request], lp: tuple | None):
        self.tokens = tokens
        self.num_logprobs = [r.params.logprobs for r in reqs]
        self._host = [t.to("cpu", non_blocking=True) for t in (tokens, *(lp or ()))]
        self._ready = None
        if tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self) -> SampleResult:
        if self._ready is not None:
            self._ready.synchronize()
        token_list = self._host[0].tolist()
        n = len(token_list)
        out_lp: list = [None] * n
        tok_lp: list = [None] * n
        if len(self._host) > 1:
            chosen_lp, ranks, top_ids, top_lp = (t.tolist() for t in self._host[1:])
            rows = [i for i, k in enumerate(self.num_logprobs) if k is not None]
            for j, i in enumerate(rows):
                d = {token_list[i]: Logprob(chosen_lp[j], ranks[j])}
                k = self.num_logprobs[i]
                for rank, (tid, lp) in enumerate(zip(top_ids[j][:k], top_lp[j][:k]), 1):
                    d.setdefault(tid, Logprob(lp, rank))
                out_lp[i] = d
                tok_lp[i] = chosen_lp[j]
        return SampleResult(token_list, out_lp, tok_lp)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.grammar_mask = None  # made when a request with a grammar first samples (engine/structured.py)

    def __call__(self, logits: torch.Tensor, reqs: list[Request], eos_ids: set[int]) -> SampleResult:
        return self.sample(logits, reqs, eos_ids).result()

    def sample(self, logits: torch.Tensor, reqs: list[Request], eos_ids: set[int]) -> PendingSample:
        """Draw on the device; nothing here waits for the GPU."""
        logits = logits[:, : self.vocab_size].float()
        raw = logits
        if any(_adjusts_logits(r) for r in reqs):
            logits = self._apply_penalties(logits.clone(), reqs, eos_ids)
        if any(r.grammar is not None for r in reqs):
            if logits is raw:
                logits = logits.clone()
            if self.grammar_mask is None:
                from moeserve.engine.structured import GrammarMask
                self.grammar_mask = GrammarMask(self.vocab_size, self.device)
            self.grammar_mask.apply(logits, reqs)

        greedy = [r.params.greedy for r in reqs]
        if all(greedy):  # decided on the host: no device round trip before the argmax
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, reqs, upload(greedy, logits.device))

        lp = None
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if rows:  # the chosen token's log-probability and rank, and the top-n, of the model's raw distribution
            top_n = max(max(reqs[i].params.logprobs for i in rows), 1)
            idx = upload(rows, logits.device, torch.int64)
            logp = torch.log_softmax(raw[idx], dim=-1)
            chosen_lp = logp.gather(1, tokens[idx][:, None]).squeeze(1)
            ranks = (logp > chosen_lp[:, None]).sum(dim=1) + 1
            top = logp.topk(top_n, dim=-1)
            lp = (chosen_lp, ranks, top.indices, top.values)
        return PendingSample(tokens, reqs, lp)

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request], eos_ids: set[int]) -> torch.Tensor:
        for i, r in enumerate(reqs):
            p = r.params
            if p.has_penalties:
                out_ids = upload(r.output_token_ids, logits.device, torch.long)
                if p.repetition_penalty != 1.0:
                    seen = upload(r.all_token_ids, logits.device, torch.long).unique()
                    vals = logits[i, seen]
                    logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
                if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
                    counts = torch.bincount(out_ids, minlength=logits.shape[1])[: logits.shape[1]].float()
                    logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
            if len(r.output_token_ids) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids)
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[i, banned] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, reqs: list[Request], greedy: torch.Tensor) -> torch.Tensor:
        dev = logits.device
        temp = upload([max(r.params.temperature, 1e-5) for r in reqs], dev, torch.float32)
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        top_k = [r.params.top_k for r in reqs]
        top_p = [r.params.top_p for r in reqs]
        min_p = [r.params.min_p for r in reqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            probs = _top_k_top_p(probs, top_k, top_p)
        if any(m > 0 for m in min_p):
            mp = upload(min_p, dev, torch.float32)
            probs = probs.masked_fill(probs < mp[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.params.seed is not None:
                if r.generator is None:
                    r.generator = torch.Generator(device=dev).manual_seed(r.params.seed + r.index)
                noise[i] = torch.empty(probs.shape[1], device=dev).exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _adjusts_logits(r: Request) -> bool:
    """Does a penalty or the min_tokens ban change this request's logits at this step?"""
    return r.params.has_penalties or len(r.output_token_ids) < r.params.min_tokens


def _top_k_top_p(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Zero every token outside each row's top-k and outside the smallest set whose mass reaches top-p."""
    dev = probs.device
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    V = probs.shape[1]
    k = upload([kk if kk > 0 else V for kk in top_k], dev, torch.int64)
    ranks = torch.arange(V, device=dev)[None, :]
    drop = ranks >= k[:, None]
    p = upload(top_p, dev, torch.float32)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop |= mass_before >= p[:, None]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, idx, sorted_p)
