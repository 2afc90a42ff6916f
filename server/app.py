"""FastAPI application: POST /generate, GET /healthz. Model work runs on one worker thread that owns
the model, never on the event loop."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from nitrofusion.errors import InvalidRequest
from nitrofusion.generation import GenerationRequest
from nitrofusion.images import encode_image
from nitrofusion.pipeline import Pipeline, load_pipeline

from .schemas import GenerateRequest, GenerateResponse

log = logging.getLogger("nitrofusion.server")


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


def create_app(pipe: Pipeline) -> FastAPI:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nitro-model")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        executor.shutdown(wait=True)  # let in-flight work finish

    app = FastAPI(title="NitroFusion", version="0.1.0", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/generate", response_model=GenerateResponse,
              responses={200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself "
                                                                          "with Accept: image/png"}})
    async def generate(body: GenerateRequest, request: Request):
        native = pipe.model.native_size
        req = GenerationRequest(
            prompt=body.prompt, steps=body.steps,
            seed=secrets.randbits(63) if body.seed is None else body.seed,
            width=body.width or native, height=body.height or native,
        )
        try:
            pipe.validate(req)
        except InvalidRequest as e:
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("body", e.field), "msg": e.reason,
                  "input": getattr(req, e.field, None)}]
            ) from None
        loop = asyncio.get_running_loop()
        image = (await loop.run_in_executor(executor, pipe, [req]))[0]
        png = await loop.run_in_executor(None, encode_image, image, "png")
        headers = {"X-Seed": str(req.seed)}
        if _wants_png(request):
            return Response(png, media_type="image/png", headers=headers)
        return GenerateResponse(images=[base64.b64encode(png).decode()], seed=req.seed, steps=req.steps,
                                width=req.width, height=req.height)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that treats SIGTERM as an ordinary, graceful stop: drain, then exit 0.

    uvicorn re-raises a caught SIGTERM after its graceful shutdown, so the process would end 'killed by
    signal'; orchestrators (and our tests) should see a drained shutdown as a clean exit."""

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals.remove(sig)


def run_server(model: str | None, unet: str | None, shift: int | None, device: str | None, dtype: str | None,
               host: str, port: int, log_level: str = "info") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe = load_pipeline(model, unet, shift, device, dtype)  # load errors surface before the port opens
    log.info("loaded %s (%s, shift %d) on %s", pipe.model.path, pipe.model.family, pipe.shift, pipe.backend.device)
    config = uvicorn.Config(create_app(pipe), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=30)
    DrainingServer(config).run()
