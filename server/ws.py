"""GET /ws: progressive refinement over a websocket, for as-you-type clients.

Client -> server: JSON {"prompt", "steps", "seed", "width", "height", "id"?}.
Server -> client, per step: a text frame {"type": "progress", "step", "steps", "seed", "id"} followed by a
binary JPEG of that step's image (a preview of predicted x0; the final step is the full decode), then
{"type": "done", ...}. Every message is answered: its frames and "done", or {"type": "error", "detail", "id"}
(malformed or invalid messages, failures), or {"type": "cancelled", "id"} when a newer request replaced it.
The socket stays open after any of these. Frames above the size limit close it with 1009 (uvicorn enforces
ws_max_size). Frames are JSON in ASCII: an echoed id with a lone surrogate cannot break their encoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from nitrofusion.engine import Cancelled, Job, Progress
from nitrofusion.images import encode_image
from nitrofusion.limits import MAX_SEED

from .auth import authorized
from .errors import text
from .schemas import WsRequest
from .service import error_response, follow

router = APIRouter()
log = logging.getLogger("nitrofusion.server.ws")
PREVIEW_QUALITY = 85


def _errors(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in list(exc.errors())[:8]:
        loc = ".".join(text(str(x), 64) for x in e.get("loc", ()) if x not in ("body", "message")) or "message"
        parts.append(f"{loc}: {text(str(e.get('msg')), 300)}")
    return "; ".join(parts)


def _echo_id(value: object) -> int | str | None:
    """The client's id as an error frame may echo it (what WsRequest accepts, lone surrogates aside, so that
    the client can still match the error to its message); anything else (NaN, objects, huge values) as null."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -MAX_SEED - 1 <= value <= MAX_SEED else None
    if isinstance(value, str):
        return value if len(value) <= 256 else None
    return None


def frame(data: dict) -> str:
    return json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


class Session:
    """One socket. The newest request is the one generated (a newer one cancels it); each request's frames are
    sent by its own task until its done, error or cancelled frame; a progress frame and its image go out
    together (send_lock), so frames of two requests never split a pair."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.service = ws.app.state.service
        self.conn_id = ws.scope.get("state", {}).get("request_id", "-")
        self.job: Job | None = None
        self.senders: set[asyncio.Task] = set()
        self.send_lock = asyncio.Lock()
        self.messages = 0

    async def send(self, data: dict, image: bytes | None = None) -> None:
        async with self.send_lock:
            await self.ws.send_text(frame(data))
            if image is not None:
                await self.ws.send_bytes(image)

    async def error(self, detail: str, req_id: int | str | None = None) -> None:
        await self.send({"type": "error", "detail": detail, "id": req_id})

    def close(self) -> None:
        """The socket is gone: nothing more is sent, and its work leaves the engine."""
        for task in list(self.senders):
            task.cancel()
        if self.job is not None:
            self.job.cancel()

    async def handle(self, raw: str | bytes) -> None:
        self.messages += 1
        try:
            await self._handle(raw, f"{self.conn_id}/{self.messages}")
        except (WebSocketDisconnect, OSError):  # the client is gone (uvicorn's ClientDisconnected is an OSError)
            raise
        except Exception as e:  # a bug must cost one message its answer's content, not the socket
            log.exception("websocket %s: message %d failed", self.conn_id, self.messages)
            await self.error(f"internal error: {type(e).__name__}")

    async def _handle(self, raw: str | bytes, rid: str) -> None:
        try:
            data = json.loads(raw)
        except RecursionError:
            await self.error("malformed message: JSON nested too deeply")
            return
        except ValueError as e:  # not JSON, binary that is not UTF-8, integers too long to convert
            await self.error(f"malformed message: {text(str(e))}")
            return
        if not isinstance(data, dict):
            await self.error("malformed message: expected a JSON object")
            return
        req_id = _echo_id(data.get("id"))
        try:
            params = WsRequest.model_validate(data)
            requests = self.service.requests_for(params, 1, where="message")
            auto = self.service.auto_steps(params, where="message")
        except (ValidationError, RequestValidationError) as e:
            await self.error(_errors(e), req_id)
            return
        if self.job is not None:
            self.job.cancel()  # as-you-type: the newest request wins; its sender answers it "cancelled"
        events: asyncio.Queue[Progress] = asyncio.Queue()
        try:
            job = self.service.stream(requests, events.put_nowait, rid, auto_steps=auto)
        except Exception as e:
            resp = error_response(e, self.service)
            if resp is None:
                raise
            await self.error(json.loads(resp.body)["detail"], params.id)
            return
        self.job = job
        task = asyncio.create_task(self.send_frames(job, events, requests[0], params.id, rid))
        self.senders.add(task)
        task.add_done_callback(self.senders.discard)

    async def send_frames(self, job: Job, events: asyncio.Queue, req, req_id, rid: str) -> None:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        waiter = follow(job)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if events.empty():  # the job ended without (more) frames: say how
                        await self.answer_end(waiter.exception(), req_id, rid)
                        return
                    continue
                event: Progress = getter.result()
                jpeg = await loop.run_in_executor(None, encode_image, event.image, "jpeg", PREVIEW_QUALITY)
                await self.send({"type": "progress", "step": event.step, "steps": event.steps, "seed": event.seed,
                                 "final": event.final, "id": req_id}, jpeg)
                if event.final:
                    await self.send({"type": "done", "steps": job.steps, "seed": req.seed, "id": req_id,
                                     "width": req.width, "height": req.height,
                                     "latency_ms": round((time.perf_counter() - start) * 1000, 1)})
                    return
        except (WebSocketDisconnect, OSError):
            job.cancel()  # the client left mid-send
        except Exception as e:
            job.cancel()
            log.exception("websocket request %s: sending its frames failed", rid)
            await self.error(f"internal error: {type(e).__name__}", req_id)
        finally:
            waiter.cancel()

    async def answer_end(self, exc: BaseException | None, req_id, rid: str) -> None:
        if isinstance(exc, Cancelled):
            await self.send({"type": "cancelled", "detail": "replaced by a newer request", "id": req_id})
            return
        if exc is None:  # images without their final frame: an engine bug, but still an answer
            log.error("websocket request %s: finished without a final image", rid)
            await self.error("internal error: no final image", req_id)
            return
        resp = error_response(exc, self.service)
        await self.error(json.loads(resp.body)["detail"] if resp is not None else f"internal error: {exc}", req_id)


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
    except (WebSocketDisconnect, OSError):
        pass
    finally:
        session.close()
