"""The HTTP API in-process (tests/server_fixtures.py): the real app and engine over a fake backend and the tiny
SDXL model's tokenizers and limits. Routes, validation, formats, metrics, queueing and timeouts; what needs a
real process or a real model's pixels is in tests/test_server_e2e.py and tests/test_server_stress.py."""

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from nitrofusion.images import decode_image

from .helpers import run_cli
from .server_fixtures import FakeClock, fake_pipeline, in_process, metric, wait_for

BODY = {"prompt": "a red circle", "steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def client(_loaded_torch_pipelines):  # the session's models (fake_pipeline reads model and sampler only)
    with in_process(fake_pipeline(_loaded_torch_pipelines, "sdxl")) as c:
        yield c


def test_health_and_readiness_after_warm_up(pipelines):
    with in_process(fake_pipeline(pipelines), warmup=True) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        assert c.app.state.service.pipe.backend.unet_calls  # the warm-up image ran before ready


def test_models_endpoint_describes_the_model(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["family"] == "sdxl"
    assert (card["native_size"], card["min_size"], card["max_size"]) == (32, 8, 64)
    assert (card["min_steps"], card["max_steps"], card["shift"]) == (1, 4, 250)
    assert (card["backend"], card["device"]) == ("fake", "cpu")


def test_num_images_use_consecutive_seeds(client):
    r = client.post("/generate", json={**BODY, "seed": 40, "width": 64, "height": 48, "num_images": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [40, 41, 42] and len(body["images"]) == 3
    solo = client.post("/generate", json={**BODY, "seed": 41, "width": 64, "height": 48}).json()
    assert body["images"][1] == solo["images"][0]  # a seed gives the same image alone or in a batch


@pytest.mark.parametrize("fmt, magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF"), ("png", b"\x89PNG")])
def test_output_formats(client, fmt, magic):
    body = client.post("/generate", json={"prompt": "a dog", "seed": 1, "output_format": fmt}).json()
    data = base64.b64decode(body["images"][0])
    assert data.startswith(magic) and body["output_format"] == fmt
    assert decode_image(data).shape == (32, 32, 3)
    raw = client.post("/generate", json={"prompt": "a dog", "seed": 1, "output_format": fmt},
                      headers={"accept": f"image/{fmt}"})
    assert raw.headers["content-type"] == f"image/{fmt}" and raw.content.startswith(magic)
    assert raw.headers["x-seed"] == "1"


def test_openai_client_works_against_us(client):
    import openai

    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0, http_client=client)
    result = api.images.generate(prompt="a red circle", n=2, size="64x48", response_format="b64_json",
                                 extra_body={"steps": 3, "seed": 5})
    assert [decode_image(base64.b64decode(d.b64_json)).shape for d in result.data] == [(48, 64, 3)] * 2
    with pytest.raises(openai.UnprocessableEntityError) as err:
        api.images.generate(prompt="a red circle", size="1000x1000")
    assert "size" in str(err.value)


def test_metrics_count_images_and_batches(client):
    before = metric(client, "nitro_images_total")
    assert client.post("/generate", json={"prompt": "a cat", "num_images": 2, "seed": 3}).status_code == 200
    assert metric(client, "nitro_images_total") == before + 2
    text = client.get("/metrics").text
    for name in ("nitro_queue_depth", "nitro_active_rows", "nitro_batch_size_bucket", "nitro_unet_step_seconds",
                 "nitro_request_seconds_bucket{le=\"0.01\",steps=\"1\"}", "nitro_cancellations_total"):
        assert name in text


def test_seed_is_random_when_omitted_and_reproducible(client):
    a = client.post("/generate", json={"prompt": "a cat"}).json()
    b = client.post("/generate", json={"prompt": "a cat"}).json()
    assert a["seed"] != b["seed"]
    again = client.post("/generate", json={"prompt": "a cat", "seed": a["seed"]}).json()
    assert again["images"] == a["images"]


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/generate", {"prompt": "a", "steps": 0}, "steps"),
        ("/generate", {"prompt": "a", "steps": 5}, "steps"),
        ("/generate", {"prompt": "a", "steps": "many"}, "steps"),
        ("/generate", {"prompt": "a", "width": 30}, "width"),
        ("/generate", {"prompt": "a", "height": 256}, "height"),  # a multiple of 8, but beyond 2x the native 32
        ("/generate", {"prompt": "a", "width": 0}, "width"),
        ("/generate", {"prompt": ""}, "prompt"),
        ("/generate", {"prompt": "   "}, "prompt"),
        ("/generate", {"prompt": "a red circle " * 40}, "prompt"),  # over the text encoder's 77 tokens
        ("/generate", {"steps": 1}, "prompt"),
        ("/generate", {"prompt": "a", "seed": -3}, "seed"),
        ("/generate", {"prompt": "a", "guidance": 7}, "guidance"),
        ("/generate", {"prompt": "a", "num_images": 5}, "num_images"),
        ("/generate", {"prompt": "a", "output_format": "gif"}, "output_format"),
        ("/generate", {"prompt": "a", "seed": False}, "seed"),
        ("/generate", {"prompt": "a", "steps": "2"}, "steps"),
        ("/generate", {"prompt": "a", "width": 32.5}, "width"),
        ("/v1/images/generations", {"prompt": "a", "size": "0x0"}, "size"),
        ("/v1/images/generations", {"prompt": "a", "size": "32"}, "size"),
        ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, "response_format"),
        ("/v1/images/generations", {"prompt": "a", "n": 9}, "n"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"][-1] == field
    assert detail[0]["msg"]


def test_malformed_json_is_422(client):
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert client.get("/healthz").status_code == 200


def test_queue_full_gets_429_with_retry_after_and_accepted_requests_finish(pipelines):
    """One request holds the engine inside a UNet call (the fake backend's gate), two wait in the queue of 2:
    the rest are refused at once, and the accepted three all finish once the gate opens."""
    pipe = fake_pipeline(pipelines)
    pipe.backend.gate = threading.Event()
    with in_process(pipe, max_queue=2) as c, ThreadPoolExecutor(3) as pool:
        engine = c.app.state.engine
        first = pool.submit(c.post, "/generate", json={**BODY, "seed": 0})
        assert pipe.backend.entered.wait(30)
        queued = [pool.submit(c.post, "/generate", json={**BODY, "seed": i}) for i in (1, 2)]
        wait_for(lambda: engine.queue_depth == 2)
        refused = [c.post("/generate", json={**BODY, "seed": i}) for i in range(3, 7)]
        pipe.backend.gate.set()
        accepted = [f.result() for f in [first, *queued]]
        assert [r.status_code for r in accepted] == [200, 200, 200]
        assert [r.status_code for r in refused] == [429] * 4
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert metric(c, 'nitro_rejections_total{reason="queue_full"}') == 4


def test_past_the_request_timeout_is_504(pipelines):
    """The engine's clock passes the deadline while the request is mid-flight: it is answered 504 at the next
    step, and the server keeps serving."""
    pipe, clock = fake_pipeline(pipelines), FakeClock()
    pipe.backend.gate = threading.Event()
    with in_process(pipe, clock=clock, request_timeout=5) as c, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.post, "/generate", json={**BODY, "steps": 4})
        assert pipe.backend.entered.wait(30)
        clock.advance(6)
        pipe.backend.gate.set()
        r = pending.result()
        assert r.status_code == 504 and "timed out" in r.json()["detail"]
        assert c.post("/generate", json=BODY).status_code == 200


def test_serve_with_missing_model_is_a_one_line_error(tmp_path):
    # a real process: `serve` configures the root logger, which must not happen inside the test session
    proc = run_cli("serve", "--model", tmp_path / "missing", "--port", "1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model folder not found" in proc.stderr

