"""Below ASGI: what the server bounds and hides at the connection level, on top of uvicorn's h11 protocol.

uvicorn times out idle keep-alive connections but not a request in progress: a client that sends its
headers a byte at a time holds its connection (and its slot) forever. Its concurrency limit answers 503 to
HTTP requests past it, but websocket upgrades skip the check. And its websocket log lines print the path
with the query string, where browsers put the API key. The body's own timeout and size limit are ASGI-level
(server/middleware.py). None of this replaces an ingress in front of a server on the internet.
"""

from __future__ import annotations

import logging
import re

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("nitrofusion.server")


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a request's headers must arrive within `header_timeout` seconds of the
    connection opening (or of the previous response, on a kept-alive connection), and websocket upgrades
    count against `limit_concurrency` like HTTP requests do."""

    header_timeout: float = 10.0  # bound per server by bounded_protocol()
    _header_timer = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request line and all its headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request on this connection is bounded too

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:  # uvicorn's own rule for HTTP requests
            self.logger.warning("Exceeded concurrency limit.")
            self._refuse(503, b"Service Unavailable: too many connections")
            return
        super().handle_websocket_upgrade(event)

    def _refuse(self, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # No response: HTTP has none for a request that never arrived. Idle keep-alive connections are
            # usually closed sooner by uvicorn's own keep-alive timeout.
            log.info("closing connection from %s: no complete request headers within %g s",
                     self.client[0] if self.client else "?", self.header_timeout)
            self.transport.close()


def bounded_protocol(header_timeout: float) -> type[BoundedH11Protocol]:
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"header_timeout": header_timeout})


class RedactQueries(logging.Filter):
    """Query strings out of log lines: uvicorn logs websocket paths with theirs, and /ws?api_key=KEY is how
    browsers pass a key. The whole query goes (it may carry the key percent-encoded as well)."""

    QUERY = re.compile(r"(/[^\s?\"']*)\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem, not a reason to drop it
            return True
        redacted = self.QUERY.sub(r"\1?[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_uvicorn_logs() -> None:
    """Install RedactQueries on uvicorn's loggers (after uvicorn.Config has configured them; once)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueries) for f in logger.filters):
            logger.addFilter(RedactQueries())
