"""What lives in uvicorn and on the wire, against real server processes: SIGTERM drains, a client that leaves
stops costing compute, slow clients are cut off, the connection cap holds (websockets included), API keys
never reach the log. Queueing, timeouts, keys, CORS and body limits are tested in-process
(tests/test_server.py, tests/test_server_guard.py).

Timing is made deterministic with NITRO_BATCH_WAIT_MS: an idle engine holds its first batch open that long,
so requests sent meanwhile are known to be queued (no sleeps decide an assertion).
"""

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .server_fixtures import LoggedServer, metric, wait_for

BODY = {"prompt": "a red circle", "steps": 2, "seed": 1}
GOOD_KEY, BAD_KEY = "k-good-3f9a1c", "k-bad-77e0d2"
AUTH = {"Authorization": f"Bearer {GOOD_KEY}"}
CAP = 6


def _guarded_server(model_dir) -> LoggedServer:
    """A server with short client timeouts, a small connection cap, API keys and a batch wait."""
    env = {"NITRO_API_KEYS": GOOD_KEY, "NITRO_HEADER_TIMEOUT": "1", "NITRO_BODY_TIMEOUT": "1",
           "NITRO_MAX_CONNECTIONS": str(CAP), "NITRO_BATCH_WAIT_MS": "2000"}
    srv = LoggedServer("--model", model_dir, "--device", "cpu", env=env)
    srv.wait_ready("/readyz")
    return srv


@pytest.fixture(scope="module")
def guarded(tiny_sd_dir):
    """One such server shared by the tests here (one start instead of one per test); they pass in any order."""
    srv = _guarded_server(tiny_sd_dir)
    yield srv
    srv.stop()


@pytest.fixture
def draining(tiny_sd_dir):
    """A server of its own for the SIGTERM test, which ends it."""
    srv = _guarded_server(tiny_sd_dir)
    yield srv
    srv.stop()


def raw_connection(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(30)  # far past the server's 1 s limits: a timeout here means the server never cut us off
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_connection_cap_holds_for_http_and_websockets(guarded):
    # First in this module, so that no earlier test's connection lingers; still, count what was accepted.
    url = guarded.url.replace("http", "ws") + f"/ws?api_key={GOOD_KEY}"
    sockets = []
    try:
        with pytest.raises(InvalidStatus) as refused:
            for _ in range(CAP + 1):
                sockets.append(connect(url))
        assert refused.value.response.status_code == 503
        assert 1 <= len(sockets) <= CAP - 1
        assert httpx.get(guarded.url + "/healthz").status_code == 503  # uvicorn's own limit, for HTTP
    finally:
        for ws in sockets:
            ws.close()
    wait_for(lambda: httpx.get(guarded.url + "/healthz").status_code == 200)


def test_headers_sent_a_byte_at_a_time_are_cut_off(guarded):
    with raw_connection(guarded) as sock:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ":
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)  # the client's pace, not a timing assertion
        assert read_all(sock) == b""  # closed without an answer: there was no request to answer
    with raw_connection(guarded) as sock:  # headers that never end at all
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert read_all(sock) == b""


def test_a_body_shorter_than_its_content_length_is_a_408(guarded):
    with raw_connection(guarded) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + GOOD_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"not received within 1 s" in answer


def test_oversized_headers_are_refused(guarded):
    assert httpx.get(guarded.url + "/healthz", headers={"X-Big": "a" * (20 << 10)}).status_code == 431
    with raw_connection(guarded) as sock:  # never finished, only growing: uvicorn's h11 stops buffering
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 10))
        assert read_all(sock).startswith(b"HTTP/1.1 400 ")


def test_a_client_that_disconnects_stops_costing_compute(guarded):
    cancelled = metric(guarded.url, "nitro_cancellations_total")
    steps_before = metric(guarded.url, "nitro_unet_step_seconds_count")
    with pytest.raises(httpx.ReadTimeout):  # gone while queued (the engine waits 2 s for company)
        httpx.post(guarded.url + "/generate", json={**BODY, "steps": 4}, headers=AUTH, timeout=0.5)
    wait_for(lambda: metric(guarded.url, "nitro_cancellations_total") == cancelled + 1)
    assert metric(guarded.url, "nitro_unet_step_seconds_count") == steps_before  # no UNet step for it
    assert httpx.post(guarded.url + "/generate", json=BODY, headers=AUTH, timeout=60).status_code == 200


def test_api_keys_never_reach_the_log_and_request_ids_do(guarded):
    base = guarded.url.replace("http", "ws") + "/ws"
    with connect(f"{base}?api_key={GOOD_KEY}") as ws:
        ws.send(json.dumps({"prompt": "a cat", "seed": 1}))
        assert json.loads(ws.recv(timeout=60))["type"] == "progress"
    for query in (f"?api_key={BAD_KEY}", f"?x=1&api%5Fkey={BAD_KEY}"):
        with pytest.raises(InvalidStatus) as refused, connect(base + query):
            pass
        assert refused.value.response.status_code == 403
    assert httpx.get(guarded.url + "/healthz", headers={"X-Request-ID": "abc123"}).headers["x-request-id"] == "abc123"
    wait_for(lambda: '"request_id": "abc123"' in guarded.log() and guarded.log().count('"WebSocket /ws?') >= 3)
    log = guarded.log()
    assert GOOD_KEY not in log and BAD_KEY not in log
    assert '"WebSocket /ws?[redacted]" [accepted]' in log and '"WebSocket /ws?[redacted]" 403' in log


def test_sigterm_drains_in_flight_work_then_exits_0(draining):
    guarded = draining
    results = {}

    def call(i):
        results[i] = httpx.post(guarded.url + "/generate", json={**BODY, "seed": i}, headers=AUTH, timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(guarded.url, "nitro_queue_depth") == 3)  # held by the 2 s batch wait
    guarded.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(guarded.url + "/readyz").status_code == 503)
    assert httpx.get(guarded.url + "/readyz").json() == {"status": "draining"}
    late = httpx.post(guarded.url + "/generate", json=BODY, headers=AUTH, timeout=60)
    assert late.status_code == 503
    for t in threads:
        t.join(60)
    assert [results[i].status_code for i in range(3)] == [200, 200, 200]
    assert guarded.proc.wait(60) == 0
