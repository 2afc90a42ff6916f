"""Optional API keys (NITRO_API_KEYS): `Authorization: Bearer KEY` on generation endpoints.

Browsers cannot set headers on a websocket, so /ws also accepts `?api_key=KEY`, and only /ws: HTTP clients
can send the header, and a key in a URL ends up in proxy logs and browser history (server/net.py keeps it out
of this server's log). Health, readiness and metrics stay open for orchestrators and scrapers.
"""

from __future__ import annotations

import secrets

from starlette.requests import HTTPConnection

PROTECTED_PREFIXES = ("/generate", "/v1/", "/ws")


def key_ok(conn: HTTPConnection, keys: tuple[str, ...]) -> bool:
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    else:
        given = conn.query_params.get("api_key", "") if conn.scope["type"] == "websocket" else ""
    # compare against every key (no short-circuit) so the time taken does not reveal which key matched
    matches = [secrets.compare_digest(given.encode(), k.encode()) for k in keys]
    return bool(given) and any(matches)


def needs_key(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES)


def authorized(conn: HTTPConnection) -> bool:
    keys = conn.app.state.settings.api_keys
    return not keys or not needs_key(conn.url.path) or key_ok(conn, keys)

