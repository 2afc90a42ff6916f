"""What a generation request may ask of a model: the one set of rules the CLI and the server share."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequest
from .sampler import MAX_STEPS, MIN_STEPS

SIZE_MULTIPLE = 8
MAX_PROMPT_CHARS = 2000  # a cheap bound before tokenising; the token limit below is the real one
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SizeLimits:
    """Width/height bounds for one model: from a quarter of its native side up to twice it."""

    native: int
    min_side: int
    max_side: int

    @classmethod
    def for_native(cls, native: int) -> SizeLimits:
        quarter = -(-native // 4)  # ceil
        min_side = max(SIZE_MULTIPLE, -(-quarter // SIZE_MULTIPLE) * SIZE_MULTIPLE)
        return cls(native=native, min_side=min_side, max_side=2 * native)


def check_steps(steps: int) -> None:
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidRequest("steps", f"must be between {MIN_STEPS} and {MAX_STEPS}, got {steps}")


def check_size(field: str, value: int, limits: SizeLimits) -> None:
    if value % SIZE_MULTIPLE:
        raise InvalidRequest(field, f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
    if not limits.min_side <= value <= limits.max_side:
        raise InvalidRequest(
            field,
            f"must be between {limits.min_side} and {limits.max_side} for this model "
            f"(native size {limits.native}), got {value}",
        )


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest("seed", f"must be between 0 and {MAX_SEED}, got {seed}")


def check_prompt(prompt: str, count_tokens, max_tokens: int) -> None:
    """Empty prompts and prompts the text encoder would silently truncate are errors, not surprises."""
    if not prompt.strip():
        raise InvalidRequest("prompt", "must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest("prompt", f"must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    n = count_tokens(prompt)
    if n > max_tokens:
        raise InvalidRequest(
            "prompt", f"is {n} tokens long; the text encoder reads at most {max_tokens} (shorten it)"
        )


DECODERS = ("full", "fast")


def check_decoder(decoder: str) -> None:
    """full: the model's VAE decoder; fast: its tiny decoder (vae_preview/), checked per model by the backend."""
    if decoder not in DECODERS:
        raise InvalidRequest("decoder", f"must be one of {', '.join(DECODERS)}, got {decoder!r}")
