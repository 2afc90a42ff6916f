#!/usr/bin/env python3
"""Container health check: exit 0 when the server in this container answers GET /healthz with 200.

    healthcheck.py [PATH]        (default /healthz; /readyz asks for "model loaded and warmed")

Used by the Dockerfiles' HEALTHCHECK and by docker-compose.yml. It asks NITRO_PORT (default 8000) on the
loopback address, or on NITRO_HOST when the server is bound to one specific address. Standard library
only, so it needs neither curl nor anything else in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]", "localhost", "127.0.0.1", "::1"}


def url(path: str) -> str:
    host = os.environ.get("NITRO_HOST", "").strip()
    port = os.environ.get("NITRO_PORT", "").strip() or "8000"
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port}{path}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    try:
        with urllib.request.urlopen(url(path), timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"healthcheck {path}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
