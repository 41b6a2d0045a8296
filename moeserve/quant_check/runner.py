"""The comparison itself: the reference model first (greedy continuations, then its full-vocabulary
log-probabilities on them, kept on the host), freed, then the quantized model (its own greedy continuations, and
its log-probabilities on the reference's sequences: teacher forcing, so both see identical contexts)."""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Thresholds:
    max_kl: float
    min_top1: float
    min_greedy_match: float


def _load(engine_args: dict):
    from moeserve.llm import LLM

    return LLM(**engine_args)


def _release() -> None:
    """Called once an engine's last reference is gone (its pass returned): give its memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reference_pass(args: dict, prompts: list, max_tokens: int, max_positions: int):
    from moeserve.engine.scoring import score_logprobs

    llm = _load(args)
    try:
        prompt_ids, ref_out = _greedy(llm, prompts, max_tokens)
        seqs, starts, keep = _teacher_forced(prompt_ids, ref_out)
        ref_lp = [lp.cpu() for lp in score_logprobs(llm.llm_engine, seqs, starts, max_positions)]
    finally:
        llm.llm_engine.shutdown()
    return prompt_ids, ref_out, seqs, starts, keep, ref_lp


def _quantized_pass(args: dict, prompt_ids: list, max_tokens: int, seqs: list, starts: list, ref_lp: list,
                    max_positions: int):
    from moeserve.engine.scoring import score_logprobs

    llm = _load(args)
    try:
        _, q_out = _greedy(llm, [list(p) for p in prompt_ids], max_tokens)
        kls, top1 = [], []
        for lr, lq in zip(ref_lp, score_logprobs(llm.llm_engine, seqs, starts, max_positions)):
            lr = lr.to(lq.device)
            if lq.shape[-1] != lr.shape[-1]:
                raise ValueError(f"the two models' vocabularies differ ({lr.shape[-1]} vs {lq.shape[-1]})")
            p = lr.exp()
            # KL(ref || quant) = sum_v p_ref(v) (log p_ref(v) - log p_quant(v)); tokens without reference mass add 0
            kl = torch.where(p > 0, p * (lr - lq), torch.zeros_like(p)).sum(-1)
            kls.append(kl.double().cpu())
            top1.append((lr.argmax(-1) == lq.argmax(-1)).cpu())
    finally:
        llm.llm_engine.shutdown()
    return q_out, kls, top1


def _greedy(llm, prompts: list, max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt token ids, greedy output token ids) of each prompt."""
    from moeserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts], params)
    return [list(o.prompt_token_ids) for o in outs], [list(o.outputs[0].token_ids) for o in outs]


def _teacher_forced(prompt_ids: list[list[int]], conts: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """The sequences to score (prompt + continuation but its last token), each one's first scored position, and
    the prompts that have any position to score."""
    keep = [i for i, c in enumerate(conts) if c and prompt_ids[i]]
    seqs = [prompt_ids[i] + conts[i][:-1] for i in keep]
    starts = [len(prompt_ids[i]) - 1 for i in keep]
    return seqs, starts, keep


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"moeserve check-quant: {msg}", file=sys.stderr, flush=True)


def compare(ref_args: dict, quant_args: dict, prompts: list, max_tokens: int, progress: bool = True,
            max_positions: int = 1024) -> dict:
    """Run both models one after the other (peak memory: one model plus the reference's log-probabilities on the
    host, positions x vocab x 4 bytes) and return the measurements (a JSON-able dict)."""
    t0 = time.perf_counter()
    _say(progress, f"loading the reference {ref_args['model']}")
    prompt_ids, ref_out, seqs, starts, keep, ref_lp = _reference_pass(ref_args, prompts, max_tokens, max_positions)
    _release()  # the reference's engine is gone before the quantized one loads: peak memory is one model
    vocab = ref_lp[0].shape[-1] if ref_lp else 0
    t_ref = time.perf_counter() - t0
    _say(progress, f"reference done in {t_ref:.1f}s ({sum(len(x) for x in ref_lp)} positions x {vocab} tokens); "
                   f"loading the quantized model {quant_args['model']} "
                   f"(quantization={quant_args.get('quantization') or 'from the checkpoint'})")
    t1 = time.perf_counter()
    q_out, kls, top1 = _quantized_pass(quant_args, prompt_ids, max_tokens, seqs, starts, ref_lp, max_positions)
    _release()
    t_quant = time.perf_counter() - t1

    all_kl = torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64)
    all_top1 = torch.cat(top1) if top1 else torch.zeros(0, dtype=torch.bool)
    per_prompt = []
    kl_of = dict(zip(keep, kls))
    top1_of = dict(zip(keep, top1))
    prefixes, equal = [], []
    for i, (r, q) in enumerate(zip(ref_out, q_out)):
        n = 0
        while n < min(len(r), len(q)) and r[n] == q[n]:
            n += 1
        prefixes.append(n)
        equal.append(r == q)
        k, t = kl_of.get(i), top1_of.get(i)
        per_prompt.append(dict(
            prompt=prompts[i] if isinstance(prompts[i], str) else None, prompt_tokens=len(prompt_ids[i]),
            positions=0 if k is None else len(k), kl_mean=None if k is None or not len(k) else float(k.mean()),
            kl_max=None if k is None or not len(k) else float(k.max()),
            top1=None if t is None or not len(t) else float(t.float().mean()),
            greedy_equal=r == q, common_prefix=n, reference_len=len(r), quantized_len=len(q)))
    n_pos = len(all_kl)
    return dict(
        reference=_describe(ref_args), quantized=_describe(quant_args), num_prompts=len(prompts),
        max_tokens=max_tokens, positions=n_pos, vocab_size=vocab,
        kl_mean=float(all_kl.mean()) if n_pos else math.nan,
        kl_median=float(all_kl.median()) if n_pos else math.nan,
        kl_p99=float(torch.quantile(all_kl, 0.99)) if n_pos else math.nan,
        kl_max=float(all_kl.max()) if n_pos else math.nan,
        top1_agreement=float(all_top1.float().mean()) if n_pos else math.nan,
        greedy_match=sum(equal) / len(equal) if equal else math.nan,
        mean_common_prefix=sum(prefixes) / len(prefixes) if prefixes else math.nan,
        mean_reference_len=sum(len(r) for r in ref_out) / len(ref_out) if ref_out else math.nan,
        reference_s=round(t_ref, 2), quantized_s=round(t_quant, 2), per_prompt=per_prompt)


def _describe(args: dict) -> dict:
    return {k: args.get(k) for k in ("model", "quantization", "dtype", "device")}


def verdict(m: dict, th: Thresholds) -> tuple[bool, str]:
    """(passed, the one-line verdict a pipeline can act on)."""
    checks = [("kl", m["kl_mean"], "<=", th.max_kl), ("top1", m["top1_agreement"], ">=", th.min_top1),
              ("greedy_match", m["greedy_match"], ">=", th.min_greedy_match)]
    failed = [name for name, v, op, lim in checks
              if not (v <= lim if op == "<=" else v >= lim)]  # NaN fails both ways
    nums = (f"kl={m['kl_mean']:.3g} nats/token (max {th.max_kl:g}) top1={m['top1_agreement']:.4f} "
            f"(min {th.min_top1:g}) greedy_match={m['greedy_match']:.3f} (min {th.min_greedy_match:g}) "
            f"common_prefix={m['mean_common_prefix']:.1f}/{m['mean_reference_len']:.1f} tokens; "
            f"{m['num_prompts']} prompts, {m['positions']} positions")
    if failed:
        return False, f"check-quant FAIL ({', '.join(failed)}): {nums}"
    return True, f"check-quant PASS: {nums}"
