"""Request and response bodies. Static bounds live here (and in the OpenAPI schema); bounds that depend
on the loaded model (size range, prompt tokens) are checked by the core and reported the same way."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from nitrofusion.limits import MAX_PROMPT_CHARS, MAX_SEED, SIZE_MULTIPLE
from nitrofusion.sampler import MAX_STEPS, MIN_STEPS

MAX_IMAGES = 4
Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
Steps = Field(1, description='denoising steps, 1-4, or "auto": the server picks between min_steps and max_steps '
                             "by load, aiming at its latency target (NITRO_LATENCY_TARGET_MS)")


def _steps(value: Any) -> int | str:
    """1-4 or "auto". One validator (not a union of two types) so an error names `steps` itself, not a branch."""
    if isinstance(value, str):
        if value == "auto":
            return value
        raise ValueError(f'must be an integer {MIN_STEPS}-{MAX_STEPS} or "auto", got the string {value[:20]!r}')
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'must be an integer {MIN_STEPS}-{MAX_STEPS} or "auto"')  # noqa: TRY004 - pydantic reports ValueError only
    if not MIN_STEPS <= value <= MAX_STEPS:
        raise ValueError(f"must be between {MIN_STEPS} and {MAX_STEPS}, got {value}")
    return value


StepsField = Annotated[Any, PlainValidator(_steps), WithJsonSchema(
    {"oneOf": [{"type": "integer", "minimum": MIN_STEPS, "maximum": MAX_STEPS}, {"const": "auto"}]})]
MinSteps = Field(MIN_STEPS, ge=MIN_STEPS, le=MAX_STEPS, description='with "steps": "auto", the fewest steps')
MaxSteps = Field(MAX_STEPS, ge=MIN_STEPS, le=MAX_STEPS, description='with "steps": "auto", the most steps')
Decoder = Field("full", description="full: the model's VAE decoder; fast: its tiny decoder (vae_preview/), "
                                     "several times cheaper and a little softer")
Seed = Field(None, ge=0, le=MAX_SEED, description="default: random; returned in the response")


def _side(what: str):
    return Field(None, ge=SIZE_MULTIPLE, le=8192, multiple_of=SIZE_MULTIPLE,
                 description=f"{what} in pixels, a multiple of 8 (default: the model's native size)")


class ImageParams(BaseModel):
    """What every interface asks for one prompt. Strict: `"seed": false` or `"steps": "2"` are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Prompt
    steps: StepsField = Steps
    min_steps: int = MinSteps
    max_steps: int = MaxSteps
    seed: int | None = Seed
    width: int | None = _side("width")
    height: int | None = _side("height")
    decoder: Literal["full", "fast"] = Decoder


class GenerateRequest(ImageParams):
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="images for this prompt (seeds seed, seed+1, ...)")
    output_format: Literal["png", "jpeg", "webp"] = "png"


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded images in output_format")
    seed: int
    seeds: list[int]
    steps: int
    width: int
    height: int
    output_format: str


WsId = Annotated[int, Field(ge=-MAX_SEED - 1, le=MAX_SEED)] | Annotated[str, Field(max_length=256)]


class WsRequest(ImageParams):
    # bounded: it is echoed in every frame of its request
    id: WsId | None = Field(None, description="echoed in every frame for this request (a 64-bit int or text)")


class OpenAIImageRequest(BaseModel):
    """The subset of the OpenAI Images API that makes sense here (plus `steps` and `seed`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Prompt
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, pattern=r"^\d{1,5}x\d{1,5}$", description='"WIDTHxHEIGHT", e.g. "1024x1024"')
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: nothing is stored to link")
    model: str | None = None
    user: str | None = None
    steps: StepsField = Steps
    min_steps: int = MinSteps
    max_steps: int = MaxSteps
    seed: int | None = Seed
    decoder: Literal["full", "fast"] = Decoder


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "nitrofusion"
    family: str
    native_size: int
    min_size: int
    max_size: int
    min_steps: int = MIN_STEPS
    max_steps: int = MAX_STEPS
    shift: int
    backend: str
    device: str
    path: str | None = None  # what `id` (the model as given) resolved to: folder, hub snapshot or single file
    revision: str | None = None  # the hub snapshot's commit, for a cached repo id


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
