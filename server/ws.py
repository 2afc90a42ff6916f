"""GET /ws: progressive refinement over a websocket, for as-you-type clients.

Client -> server: JSON {"prompt", "steps", "seed", "width", "height", "id"?}.
Server -> client, per step: a text frame {"type": "progress", "step", "steps", "seed", "id"} followed by a
binary JPEG of that step's image (a preview of predicted x0; the final step is the full decode), then
{"type": "done", ...}. A new request on the socket cancels the unfinished one. A malformed message gets
{"type": "error", "detail"} and the socket stays open. Frames above the size limit close it with 1009
(uvicorn enforces ws_max_size).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from nitrofusion.engine import Job, Progress
from nitrofusion.images import encode_image

from .auth import authorized
from .schemas import WsRequest
from .service import error_response

router = APIRouter()
log = logging.getLogger("nitrofusion.server.ws")
PREVIEW_QUALITY = 85


def _errors(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "message")) or "message"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


class Session:
    """One socket: at most one job in flight; frames for it are sent in order by one task."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.service = ws.app.state.service
        self.job: Job | None = None
        self.sender: asyncio.Task | None = None

    async def error(self, detail: str, req_id=None) -> None:
        await self.ws.send_json({"type": "error", "detail": detail, "id": req_id})

    def cancel_current(self) -> None:
        if self.job is not None and not self.job.future.done():
            self.job.cancel()
        if self.sender is not None:
            self.sender.cancel()
        self.job = self.sender = None

    async def handle(self, raw: str | bytes) -> None:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("expected a JSON object")
        except (ValueError, TypeError) as e:
            await self.error(f"malformed message: {e}")
            return
        try:
            params = WsRequest.model_validate(data)
            requests = self.service.requests_for(params, 1, where="message")
        except (ValidationError, RequestValidationError) as e:
            await self.error(_errors(e), data.get("id"))
            return
        self.cancel_current()  # as-you-type: the newest request wins
        events: asyncio.Queue[Progress] = asyncio.Queue()
        try:
            self.job = self.service.stream(requests, events.put_nowait)
        except Exception as e:
            resp = error_response(e, self.service)
            if resp is None:
                raise
            await self.error(json.loads(resp.body)["detail"], params.id)
            return
        self.sender = asyncio.create_task(self.send_frames(self.job, events, requests[0], params.id))

    async def send_frames(self, job: Job, events: asyncio.Queue, req, req_id) -> None:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(asyncio.wrap_future(job.future))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if waiter.exception() is not None:  # failed, timed out or cancelled
                        resp = error_response(waiter.exception(), self.service)
                        detail = json.loads(resp.body)["detail"] if resp is not None else str(waiter.exception())
                        await self.error(detail, req_id)
                        return
                    if events.empty():  # cannot happen: final events are queued before the result
                        return
                    continue
                event: Progress = getter.result()
                jpeg = await loop.run_in_executor(None, encode_image, event.image, "jpeg", PREVIEW_QUALITY)
                await self.ws.send_json({"type": "progress", "step": event.step, "steps": event.steps,
                                         "seed": event.seed, "final": event.final, "id": req_id})
                await self.ws.send_bytes(jpeg)
                if event.final:
                    await self.ws.send_json({"type": "done", "steps": req.steps, "seed": req.seed, "id": req_id,
                                             "width": req.width, "height": req.height,
                                             "latency_ms": round((time.perf_counter() - start) * 1000, 1)})
                    return
        finally:
            waiter.cancel()


@router.websocket("/ws")
async def websocket_endpoint(ws: WebSocket):
    if not authorized(ws):
        await ws.close(code=1008, reason="missing or invalid API key")
        return
    await ws.accept()
    session = Session(ws)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            await session.handle(raw)
    except WebSocketDisconnect:
        pass
    finally:
        session.cancel_current()
