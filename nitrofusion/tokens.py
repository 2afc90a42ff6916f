"""Prompt length checks with tokenizers nobody else touches.

Hugging Face tokenizers are stateful: a call with `padding=`/`truncation=` switches the (Rust) tokenizer's
padding and truncation mode, and the next call inherits it. The engine thread encodes prompts with padding
and truncation to the encoder's length while the server checks prompt lengths on its event loop; sharing
one tokenizer between the two made a length check now and then see a truncated count (a too-long prompt
passed and was silently cut) and an encode now and then see no padding (the request failed). So the length
check owns its own copies, made once at load, and a lock keeps its own callers apart.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any


class TokenCounter:
    def __init__(self, tokenizers: Sequence[Any]):
        if not tokenizers:
            raise ValueError("a model needs at least one tokenizer")
        self._tokenizers = [copy.deepcopy(t) for t in tokenizers]
        self._lock = threading.Lock()

    def count(self, prompt: str) -> int:
        """Tokens the longest-reading tokenizer makes of `prompt`, special tokens included, never truncated."""
        with self._lock:
            # padding/truncation spelled out: whatever mode a copy was in when it was made, this call resets it
            return max(len(t(prompt, padding=False, truncation=False).input_ids) for t in self._tokenizers)
