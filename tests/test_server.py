"""The HTTP API end to end against a real `nitrofusion serve` (uvicorn) process, on the CPU default backend
(onnxruntime, exported on first start into the session's NITRO_CACHE_DIR): its images are the library's
(`load_pipeline` with no backend either). tests/test_server_ws.py serves the torch backend."""

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from nitrofusion.generation import GenerationRequest
from nitrofusion.images import decode_image

from .helpers import ServerProcess, run_cli


@pytest.fixture(scope="module")
def server(tiny_sdxl_dir):
    srv = ServerProcess("--model", tiny_sdxl_dir, "--device", "cpu")
    srv.wait_ready()
    yield srv
    out = srv.stop()
    assert srv.proc.returncode == 0, out  # SIGTERM is a clean shutdown


def _post(server, body, **headers):
    return httpx.post(server.url + "/generate", json=body, headers=headers, timeout=120)


def test_health_and_readiness(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}


def test_models_endpoint_describes_the_model(server):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["family"] == "sdxl"
    assert (card["native_size"], card["min_size"], card["max_size"]) == (32, 8, 64)
    assert (card["min_steps"], card["max_steps"], card["shift"]) == (1, 4, 250)
    assert (card["backend"], card["device"]) == ("onnxruntime", "cpu")  # the CPU default


def test_num_images_use_consecutive_seeds(server):
    r = _post(server, {"prompt": "a red circle", "steps": 2, "seed": 40, "width": 64, "height": 48,
                       "num_images": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [40, 41, 42] and len(body["images"]) == 3
    solo = _post(server, {"prompt": "a red circle", "steps": 2, "seed": 41, "width": 64, "height": 48}).json()
    second = decode_image(base64.b64decode(body["images"][1]))
    exact = decode_image(base64.b64decode(solo["images"][0]))
    assert np.abs(second.astype(int) - exact.astype(int)).max() <= 1


@pytest.mark.parametrize("fmt, magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF"), ("png", b"\x89PNG")])
def test_output_formats(server, fmt, magic):
    body = _post(server, {"prompt": "a dog", "seed": 1, "output_format": fmt}).json()
    data = base64.b64decode(body["images"][0])
    assert data.startswith(magic) and body["output_format"] == fmt
    assert decode_image(data).shape == (32, 32, 3)
    raw = _post(server, {"prompt": "a dog", "seed": 1, "output_format": fmt}, accept=f"image/{fmt}")
    assert raw.headers["content-type"] == f"image/{fmt}" and raw.content.startswith(magic)


def test_openai_client_works_against_us(server, auto_pipelines):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a red circle", n=2, size="64x48", response_format="b64_json",
                                    extra_body={"steps": 3, "seed": 5})
    assert len(result.data) == 2
    images = [decode_image(base64.b64decode(d.b64_json)) for d in result.data]
    expected = auto_pipelines["sdxl"]([GenerationRequest("a red circle", 3, s, 64, 48) for s in (5, 6)])
    for got, exp in zip(images, expected):
        assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.generate(prompt="a red circle", size="1000x1000")
    assert "size" in str(err.value)


def test_metrics_count_images_and_batches(server):
    before = _metric(server, "nitro_images_total")
    _post(server, {"prompt": "a cat", "num_images": 2, "seed": 3})
    text = httpx.get(server.url + "/metrics").text
    assert _metric(server, "nitro_images_total") == before + 2
    for name in ("nitro_queue_depth", "nitro_active_rows", "nitro_batch_size_bucket", "nitro_unet_step_seconds",
                 "nitro_request_seconds_bucket{le=\"0.01\",steps=\"1\"}", "nitro_cancellations_total"):
        assert name in text


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_generate_json_matches_library(server, auto_pipelines):
    r = _post(server, {"prompt": "a red circle", "steps": 3, "seed": 9, "width": 64, "height": 48})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["seed"], body["steps"], body["width"], body["height"]) == (9, 3, 64, 48)
    image = decode_image(base64.b64decode(body["images"][0]))
    expected = auto_pipelines["sdxl"]([GenerationRequest("a red circle", 3, 9, 64, 48)])[0]
    assert np.array_equal(image, expected)


def test_generate_png_body_with_accept_header(server):
    r = _post(server, {"prompt": "a blue dog", "seed": 1}, accept="image/png")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "1"
    assert decode_image(r.content).shape == (32, 32, 3)  # the model's native size by default


def test_seed_is_random_when_omitted_and_reproducible(server):
    a = _post(server, {"prompt": "a cat"}).json()
    b = _post(server, {"prompt": "a cat"}).json()
    assert a["seed"] != b["seed"]
    again = _post(server, {"prompt": "a cat", "seed": a["seed"]}).json()
    assert again["images"] == a["images"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "a", "steps": 5}, "steps"),
        ({"prompt": "a", "steps": "many"}, "steps"),
        ({"prompt": "a", "width": 30}, "width"),
        ({"prompt": "a", "height": 256}, "height"),  # a multiple of 8, but beyond 2x the native 32
        ({"prompt": "a", "width": 0}, "width"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a red circle " * 40}, "prompt"),
        ({"steps": 1}, "prompt"),
        ({"prompt": "a", "seed": -3}, "seed"),
        ({"prompt": "a", "guidance": 7}, "guidance"),
        ({"prompt": "a", "num_images": 5}, "num_images"),
        ({"prompt": "a", "output_format": "gif"}, "output_format"),
    ],
)
def test_bad_input_is_422_naming_the_field(server, body, field):
    r = _post(server, body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"][-1] == field
    assert detail[0]["msg"]


def test_malformed_json_is_422_and_server_survives(server):
    r = httpx.post(server.url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_concurrent_requests_each_get_their_own_image(server, auto_pipelines):
    reqs = [GenerationRequest(p, s, seed, 64, 48) for p, s, seed in
            [("a red circle", 1, 1), ("a blue square", 4, 2), ("a dog", 2, 3), ("a red circle", 3, 4)]]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda q: _post(server, {"prompt": q.prompt, "steps": q.steps, "seed": q.seed,
                                                           "width": 64, "height": 48}), reqs))
    expected = auto_pipelines["sdxl"](reqs)
    for r, exp in zip(responses, expected):
        assert r.status_code == 200
        got = decode_image(base64.b64decode(r.json()["images"][0]))
        assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1


def test_serve_with_missing_model_is_a_one_line_error(tmp_path):
    proc = run_cli("serve", "--model", tmp_path / "missing", "--port", "1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model folder not found" in proc.stderr


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/generate", {"prompt": "a", "seed": False}, "seed"),
        ("/generate", {"prompt": "a", "steps": "2"}, "steps"),
        ("/generate", {"prompt": "a", "width": 32.5}, "width"),
        ("/v1/images/generations", {"prompt": "a", "size": "0x0"}, "size"),
        ("/v1/images/generations", {"prompt": "a", "size": "32"}, "size"),
        ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, "response_format"),
        ("/v1/images/generations", {"prompt": "a", "n": 9}, "n"),
    ],
)
def test_strict_types_and_openai_fields(server, path, body, field):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == field
