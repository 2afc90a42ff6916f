"""REST routes: /generate, the OpenAI-style /v1/images/generations and /v1/models, health and metrics."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nitrofusion.images import MEDIA_TYPES, encode_image

from .errors import StrictJSONRoute
from .schemas import (
    GenerateRequest,
    GenerateResponse,
    ImageParams,
    ModelCard,
    ModelList,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)

router = APIRouter(route_class=StrictJSONRoute)  # every body that fails to parse is a 422


async def _encode_all(images, fmt: str) -> list[bytes]:
    """Image encoding runs in the default thread pool: off the event loop and off the engine thread."""
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(None, encode_image, im, fmt) for im in images)))


def _wants_image(request: Request, fmt: str) -> bool:
    accept = request.headers.get("accept", "")
    return MEDIA_TYPES[fmt] in accept and "application/json" not in accept


@router.post("/generate", response_model=GenerateResponse, tags=["images"],
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
                              "description": "JSON; or, with Accept: image/<format> and one image, the image"}})
async def generate(body: GenerateRequest, request: Request):
    service = request.app.state.service
    reqs = service.requests_for(body, body.num_images)
    images, job = await service.run(reqs, request, service.auto_steps(body))
    encoded = await _encode_all(images, body.output_format)
    service.served(job)
    seeds = [r.seed for r in reqs]
    if len(encoded) == 1 and _wants_image(request, body.output_format):
        return Response(encoded[0], media_type=MEDIA_TYPES[body.output_format],
                        headers={"X-Seed": str(seeds[0]), "X-Steps": str(job.steps)})
    return GenerateResponse(images=[base64.b64encode(e).decode() for e in encoded], seed=seeds[0], seeds=seeds,
                            steps=job.steps, width=reqs[0].width, height=reqs[0].height,
                            output_format=body.output_format)


@router.post("/v1/images/generations", response_model=OpenAIImagesResponse, tags=["openai"])
async def openai_images(body: OpenAIImageRequest, request: Request):
    service = request.app.state.service
    width = height = None
    if body.size is not None:
        width, height = (int(v) for v in body.size.split("x"))
    params = ImageParams.model_construct(prompt=body.prompt, steps=body.steps, min_steps=body.min_steps,
                                         max_steps=body.max_steps, seed=body.seed, width=width, height=height,
                                         decoder=body.decoder)
    # A size like "1000x1000" fails the model-dependent checks; report it against `size`.
    reqs = service.requests_for(params, body.n, field_names={"width": "size", "height": "size"})
    images, job = await service.run(reqs, request, service.auto_steps(params))
    encoded = await _encode_all(images, "png")
    service.served(job)
    return OpenAIImagesResponse(created=int(time.time()),
                                data=[OpenAIImage(b64_json=base64.b64encode(e).decode()) for e in encoded])


@router.get("/v1/models", response_model=ModelList, tags=["meta"])
async def models(request: Request):
    pipe = request.app.state.service.pipe
    limits = pipe.size_limits
    source = pipe.model.extras.get("source") or {}
    return ModelList(data=[ModelCard(
        id=pipe.model.name, family=pipe.model.family, native_size=limits.native, min_size=limits.min_side,
        max_size=limits.max_side, shift=pipe.shift, backend=getattr(pipe.backend, "name", "torch"),
        device=str(pipe.backend.device), path=source.get("path"), revision=source.get("revision"),
    )])


@router.get("/healthz", tags=["meta"])
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", tags=["meta"])
async def readyz(request: Request):
    state = request.app.state
    if state.draining:
        return JSONResponse({"status": "draining"}, 503)
    if not state.ready:
        return JSONResponse({"status": "starting"}, 503)
    return {"status": "ready"}


@router.get("/metrics", response_class=PlainTextResponse, tags=["meta"])
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
