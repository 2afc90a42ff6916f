"""Hostile and careless HTTP clients, in-process (issue 20): bad input is a 422 naming the field whatever it
holds, API keys and CORS work together, limits hold, every failure is answered and logged with its request id.
What lives in uvicorn (slow clients, connection caps, its log lines) is in tests/test_server_stress.py."""

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cli.main import main as cli_main
from nitrofusion.engine import Cancelled

from .server_fixtures import ServerFailingBackend, ServerFakeBackend, fake_pipeline, in_process, metric, wait_for

BODY = {"prompt": "a red circle", "steps": 2, "seed": 1}
KEY = {"Authorization": "Bearer k2"}
APP = "https://app.example"


@pytest.fixture(scope="module")
def client(_loaded_torch_pipelines):  # the session's models (fake_pipeline reads model and sampler only)
    with in_process(fake_pipeline(_loaded_torch_pipelines)) as c:
        yield c


def strict_json(text: str):
    """What any JSON parser must accept: no NaN or Infinity, no lone surrogates."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    value = json.loads(text, parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on lone surrogates
    return value


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"prompt": "a", "seed": NaN}', "seed"),
        ('{"prompt": "a", "seed": Infinity}', "seed"),
        ('{"prompt": "a", "seed": -Infinity}', "seed"),
        ('{"prompt": "a\\ud800"}', "prompt"),
        ('{"prompt": "a", "steps": ' + "9" * 5000 + "}", None),  # too long for Python's int conversion
        ('{"prompt": ' + "[" * 10_000 + "]" * 10_000 + "}", None),  # deeper than the parser's recursion limit
        ('{"prompt": ' + "[" * 900 + "]" * 900 + "}", "prompt"),  # parses; its echo must not recurse
        ('{"prompt": "a", "\\ud800": 1}', None),
    ],
)
def test_hostile_json_is_a_422_with_a_request_id(client, path, raw, field):
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.headers["x-request-id"]
    body = strict_json(r.text)
    if field is not None:
        assert body["detail"][0]["loc"][-1] == field


def test_bytes_that_are_not_utf8_are_a_422(client):
    r = client.post("/generate", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and strict_json(r.text)


def test_an_unexpected_error_is_a_500_with_its_request_id_logged_once(pipelines, caplog):
    class UnencodableImages(ServerFakeBackend):
        def decode(self, latents):
            # uint8 arrays the engine passes on, with 5 channels: not an image PIL can write
            return np.zeros((len(latents), 2, 2, 5), dtype=np.uint8)

    with in_process(fake_pipeline(pipelines, backend=UnencodableImages())) as c, caplog.at_level(logging.ERROR):
        r = c.post("/generate", json=BODY, headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert "req-500" in r.json()["detail"]
    assert [rec.getMessage() for rec in caplog.records if "req-500" in rec.getMessage()] == [
        "request req-500 failed: TypeError"]


def test_generation_failures_are_logged_with_request_id_and_cause(pipelines, caplog):
    pipe = fake_pipeline(pipelines, backend=ServerFailingBackend({"boom": "unet"}))
    with in_process(pipe) as c, caplog.at_level(logging.WARNING, logger="nitrofusion.server"):
        r = c.post("/generate", json={**BODY, "prompt": "boom"}, headers={"X-Request-ID": "req-fail"})
        assert r.status_code == 500 and "generation failed" in r.json()["detail"]
        assert metric(c, 'nitro_failures_total{reason="GenerationFailed"}') == 1
        with c.websocket_connect("/ws", headers={"X-Request-ID": "ws-fail"}) as ws:
            ws.send_text(json.dumps({"prompt": "boom", "id": 7}))
            frame = ws.receive_json()
    assert frame["type"] == "error" and frame["id"] == 7 and "generation failed" in frame["detail"]
    lines = [rec.getMessage() for rec in caplog.records]
    assert "request req-fail failed: GenerationFailed: denoising failed: injected UNet failure" in lines
    assert "request ws-fail/1 failed: GenerationFailed: denoising failed: injected UNet failure" in lines


def test_a_websocket_closed_mid_generation_leaves_the_engine_its_future(pipelines):
    """Closing a socket cancels its request through the engine (job.cancel), never by cancelling the future the
    engine thread sets: once cancelled, the engine's set_result raised and failed every request in its
    iteration. Here an HTTP request holds the engine while a websocket request waits, and the socket closes."""
    pipe = fake_pipeline(pipelines)
    pipe.backend.gate = threading.Event()
    with in_process(pipe) as c, ThreadPoolExecutor(1) as pool:
        service, jobs = c.app.state.service, []
        stream = service.stream
        service.stream = lambda *args, **kw: jobs.append(stream(*args, **kw)) or jobs[-1]
        other = pool.submit(c.post, "/generate", json=BODY)
        assert pipe.backend.entered.wait(30)
        with c.websocket_connect("/ws") as ws:
            ws.send_text(json.dumps({"prompt": "a dog", "steps": 2}))
            wait_for(lambda: jobs)
        with c.websocket_connect("/ws") as ws:  # a round trip: the closed session's cleanup has run
            ws.send_text("[]")
            assert ws.receive_json()["type"] == "error"
        assert jobs[0].cancelled and not jobs[0].future.cancelled()
        pipe.backend.gate.set()
        assert other.result().status_code == 200
        wait_for(jobs[0].future.done)
        assert isinstance(jobs[0].future.exception(), Cancelled)  # answered by the engine itself


def test_api_keys_and_body_limit(pipelines):
    with in_process(fake_pipeline(pipelines), api_keys="k1,k2", max_body_bytes=4096) as c:
        assert c.post("/generate", json=BODY).status_code == 401
        assert c.post("/generate", json=BODY, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/generate", json=BODY, headers=KEY).status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/healthz").status_code == 200  # probes stay open
        assert c.get("/metrics").status_code == 200
        # ?api_key= is for the websocket only (browsers cannot set its headers); HTTP clients send the header
        assert c.post("/generate?api_key=k1", json=BODY).status_code == 401
        assert c.get("/v1/models?api_key=k1").status_code == 401
        with c.websocket_connect("/ws?api_key=k1") as ws:
            ws.send_text(json.dumps({"prompt": "a cat", "seed": 1}))
            assert ws.receive_json()["type"] == "progress"
        big = json.dumps({"prompt": "a" * 10_000}).encode()
        assert c.post("/generate", content=big, headers=KEY).status_code == 413
        # chunked (no Content-Length): the limit is counted as the body arrives, still a 413
        chunked = c.post("/generate", content=iter([big[:3000], big[3000:]]), headers=KEY)
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413 and "larger than 4096" in chunked.json()["detail"]


def test_cors_preflight_is_answered_before_the_key_check(pipelines):
    with in_process(fake_pipeline(pipelines), api_keys="k1,k2", cors_origins=APP) as c:
        pre = c.options("/generate", headers={"Origin": APP, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == APP
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        ok = c.post("/generate", json=BODY, headers={**KEY, "Origin": APP})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
        refused = c.post("/generate", json=BODY, headers={"Origin": APP})  # the page can read why
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP
        other = c.options("/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method":
                                                "POST"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_is_closed_unless_configured(client):
    pre = client.options("/generate", headers={"Origin": APP, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_request_ids_are_echoed_only_when_short_and_plain(client, caplog):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123.x:y_z"}).headers["x-request-id"] == \
        "abc-123.x:y_z"
    assert len(client.get("/healthz").headers["x-request-id"]) == 16
    with caplog.at_level(logging.INFO, logger="nitrofusion.access"):
        for hostile in ("x" * 100_000, "a b", "<script>", "id\u00e9".encode()):
            rid = client.get("/healthz", headers={"X-Request-ID": hostile}).headers["x-request-id"]
            assert rid != hostile and len(rid) == 16
    assert max(len(rec.getMessage()) for rec in caplog.records) < 300
    assert any('"request_id": "' in rec.getMessage() for rec in caplog.records)


def test_oversized_headers_are_a_431(client):
    r = client.get("/healthz", headers={"X-Big": "a" * (17 << 10)})
    assert r.status_code == 431 and "headers larger than" in r.json()["detail"]
    assert client.get("/healthz", headers={"X-Fine": "a" * (8 << 10)}).status_code == 200


def test_trailing_slash_does_not_redirect_to_the_clients_host(client):
    r = client.get("/healthz/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "evil.example" not in r.headers.get("location", "")


def test_api_keys_that_hold_no_key_refuse_to_start(monkeypatch, capsys):
    monkeypatch.setenv("NITRO_API_KEYS", " , ")
    assert cli_main(["serve", "--model", "/nonexistent", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "api-keys" in err and "holds no API key" in err and "Traceback" not in err
