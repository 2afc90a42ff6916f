"""Request and response bodies. Static bounds live here (and in the OpenAPI schema); bounds that depend
on the loaded model (size range, prompt tokens) are checked by the core and reported the same way."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from nitrofusion.limits import MAX_PROMPT_CHARS, MAX_SEED, SIZE_MULTIPLE
from nitrofusion.sampler import MAX_STEPS, MIN_STEPS


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    steps: int = Field(1, ge=MIN_STEPS, le=MAX_STEPS, description="denoising steps, 1-4")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: random; returned in the response")
    width: int | None = Field(None, ge=SIZE_MULTIPLE, le=8192, multiple_of=SIZE_MULTIPLE,
                              description="default: the model's native size")
    height: int | None = Field(None, ge=SIZE_MULTIPLE, le=8192, multiple_of=SIZE_MULTIPLE,
                               description="default: the model's native size")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNG images")
    seed: int
    steps: int
    width: int
    height: int
