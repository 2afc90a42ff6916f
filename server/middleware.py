"""One pure-ASGI middleware for every request: request id, API key, body size and time limits, the 500
answer, access log.

Pure ASGI (not BaseHTTPMiddleware) so that the handlers still see the client's http.disconnect, which is
how a request whose client went away gets cancelled. CORS sits outside it (server/app.py): a browser's
preflight carries no credentials by design, so CORS answers it before the key is checked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from .auth import key_ok, needs_key

access_log = logging.getLogger("nitrofusion.access")
log = logging.getLogger("nitrofusion.server")

# A client's X-Request-ID is echoed in a header and written to every log line about the request: only short
# ids of safe characters are kept (UUIDs, hex, trace ids); anything else gets a fresh one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(conn: HTTPConnection) -> str:
    given = conn.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class _ClientGone(Exception):
    pass


def header_bytes(scope) -> int:
    """About what the request line and headers took on the wire."""
    return len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
        len(k) + len(v) + 4 for k, v in scope["headers"])


class GuardMiddleware:
    def __init__(self, app, api_keys: tuple[str, ...], max_body_bytes: int, body_timeout: float = 30.0,
                 max_header_bytes: int = 16 << 10):
        self.app, self.api_keys, self.max_body, self.body_timeout = app, api_keys, max_body_bytes, body_timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        rid = request_id(conn)
        scope.setdefault("state", {})["request_id"] = rid
        # uvicorn's h11 bounds headers that arrive in pieces (max_header_bytes of them still incomplete); ones
        # that arrive whole are counted here
        too_big = header_bytes(scope) > self.max_header_bytes
        if scope["type"] == "websocket":  # its key check and errors live in server/ws.py
            if too_big:
                await send({"type": "websocket.close", "code": 1008, "reason": "request headers too large"})
                return
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        async def answer(body: dict, code: int, **headers: str) -> None:
            if not status["sent"]:
                await JSONResponse(body, code, headers=headers)(scope, receive, send_with_id)

        try:
            if too_big:
                await answer({"detail": f"request headers larger than {self.max_header_bytes} bytes"}, 431,
                             Connection="close")
                return
            if self.api_keys and needs_key(conn.url.path) and not key_ok(conn, self.api_keys):
                await answer({"detail": "missing or invalid API key"}, 401, **{"WWW-Authenticate": "Bearer"})
                return
            body = await self._read_body(conn, receive)
            await self.app(scope, _replay(body, receive), send_with_id)
        except _BodyTooLarge:
            # the rest of the body is never read: close rather than leave it in the connection
            await answer({"detail": f"request body larger than {self.max_body} bytes"}, 413, Connection="close")
        except _BodyTooSlow:
            await answer({"detail": f"request body not received within {self.body_timeout:g} s"}, 408,
                         Connection="close")
        except _ClientGone:
            status["code"] = 499
        except Exception as e:
            # Here rather than in an exception handler: Starlette runs those outside this middleware, where the
            # answer would lose its X-Request-ID. One log line with the traceback, one short answer.
            log.exception("request %s failed: %s", rid, type(e).__name__)
            await answer({"detail": f"internal error: {type(e).__name__} (request id {rid})"}, 500)
        finally:
            access_log.info(json.dumps({
                "request_id": rid, "method": scope["method"], "path": scope["path"], "status": status["code"],
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }))

    async def _read_body(self, conn: HTTPConnection, receive) -> bytes:
        """The whole body, before any handler runs: a declared length or a chunked stream over the limit is
        a 413, and a body that does not arrive within body_timeout (a client sending less than its
        Content-Length, or a byte at a time) is a 408, instead of holding the connection forever."""
        length = conn.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise _BodyTooLarge
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _BodyTooSlow from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """The buffered body as one message, then the client's own messages (its http.disconnect)."""
    delivered = False

    async def replay_receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive
