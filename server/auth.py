"""Optional API keys (NITRO_API_KEYS): `Authorization: Bearer KEY` on generation endpoints.

Browsers cannot set headers on a websocket, so /ws also accepts `?api_key=KEY`. Health, readiness and
metrics stay open for orchestrators and scrapers.
"""

from __future__ import annotations

import secrets

from starlette.requests import HTTPConnection

PROTECTED_PREFIXES = ("/generate", "/v1/", "/ws")


def key_ok(conn: HTTPConnection, keys: tuple[str, ...]) -> bool:
    auth = conn.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else conn.query_params.get("api_key", "")
    # compare against every key (no short-circuit) so the time taken does not reveal which key matched
    matches = [secrets.compare_digest(given.encode(), k.encode()) for k in keys]
    return bool(given) and any(matches)


def needs_key(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES)


def authorized(conn: HTTPConnection) -> bool:
    keys = conn.app.state.settings.api_keys
    return not keys or not needs_key(conn.url.path) or key_ok(conn, keys)

