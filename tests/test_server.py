"""The HTTP API end to end against a real `nitrofusion serve` (uvicorn) process."""

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


def test_healthz(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


def test_generate_json_matches_library(server, pipelines):
    r = _post(server, {"prompt": "a red circle", "steps": 3, "seed": 9, "width": 64, "height": 48})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["seed"], body["steps"], body["width"], body["height"]) == (9, 3, 64, 48)
    image = decode_image(base64.b64decode(body["images"][0]))
    expected = pipelines["sdxl"]([GenerationRequest("a red circle", 3, 9, 64, 48)])[0]
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


def test_concurrent_requests_each_get_their_own_image(server, pipelines):
    reqs = [GenerationRequest(p, s, seed, 64, 48) for p, s, seed in
            [("a red circle", 1, 1), ("a blue square", 4, 2), ("a dog", 2, 3), ("a red circle", 3, 4)]]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda q: _post(server, {"prompt": q.prompt, "steps": q.steps, "seed": q.seed,
                                                           "width": 64, "height": 48}), reqs))
    expected = pipelines["sdxl"](reqs)
    for r, exp in zip(responses, expected):
        assert r.status_code == 200
        got = decode_image(base64.b64decode(r.json()["images"][0]))
        assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1


def test_serve_with_missing_model_is_a_one_line_error(tmp_path):
    proc = run_cli("serve", "--model", tmp_path / "missing", "--port", "1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model folder not found" in proc.stderr
