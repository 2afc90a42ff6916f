"""Behaviour under stress against real server processes: 429 with Retry-After and nothing accepted lost,
504 past the timeout, disconnects cancel work, SIGTERM drains, API keys, CORS, body size limit.

Timing is made deterministic with NITRO_BATCH_WAIT_MS: an idle engine holds its first batch open that long,
so requests sent meanwhile are known to be queued (no sleeps decide an assertion).
"""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .helpers import ServerProcess

BODY = {"prompt": "a red circle", "steps": 2, "seed": 1}


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(name)


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)  # polling a condition, not asserting a duration
    raise TimeoutError("condition not reached")


@pytest.fixture
def start(tiny_sd_dir):
    servers = []

    def make(**env):
        srv = ServerProcess("--model", tiny_sd_dir, "--device", "cpu",
                            env={f"NITRO_{k.upper()}": str(v) for k, v in env.items()})
        srv.wait_ready("/readyz")
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        if s.proc.poll() is None:
            s.stop()


def test_queue_full_gets_429_with_retry_after_and_accepted_requests_finish(start):
    srv = start(max_queue=2, batch_wait_ms=3000)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, srv.url + "/generate", json={**BODY, "seed": i}, timeout=60)
                   for i in range(8)]
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 2 and codes.count(429) == 6, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
    assert metric(srv.url, 'nitro_rejections_total{reason="queue_full"}') == 6


def test_past_the_request_timeout_is_504(start):
    srv = start(request_timeout=0.2, batch_wait_ms=1500)
    r = httpx.post(srv.url + "/generate", json=BODY, timeout=60)
    assert r.status_code == 504 and "timed out" in r.json()["detail"]
    assert httpx.get(srv.url + "/healthz").status_code == 200


def test_a_client_that_disconnects_stops_costing_compute(start):
    srv = start(batch_wait_ms=2000)
    steps_before = metric(srv.url, "nitro_unet_step_seconds_count")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/generate", json={**BODY, "steps": 4}, timeout=0.5)  # gone while queued
    wait_for(lambda: metric(srv.url, "nitro_cancellations_total") == 1)
    assert metric(srv.url, "nitro_unet_step_seconds_count") == steps_before  # no UNet step for it
    assert httpx.post(srv.url + "/generate", json=BODY, timeout=60).status_code == 200


def test_sigterm_drains_in_flight_work_then_exits_0(start):
    srv = start(batch_wait_ms=3000, drain_timeout=60)
    results = {}

    def call(i):
        results[i] = httpx.post(srv.url + "/generate", json={**BODY, "seed": i}, timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(srv.url, "nitro_queue_depth") == 3)
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(srv.url + "/readyz").status_code == 503)
    assert httpx.get(srv.url + "/readyz").json() == {"status": "draining"}
    late = httpx.post(srv.url + "/generate", json=BODY, timeout=60)
    assert late.status_code == 503
    for t in threads:
        t.join(60)
    assert [results[i].status_code for i in range(3)] == [200, 200, 200]
    assert srv.proc.wait(60) == 0


def test_api_keys_cors_and_body_limit(start):
    srv = start(api_keys="k1,k2", max_body_bytes=4096)
    url = srv.url + "/generate"
    assert httpx.post(url, json=BODY).status_code == 401
    assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert httpx.get(srv.url + "/v1/models").status_code == 401
    assert httpx.get(srv.url + "/healthz").status_code == 200  # probes stay open
    assert httpx.get(srv.url + "/metrics").status_code == 200
    big = {"prompt": "a" * 10_000}
    r = httpx.post(url, json=big, headers={"Authorization": "Bearer k1"})
    assert r.status_code == 413
    # the websocket takes the key as ?api_key= (browsers cannot set headers on it)
    ws_url = srv.url.replace("http", "ws") + "/ws"
    with pytest.raises(InvalidStatus) as refused, connect(ws_url):  # refused before the handshake completes
        pass
    assert refused.value.response.status_code == 403
    with connect(ws_url + "?api_key=k1") as ws:
        ws.send(json.dumps({"prompt": "a cat", "steps": 1, "seed": 1}))
        assert json.loads(ws.recv(timeout=60))["type"] == "progress"
    # CORS is closed unless configured: no allow-origin header for a foreign origin
    pre = httpx.options(url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_when_configured(start):
    srv = start(cors_origins="https://app.example")
    pre = httpx.options(srv.url + "/generate", headers={"Origin": "https://app.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert pre.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.options(srv.url + "/generate", headers={"Origin": "https://evil.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert other.headers.get("access-control-allow-origin") is None


def test_request_ids_are_returned_and_logged(start):
    srv = start()
    r = httpx.get(srv.url + "/healthz", headers={"X-Request-ID": "abc123"})
    assert r.headers["x-request-id"] == "abc123"
    assert len(httpx.get(srv.url + "/healthz").headers["x-request-id"]) == 16
    out = srv.stop()
    assert '"request_id": "abc123"' in out
