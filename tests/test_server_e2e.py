"""The HTTP API end to end against a real `nitrofusion serve` (uvicorn) process, on the CPU default backend
(onnxruntime, exported on first start into the session's NITRO_CACHE_DIR): its images are the library's
(`load_pipeline` with no backend either), alone, batched with others, and through the OpenAI client.
The API's behaviour is tested in-process in tests/test_server.py; tests/test_server_ws.py serves torch."""

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from nitrofusion.generation import GenerationRequest
from nitrofusion.images import decode_image

from .helpers import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_sdxl_dir):
    srv = ServerProcess("--model", tiny_sdxl_dir, "--device", "cpu")
    srv.wait_ready("/readyz")
    yield srv
    out = srv.stop()
    assert srv.proc.returncode == 0, out  # SIGTERM is a clean shutdown


def _post(server, body, **headers):
    return httpx.post(server.url + "/generate", json=body, headers=headers, timeout=120)


def test_serves_the_cpu_default_backend(server):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert (card["family"], card["backend"], card["device"]) == ("sdxl", "onnxruntime", "cpu")


def test_generate_json_matches_library(server, auto_pipelines):
    r = _post(server, {"prompt": "a red circle", "steps": 3, "seed": 9, "width": 64, "height": 48})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["seed"], body["steps"], body["width"], body["height"]) == (9, 3, 64, 48)
    image = decode_image(base64.b64decode(body["images"][0]))
    expected = auto_pipelines["sdxl"]([GenerationRequest("a red circle", 3, 9, 64, 48)])[0]
    assert np.array_equal(image, expected)
    raw = _post(server, {"prompt": "a red circle", "steps": 3, "seed": 9, "width": 64, "height": 48},
                accept="image/png")
    assert raw.headers["content-type"] == "image/png" and np.array_equal(decode_image(raw.content), expected)


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


def test_openai_client_gets_the_library_images(server, auto_pipelines):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a red circle", n=2, size="64x48", response_format="b64_json",
                                    extra_body={"steps": 3, "seed": 5})
    images = [decode_image(base64.b64decode(d.b64_json)) for d in result.data]
    expected = auto_pipelines["sdxl"]([GenerationRequest("a red circle", 3, s, 64, 48) for s in (5, 6)])
    for got, exp in zip(images, expected):
        assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1
