"""Counting a prompt's tokens for the length check, off the engine thread.

Hugging Face tokenizers are stateful (padding and truncation settings switch per call), so the validation
that runs on the server's event loop must never share a tokenizer object with the engine thread, which
tokenises with padding and truncation. `TokenCounter` owns deep copies, made once at load, behind a lock."""

from __future__ import annotations

import copy
import threading


class TokenCounter:
    def __init__(self, tokenizers: list):
        self._tokenizers = [copy.deepcopy(t) for t in tokenizers]
        self._lock = threading.Lock()

    def count(self, prompt: str) -> int:
        """Tokens the longest-reading tokenizer makes of `prompt`, with its begin / end tokens."""
        with self._lock:
            return max(len(tok(prompt).input_ids) for tok in self._tokenizers)
