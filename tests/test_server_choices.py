"""Per-request choices on every interface, in-process over the fake backend: `"steps": "auto"` (the engine
picks the count by load, issue 19) and `"decoder": "full" | "fast"` (issue 16)."""

from __future__ import annotations

import pytest

from .server_fixtures import ServerFakeBackend, fake_pipeline, in_process, metric

BODY = {"prompt": "a red circle", "seed": 1}


class NoTinyDecoder(ServerFakeBackend):
    @property
    def has_fast_decoder(self) -> bool:
        return False


def _field(r) -> str:
    return r.json()["detail"][0]["loc"][-1]


def test_auto_without_a_target_runs_max_steps_and_says_so(pipelines):
    with in_process(fake_pipeline(pipelines)) as c:
        r = c.post("/generate", json={**BODY, "steps": "auto"})
        assert r.status_code == 200 and r.json()["steps"] == 4
        r = c.post("/generate", json={**BODY, "steps": "auto", "max_steps": 3}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["x-steps"] == "3"
        r = c.post("/generate", json={**BODY, "steps": 2}, headers={"Accept": "image/png"})
        assert r.headers["x-steps"] == "2"  # fixed requests are never changed


def test_auto_with_a_latency_target_trades_steps_for_time(pipelines):
    with in_process(fake_pipeline(pipelines), latency_target_ms=100) as c:
        policy = c.app.state.engine.policy
        for bucket in (1, 2, 4, 8, 16):
            policy.observe_iteration(bucket, 0.05)  # as if each step had measured 50 ms
        r = c.post("/generate", json={**BODY, "steps": "auto"})
        assert r.status_code == 200 and r.json()["steps"] == 2  # 2 x 50 ms meets 100 ms; 3 would not
        assert metric(c, "nitro_auto_steps_count") == 1
        assert metric(c, 'nitro_auto_steps_bucket{le="2.0"}') == 1
        assert metric(c, "nitro_auto_latency_error_seconds_count") == 1
        # The policy learned this request once, when its response was ready (Engine.served), not at the image too.
        assert len(policy.errors_s) == 1


def test_auto_on_the_openai_route_and_the_websocket(pipelines):
    with in_process(fake_pipeline(pipelines)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "steps": "auto", "max_steps": 2})
        assert r.status_code == 200 and len(r.json()["data"]) == 1
        with c.websocket_connect("/ws") as ws:
            ws.send_json({**BODY, "steps": "auto", "min_steps": 3, "id": 7})
            steps = []
            while True:
                msg = ws.receive()
                if msg.get("text") is None:
                    continue
                frame = __import__("json").loads(msg["text"])
                if frame["type"] == "progress":
                    steps.append(frame["steps"])
                if frame["type"] == "done":
                    break
        assert frame["steps"] == 4 and set(steps) == {4}


@pytest.mark.parametrize("body, field", [
    ({"steps": "auto", "min_steps": 3, "max_steps": 2}, "min_steps"),
    ({"steps": "auto", "max_steps": 5}, "max_steps"),
    ({"steps": "2"}, "steps"),
    ({"steps": "fast"}, "steps"),
    ({"decoder": "tiny"}, "decoder"),
])
def test_bad_choices_are_422_naming_the_field(pipelines, body, field):
    with in_process(fake_pipeline(pipelines)) as c:
        for path, base in (("/generate", BODY), ("/v1/images/generations", {"prompt": "a cat"})):
            r = c.post(path, json={**base, **body})
            assert r.status_code == 422 and field in str(r.json()["detail"]), (path, r.text)


def test_fast_decoder_needs_a_tiny_decoder_in_the_model(pipelines):
    with in_process(fake_pipeline(pipelines)) as c:
        assert c.post("/generate", json={**BODY, "decoder": "fast"}).status_code == 200
    with in_process(fake_pipeline(pipelines, backend=NoTinyDecoder())) as c:
        r = c.post("/generate", json={**BODY, "decoder": "fast"})
        assert r.status_code == 422 and _field(r) == "decoder" and "vae_preview" in r.text
        assert c.post("/generate", json={**BODY, "decoder": "full"}).status_code == 200
