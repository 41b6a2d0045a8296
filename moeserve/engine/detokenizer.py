"""Incremental detokenization with stop strings.

Text grows one token at a time by decoding a small window of recent tokens and taking what the newest token
added. A token that ends in the middle of a UTF-8 character decodes to U+FFFD: we wait for the next one rather
than emit a broken character. Text that could still become a stop string is held back until it is decided, so a
stream never shows part of a stop string it later cuts.
"""

from __future__ import annotations

_CONTEXT = 5  # prompt tokens kept as left context, so word-initial spaces decode right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool, stop: list[str],
                 include_stop_str_in_output: bool):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.window = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.window)
        self.text = ""  # everything decoded so far (before any stop cut)
        self.stopped_at: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str | None:
        """Add one generated token; returns the stop string if the text now contains one."""
        self.window.append(token_id)
        prefix = self._decode(self.window[self.prefix_offset:self.read_offset])
        full = self._decode(self.window[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = len(self.text)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.window)
            if len(self.window) > 64:  # keep decoding cost flat
                drop = self.prefix_offset
                self.window = self.window[drop:]
                self.prefix_offset, self.read_offset = 0, self.read_offset - drop
            return self._find_stop(start)
        return None

    def _find_stop(self, new_from: int) -> str | None:
        for s in self.stop:
            i = self.text.find(s, max(0, new_from - len(s) + 1))
            if i != -1:
                self.stopped_at = s
                self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
                return s
        return None

    def visible_text(self, finished: bool) -> str:
        """What may be shown now: all of it once finished, else minus a tail that could begin a stop string."""
        if finished or not self.stop or self.stopped_at:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold] if hold else self.text
