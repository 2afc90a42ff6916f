"""GET /ws: progressive refinement frames, cancellation by a newer request, errors that keep the socket."""

import json

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from nitrofusion.images import decode_image

from .helpers import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_sdxl_dir):
    # the torch backend behind the server (tests/test_server.py serves the CPU default, onnxruntime)
    srv = ServerProcess("--model", tiny_sdxl_dir, "--device", "cpu", "--backend", "torch")
    srv.wait_ready("/readyz")
    yield srv
    srv.stop()


def ws_url(server):
    return server.url.replace("http", "ws") + "/ws"


def read_until_done(ws, request_id=None):
    """Collect (progress, jpeg) pairs until the 'done' frame of `request_id`."""
    frames = []
    while True:
        msg = json.loads(ws.recv(timeout=60))
        if request_id is not None and msg.get("id") != request_id:
            if msg["type"] == "progress":
                ws.recv(timeout=60)  # its image
            continue
        if msg["type"] == "progress":
            image = ws.recv(timeout=60)
            assert isinstance(image, bytes)
            frames.append((msg, decode_image(image)))
        elif msg["type"] == "done":
            return frames, msg
        else:
            raise AssertionError(f"unexpected frame {msg}")


def test_one_progress_frame_and_jpeg_per_step(server, pipelines):
    from nitrofusion.generation import GenerationRequest

    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"prompt": "a red circle", "steps": 4, "seed": 3, "width": 64, "height": 48}))
        frames, done = read_until_done(ws)
    assert [(m["step"], m["steps"], m["seed"]) for m, _ in frames] == [(k, 4, 3) for k in (1, 2, 3, 4)]
    assert all(img.shape == (48, 64, 3) for _, img in frames)
    assert done["steps"] == 4 and done["seed"] == 3 and done["latency_ms"] > 0
    final = pipelines["sdxl"]([GenerationRequest("a red circle", 4, 3, 64, 48)])[0]
    # the last frame is the final image (as JPEG): close to the exact pixels, unlike the first preview
    err_last = np.abs(frames[-1][1].astype(int) - final.astype(int)).mean()
    err_first = np.abs(frames[0][1].astype(int) - final.astype(int)).mean()
    assert err_last < err_first


def test_a_new_request_cancels_the_unfinished_one(server):
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"id": 1, "prompt": "a red", "steps": 4, "seed": 1, "width": 64, "height": 64}))
        ws.send(json.dumps({"id": 2, "prompt": "a red circle", "steps": 2, "seed": 2}))
        frames, done = read_until_done(ws, request_id=2)
        assert done["id"] == 2 and [m["step"] for m, _ in frames] == [1, 2]
        # request 1 never finishes after request 2 replaced it: the next frame answers request 3
        ws.send(json.dumps({"id": 3, "prompt": "a dog", "steps": 1, "seed": 3}))
        msg = json.loads(ws.recv(timeout=60))
        assert msg["id"] == 3


@pytest.mark.parametrize(
    "message, needle",
    [
        ("{not json", "malformed"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"prompt": "a", "steps": 9}), "steps"),
        (json.dumps({"prompt": "a", "width": 4096}), "width"),
        (json.dumps({"steps": 1}), "prompt"),
        (json.dumps({"prompt": "   "}), "prompt"),
    ],
)
def test_malformed_messages_get_an_error_and_the_socket_stays_usable(server, message, needle):
    with connect(ws_url(server)) as ws:
        ws.send(message)
        err = json.loads(ws.recv(timeout=30))
        assert err["type"] == "error" and needle in err["detail"]
        ws.send(json.dumps({"prompt": "a cat", "steps": 1, "seed": 1}))
        frames, done = read_until_done(ws)
        assert len(frames) == 1


def test_oversized_frame_closes_with_1009(server):
    with connect(ws_url(server), max_size=None) as ws:
        ws.send("x" * (200 << 10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1009
