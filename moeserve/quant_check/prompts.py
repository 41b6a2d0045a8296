"""The built-in prompt set of `moeserve check-quant`: short, diverse raw-text prompts (prose, facts, reasoning,
code, lists, dialogue, other languages), fixed so that results compare across runs and releases."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a forest,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is 17 multiplied by 23?\nA:",
    "The three primary colors are",
    "Photosynthesis is the process by which plants",
    "Write a haiku about the ocean:\n",
    "SELECT name, COUNT(*) FROM orders",
    "The French Revolution began in 1789 when",
    "To make a cup of tea, first",
    "Translate to German: 'The weather is nice today.'\nGerman:",
    "A list of the planets in the solar system, in order from the Sun:\n1.",
    "The derivative of x^3 + 2x with respect to x is",
    "In machine learning, overfitting happens when",
    "Dear hiring manager,\n\nI am writing to apply for",
    "#include <stdio.h>\n\nint main(void) {\n",
    "If all cats are mammals and all mammals are animals, then",
    "The largest ocean on Earth is",
    "User: Can you recommend a good book about history?\nAssistant:",
    "import numpy as np\n\n# compute the mean of each row of a matrix\n",
    "La capitale de l'Espagne est",
    "The theory of general relativity, proposed by Albert Einstein,",
    "Step 1: Preheat the oven to 180 degrees.\nStep 2:",
    "A train leaves the station at 3 pm traveling at 60 km/h. How far has it gone by 5 pm?",
    "The main differences between TCP and UDP are",
    "Water boils at 100 degrees Celsius at sea level because",
    "{\"name\": \"Alice\", \"age\": 30, \"city\":",
    "Roses are red, violets are blue,",
    "The stock market fell sharply on Monday after",
    "Explain recursion to a five-year-old:",
    "1, 1, 2, 3, 5, 8, 13,",
    "The mitochondria is often called the powerhouse of the cell because",
)


def load_prompts(path: str | None) -> list[str | list[int]]:
    """The built-in set, or a file's: JSONL (one {"prompt": str} / {"prompt_token_ids": [...]} / JSON string per
    line) when it ends in .jsonl or .json, else one prompt per non-empty text line (write \\n for a newline)."""
    if path is None:
        return list(PROMPTS)
    p = Path(path)
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out: list[str | list[int]] = []
    if p.suffix in (".jsonl", ".json"):
        for n, ln in enumerate(lines, 1):
            x = json.loads(ln)
            if isinstance(x, dict) and "prompt_token_ids" in x:
                out.append([int(t) for t in x["prompt_token_ids"]])
            elif isinstance(x, dict) and isinstance(x.get("prompt"), str):
                out.append(x["prompt"])
            elif isinstance(x, str):
                out.append(x)
            else:
                raise ValueError(f"{path}:{n}: a line is {{\"prompt\": str}}, {{\"prompt_token_ids\": [int]}} or a "
                                 f"JSON string")
    else:
        out = [ln.replace("\\n", "\n") for ln in lines]
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out
