"""One pure-ASGI middleware for every HTTP request: request id, API key, body size limit, access log.

Pure ASGI (not BaseHTTPMiddleware) so that the handlers still see the client's http.disconnect, which is
how a request whose client went away gets cancelled.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from .auth import key_ok, needs_key

access_log = logging.getLogger("nitrofusion.access")


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    def __init__(self, app, api_keys: tuple[str, ...], max_body_bytes: int):
        self.app, self.api_keys, self.max_body = app, api_keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        rid = conn.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        try:
            if self.api_keys and needs_key(conn.url.path) and not key_ok(conn, self.api_keys):
                await JSONResponse({"detail": "missing or invalid API key"}, 401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_with_id)
                return
            length = conn.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                raise _BodyTooLarge
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            if not status["sent"]:
                await JSONResponse({"detail": f"request body larger than {self.max_body} bytes"}, 413)(
                    scope, receive, send_with_id)
        finally:
            access_log.info(json.dumps({
                "request_id": rid, "method": scope["method"], "path": scope["path"], "status": status["code"],
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }))
