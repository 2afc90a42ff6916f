"""Bad input is a 422 that names the field, whatever the input: never a 400 from the body parser, never a
500 from echoing the input back.

FastAPI's own 422 answer echoes each error's input through `json.dumps`, which cannot write NaN or Infinity
(valid to Python's parser, `"seed": NaN`), nor a lone surrogate (`"\\ud800"` in a prompt or in an unknown
field's name), and recurses into deeply nested input. Here the echo is a bounded, JSON-safe copy.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

MAX_ECHO_DEPTH = 4
MAX_ECHO_ITEMS = 16
MAX_ECHO_CHARS = 200
MAX_ERRORS = 16


def text(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as text any UTF-8 writer accepts (lone surrogates as \\udXXX escapes), cut to `limit`."""
    clean = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return clean if len(clean) <= limit else clean[:limit] + "..."


def echo(value: Any, depth: int = 0) -> Any:
    """A JSON-safe, size-bounded copy of client input, to show it back in an error."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 256 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, str):
        return text(value)
    if isinstance(value, bytes):
        return text(value.decode("utf-8", "replace"))
    if depth >= MAX_ECHO_DEPTH and isinstance(value, (dict, list, tuple)):
        return "..."
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ECHO_ITEMS]
        return {text(str(k), 64): echo(v, depth + 1) for k, v in items}
    if isinstance(value, (list, tuple)):
        return [echo(v, depth + 1) for v in value[:MAX_ECHO_ITEMS]]
    return text(str(value))


def safe_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for err in list(exc.errors())[:MAX_ERRORS]:
        item = {"type": text(str(err.get("type", "value_error")), 64),
                "loc": [echo(x) if isinstance(x, int) else text(str(x), 64) for x in err.get("loc", ())],
                "msg": text(str(err.get("msg", "")), 500)}
        if "input" in err:
            item["input"] = echo(err["input"])
        if isinstance(err.get("ctx"), dict):
            item["ctx"] = echo(err["ctx"])
        out.append(item)
    return out


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's body shape; plus OpenAI's error object on /v1 routes so that its clients show why."""
    errors = safe_errors(exc)
    body: dict[str, Any] = {"detail": errors}
    if request.url.path.startswith("/v1/"):
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        param = str(first["loc"][-1]) if first["loc"] else None
        body["error"] = {"message": f"{param}: {first['msg']}", "type": "invalid_request_error", "param": param,
                         "code": None}
    return JSONResponse(body, 422)


class _JSONRequest(Request):
    async def json(self) -> Any:
        """Every way a body fails to parse is a JSON decode error (FastAPI's 422), not an 'error parsing the
        body' 400: nesting deeper than the parser's recursion limit, bytes that are not UTF-8, integers too long
        to convert."""
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body)
            except json.JSONDecodeError:
                raise
            except RecursionError:
                raise json.JSONDecodeError("nested too deeply", "", 0) from None
            except ValueError as e:  # UnicodeDecodeError, int digit limit
                raise json.JSONDecodeError(text(str(e)), "", 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body errors are all 422s (see _JSONRequest)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request):
            return await handler(_JSONRequest(request.scope, request.receive))

        return route_handler
