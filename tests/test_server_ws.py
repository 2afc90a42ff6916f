"""GET /ws against a real server (frames on the wire are uvicorn's): progressive refinement frames, a newer
request cancelling the unfinished one, and every message answered — hostile ones included (issue 20) — with
the socket usable after. A hypothesis fuzz step sends random and hostile frames."""

import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from nitrofusion.images import decode_image

from .server_fixtures import LoggedServer

TERMINAL = ("done", "error", "cancelled")
PROBE = {"prompt": "a cat", "steps": 1, "seed": 1, "id": "probe"}


@pytest.fixture(scope="module")
def server(tiny_sdxl_dir):
    # the torch backend behind the server (tests/test_server_e2e.py serves the CPU default, onnxruntime)
    srv = LoggedServer("--model", tiny_sdxl_dir, "--device", "cpu", "--backend", "torch")
    srv.wait_ready("/readyz")
    yield srv
    log = srv.stop()
    assert "Traceback" not in log, log[-3000:]  # nothing above was answered with a crash


def ws_url(server):
    return server.url.replace("http", "ws") + "/ws"


def strict(text: str) -> dict:
    """Frames are strict JSON: no NaN or Infinity (a lone surrogate may come escaped, as \\udXXX)."""
    def refuse(name):
        raise AssertionError(f"{name} in a frame: {text[:200]}")

    return json.loads(text, parse_constant=refuse)


def next_answer(ws) -> tuple[list, dict]:
    """Frames up to the next done, error or cancelled frame: ([(progress, image)], that frame)."""
    frames = []
    while True:
        raw = ws.recv(timeout=60)
        assert isinstance(raw, str), "an image frame without its progress frame"
        msg = strict(raw)
        if msg["type"] in TERMINAL:
            return frames, msg
        assert msg["type"] == "progress", msg
        image = ws.recv(timeout=60)
        assert isinstance(image, bytes)
        frames.append((msg, decode_image(image)))


def assert_usable(ws) -> None:
    ws.send(json.dumps(PROBE))
    frames, end = next_answer(ws)
    assert (end["type"], end["id"], len(frames)) == ("done", "probe", 1)


def test_one_progress_frame_and_jpeg_per_step(server, pipelines):
    from nitrofusion.generation import GenerationRequest

    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"prompt": "a red circle", "steps": 4, "seed": 3, "width": 64, "height": 48}))
        frames, done = next_answer(ws)
    assert [(m["step"], m["steps"], m["seed"]) for m, _ in frames] == [(k, 4, 3) for k in (1, 2, 3, 4)]
    assert all(img.shape == (48, 64, 3) for _, img in frames)
    assert done["type"] == "done" and done["steps"] == 4 and done["seed"] == 3 and done["latency_ms"] > 0
    final = pipelines["sdxl"]([GenerationRequest("a red circle", 4, 3, 64, 48)])[0]
    # the last frame is the final image (as JPEG): close to the exact pixels, unlike the first preview
    err_last = np.abs(frames[-1][1].astype(int) - final.astype(int)).mean()
    err_first = np.abs(frames[0][1].astype(int) - final.astype(int)).mean()
    assert err_last < err_first


def test_a_new_request_cancels_the_unfinished_one_and_both_are_answered(server):
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"id": 1, "prompt": "a red", "steps": 4, "seed": 1, "width": 64, "height": 64}))
        ws.send(json.dumps({"id": 2, "prompt": "a red circle", "steps": 2, "seed": 2}))
        ends, steps_of_2 = {}, []
        while len(ends) < 2:
            frames, end = next_answer(ws)
            steps_of_2 += [m["step"] for m, _ in frames if m["id"] == 2]
            assert end["id"] not in ends, f"two answers for request {end['id']}"
            ends[end["id"]] = end["type"]
        assert ends == {1: "cancelled", 2: "done"} and steps_of_2 == [1, 2]
        assert_usable(ws)


@pytest.mark.parametrize(
    "message, needle",
    [
        ("{not json", "malformed"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"prompt": "a", "steps": 9}), "steps"),
        (json.dumps({"prompt": "a", "width": 4096}), "width"),
        (json.dumps({"steps": 1}), "prompt"),
        (json.dumps({"prompt": "   "}), "prompt"),
        ('{"prompt": "a", "id": "\\ud800"}', "id"),  # a lone surrogate: once lost without a word
        ('{"prompt": "a\\ud800"}', "prompt"),
        ('{"prompt": "a", "id": NaN}', "id"),  # once echoed as a bare NaN
        ('{"prompt": "a", "seed": Infinity}', "seed"),
        ('{"prompt": "a", "id": ' + "9" * 5000 + "}", "malformed"),
        ("[" * 10_000 + "]" * 10_000, "nested too deeply"),  # once closed the socket with 1006
        ('{"prompt": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}", "nested too deeply"),
        (b"\xff\xfe\x00garbage", "malformed"),
        (json.dumps({"prompt": "a cat", "seed": 1}).encode(), None),  # binary JSON is read as JSON
    ],
)
def test_every_message_is_answered_and_the_socket_stays_usable(server, message, needle):
    with connect(ws_url(server)) as ws:
        ws.send(message)
        _, end = next_answer(ws)
        if needle is None:
            assert end["type"] == "done"
        else:
            assert end["type"] == "error" and needle in end["detail"], end
        assert_usable(ws)


def test_a_lone_surrogate_id_is_echoed_in_its_error(server):
    with connect(ws_url(server)) as ws:
        ws.send('{"prompt": "a", "id": "x\\ud800"}')
        _, end = next_answer(ws)
    assert end["type"] == "error" and end["id"] == "x\ud800"  # escaped on the wire, the client's own id back


def test_oversized_frame_closes_with_1009(server):
    with connect(ws_url(server), max_size=None) as ws:
        ws.send("x" * (200 << 10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1009


# --- fuzz: random and hostile frames -------------------------------------------------------------------------

FIELDS = ["prompt", "steps", "seed", "width", "height", "id"]
HOSTILE_TEXT = st.sampled_from(["\ud800", "a\udfff b", "x" * 3000, "", " ", "\x00", "a red circle " * 40])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), HOSTILE_TEXT,
    st.sampled_from([1, 2, 4, 8, 32, 64, 2**63, -1]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=3), max_leaves=6)
KEYS = st.sampled_from(FIELDS) | st.text(max_size=6) | st.sampled_from(["\ud800", "__proto__", "type"])
PLAUSIBLE = st.fixed_dictionaries({"prompt": st.sampled_from(["a cat", "a red circle"])}, optional={
    "steps": st.integers(0, 5), "seed": st.integers(-1, 2**63), "width": st.sampled_from([8, 16, 30, 32, 64, 72]),
    "height": st.sampled_from([8, 32, 48, 64]), "id": st.integers() | st.text(max_size=8)})


def _nested(n: int, kind: str) -> str:
    return "[" * n + "]" * n if kind == "list" else '{"a":' * n + "0" + "}" * n


FRAMES = st.one_of(
    st.dictionaries(KEYS, VALUES, max_size=6).map(json.dumps),  # json.dumps writes NaN, escapes surrogates
    PLAUSIBLE.map(json.dumps),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.builds(_nested, st.integers(500, 12_000), st.sampled_from(["list", "dict"])),
    VALUES.map(json.dumps),
)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frame=FRAMES)
def test_fuzz_every_frame_is_answered_and_the_socket_stays_usable(server, frame):
    with connect(ws_url(server), max_size=None) as ws:
        ws.send(frame)
        _, end = next_answer(ws)
        assert end["type"] in ("done", "error"), end
        assert_usable(ws)


def test_server_is_healthy_after_the_fuzz(server):
    assert httpx.get(server.url + "/healthz").status_code == 200
