"""Structured outputs where another rank samples (a DP rank's leader, the last pipeline stage): it compiles the
grammar from the request's spec itself; greedy texts must equal the one-process engine's, and hold to it."""

from __future__ import annotations

import re

from moeserve import LLM, SamplingParams

GRAMMARS = [{"choice": ["yes", "no", "maybe not"]}, {"regex": r"[a-c]{2,5}-\d\d"},
            {"json": {"type": "object", "properties": {"k": {"enum": ["cat", "dog"]}, "n": {"type": "integer"}},
                      "required": ["k", "n"], "additionalProperties": False}}]


def grammared(llm: LLM, prompts) -> list[str]:
    """Greedy texts of prompts (token ids) under the grammars in turn; the choice and regex ones are checked."""
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=GRAMMARS[i % len(GRAMMARS)])
              for i in range(len(prompts))]
    texts = [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    for i, t in enumerate(texts):
        if i % 3 == 0:
            assert t in GRAMMARS[0]["choice"], t
        elif i % 3 == 1:
            assert re.fullmatch(GRAMMARS[1]["regex"], t), t
    return texts
