"""Server settings: one object, from `NITRO_*` environment variables, overridden by CLI flags."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from nitrofusion.engine import EngineConfig


def _split(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NITRO_", extra="ignore")

    # model
    model: str | None = Field(None, description="diffusers folder, cached Hugging Face repo id ORG/NAME[@REV] or "
                              "single-file .safetensors checkpoint (nitrofusion/sources.py; default: the bundled model)")
    unet: str | None = None  # a .safetensors file or ORG/NAME/FILE.safetensors from the Hugging Face cache
    config: str | None = None  # single-file checkpoints: their configs + tokenizers (default: the shipped ones)
    shift: int | None = None
    device: str | None = None
    dtype: str | None = None
    # torch | onnxruntime | tensorrt. None (default): onnxruntime on CPU, torch on CUDA; an export folder picks
    # its own. On CPU the first start exports the model to ONNX once, into NITRO_CACHE_DIR (export/cache.py).
    backend: str | None = None
    # network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    # batching engine
    max_batch: int = Field(16, ge=1)
    buckets: Annotated[tuple[int, ...], NoDecode] = (1, 2, 4, 8, 16)
    max_queue: int = Field(256, ge=1)
    request_timeout: float = Field(120.0, gt=0, description="seconds before a request is answered 504")
    batch_wait_ms: float = Field(0.0, ge=0, description="how long an idle engine waits to fill a batch")
    batching: bool = Field(True, description="false: one request at a time (for comparison)")
    latency_target_ms: float | None = Field(None, gt=0, description='what "steps": "auto" aims for, from admission '
                                            "to image (unset: auto means max_steps)")
    # protection
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    max_body_bytes: int = Field(1 << 20, ge=1024)
    ws_max_message_bytes: int = Field(64 << 10, ge=1024)
    # slow and greedy clients (server/net.py, server/middleware.py); an ingress in front is still expected
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's headers")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client has to send a request's body")
    max_connections: int = Field(1024, ge=1, description="open connections (websockets included) before 503")
    max_header_bytes: int = Field(16 << 10, ge=1024, description="request line + headers; more is 431 (or 400)")
    drain_timeout: float = Field(60.0, ge=0, description="seconds SIGTERM waits for in-flight work")
    warmup: bool = True
    # image sizes whose first-use costs (CUDA-graph captures per bucket) are paid before /readyz turns ready,
    # "WIDTHxHEIGHT,..." (default: the model's native size); other sizes capture on their first request
    warmup_sizes: Annotated[tuple[tuple[int, int], ...], NoDecode] = ()
    cache_dir: str | None = None

    @field_validator("buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, v: object) -> object:
        v = _split(v)
        return tuple(int(b) for b in v) if isinstance(v, list) else v

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, v: object) -> object:
        v = _split(v)
        if not isinstance(v, list):
            return v
        sizes = []
        for part in v:
            w, _, h = str(part).partition("x")
            if not (w.isdigit() and h.isdigit()):
                raise ValueError(f"{part!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
            sizes.append((int(w), int(h)))
        return tuple(sizes)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _parse_list(cls, v: object) -> object:
        v = _split(v)
        return tuple(v) if isinstance(v, list) else v

    @field_validator("api_keys", mode="wrap")
    @classmethod
    def _keys_or_nothing(cls, v: object, handler) -> tuple[str, ...]:
        """NITRO_API_KEYS=" , " is a mistake, not a wish for an open server: only an empty value means no auth."""
        keys = handler(v)
        if not keys and isinstance(v, str) and v != "":
            raise ValueError(f"{v!r} holds no API key: give comma-separated keys, or leave it empty for no auth")
        return keys

    @model_validator(mode="after")
    def _engine_config_is_valid(self) -> ServerSettings:
        self.engine_config()  # raises ValueError with a message that says how to fix it
        return self

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch=self.max_batch, buckets=self.buckets, max_queue=self.max_queue,
            request_timeout_s=self.request_timeout, batch_wait_ms=self.batch_wait_ms, batching=self.batching,
            latency_target_ms=self.latency_target_ms,
        )
