"""Hostile and careless clients (issue 19): each test reproduces one attack against a real uvicorn
server on loopback (tiny random policy) with small configured limits, and checks the answer."""

import os

import httpx
import msgpack
import numpy as np
import pytest

from serve_helpers import LiveServer, serve_cfg, small_image, v2_body

from flagscale.serve import msgpack_codec
from flagscale.serve.app import create_app

websockets_sync = pytest.importorskip("websockets.sync.client")


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://")


def openpi_request(server, obs: dict):
    """One openpi round trip over a raw websocket: the reply frame (bytes or error text)."""
    with websockets_sync.connect(ws_url(server), max_size=None) as ws:
        msgpack.unpackb(ws.recv())  # metadata
        ws.send(msgpack_codec.packb(obs))
        return ws.recv(timeout=30)


def libero_obs(**extra):
    rng = np.random.default_rng(0)
    obs = {
        "observation/image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "observation/state": np.zeros(8, np.float32),
        "prompt": "pick the cup",
    }
    obs.update(extra)
    return obs


# ---------------------------------------------------------------- (6) float32 overflow


@pytest.mark.parametrize("field", ["state", "noise"])
def test_numbers_beyond_float32_are_a_4xx_naming_the_field(http, field):
    body = v2_body()
    if field == "state":
        body["state"] = [[1e39] + [0.0] * 13]
    else:
        noise = np.zeros((50, 32))
        noise[3, 4] = -1e39
        body["noise"] = noise.tolist()
    reply = http.post("/infer", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"].startswith(f"{field}: ") and "float32" in reply.json()["error"]


def test_openpi_float32_overflow_is_named_and_no_traceback_is_sent(live):
    reply = openpi_request(live, libero_obs(**{"observation/state": np.full(8, 1e39)}))
    assert isinstance(reply, str) and "observation/state" in reply and "float32" in reply
    assert "Traceback" not in reply and ".py" not in reply


def test_unexpected_openpi_error_sends_no_traceback_or_path(live, monkeypatch):
    from flagscale.serve import openpi_ws

    def broken(data, cfg):
        raise KeyError("/opt/venv/lib/python3.11/site-packages/secret.py")

    monkeypatch.setattr(openpi_ws, "to_observation", broken)
    reply = openpi_request(live, libero_obs())
    assert reply == "internal server error: the request failed (KeyError); see the server log"


# ---------------------------------------------------------------- (2) huge prompts


def test_huge_instruction_is_refused_before_tokenizing(http, live):
    calls = []
    tokenizer = live.app.state.worker.policy.tokenizer
    original = tokenizer.__class__.__call__

    def spy(self, texts, *args, **kwargs):
        calls.append(max(len(t) for t in texts))
        return original(self, texts, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer.__class__, "__call__", spy)
        reply = http.post("/infer", json=v2_body(instruction="x" * 300_000))
        ws_reply = openpi_request(live, libero_obs(prompt="y" * 300_000))
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        "instruction: 300000 characters; at most 2048 (engine.max_prompt_chars)"
    )
    assert "prompt: 300000 characters" in ws_reply
    assert calls == []  # nothing was tokenized


def test_new_prompts_are_tokenized_in_request_threads(http, live):
    import threading

    threads = []
    tokenizer = live.app.state.worker.policy.tokenizer
    original = tokenizer.__class__.__call__

    def spy(self, texts, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(self, texts, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer.__class__, "__call__", spy)
        prompt = "a prompt no test used before " * 60  # 1800 characters: within the cap
        assert http.post("/infer", json=v2_body(instruction=prompt)).status_code == 200
        assert isinstance(openpi_request(live, libero_obs(prompt=prompt[::-1])), bytes)
    assert len(threads) == 2 and "pi0-inference" not in threads, threads


# ---------------------------------------------------------------- (4) decompression bombs


def webp_b64(width: int, height: int) -> str:
    """A lossless WebP of one colour: a few hundred bytes for millions of pixels."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="WEBP", lossless=True)
    return base64.b64encode(buf.getvalue()).decode()


class RecordingPolicy:
    """The tiny policy; records the image shapes each model call receives."""

    def __init__(self, policy):
        self._policy, self.shapes = policy, []

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def infer_batch(self, observations, *args, **kwargs):
        self.shapes += [im.shape for o in observations for im in o["images"].values()]
        return self._policy.infer_batch(observations, *args, **kwargs)


def test_request_pixel_budget_refuses_bombs_before_decoding(policy, monkeypatch):
    from flagscale.serve import codec

    decoded = []
    load = codec._load_rgb
    monkeypatch.setattr(codec, "_load_rgb", lambda img: decoded.append(img.size) or load(img))
    cfg = serve_cfg(max_request_pixels=3_000_000, max_image_side=4096, max_body_mb=12)
    bomb = webp_b64(2048, 2048)  # 4.2 M pixels in ~200 bytes
    assert len(bomb) < 1000
    body = v2_body()
    body["images"] = [{"cam_high": bomb, "cam_left_wrist": bomb, "cam_right_wrist": bomb}]
    with LiveServer(create_app(policy, cfg)) as server:
        server.wait_ready()
        reply = httpx.post(f"{server.url}/infer", json=body, timeout=30)
        obs = libero_obs(**{"observation/image": np.zeros((1800, 1800, 3), np.uint8)})
        ws_reply = openpi_request(server, obs)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error.startswith("images[0].cam_") and "engine.max_request_pixels" in error, error
    assert decoded == []  # refused from the headers: no pixel was decoded
    assert "observation/image" in ws_reply and "engine.max_request_pixels" in ws_reply


def test_large_images_are_reduced_in_uint8_before_the_policy(policy):
    recording = RecordingPolicy(policy)
    cfg = serve_cfg(max_image_side=4096, max_body_mb=8)
    body = v2_body()
    body["images"] = [{"cam_high": webp_b64(3000, 1000), "cam_left_wrist": small_image()}]
    with LiveServer(create_app(recording, cfg)) as server:
        server.wait_ready()
        reply = httpx.post(f"{server.url}/infer", json=body, timeout=60)
        ws = openpi_request(
            server, libero_obs(**{"observation/image": np.zeros((900, 2500, 3), np.uint8)})
        )
    assert reply.status_code == 200, reply.text
    assert isinstance(ws, bytes)
    # 3000 px -> reduced by 2 (box filter) to 1500 x 500; small frames are untouched
    assert recording.shapes[-3:] == [(500, 1500, 3), (48, 64, 3), (450, 1250, 3)]


def test_image_decoding_runs_with_bounded_concurrency(policy, monkeypatch):
    import concurrent.futures
    import threading
    import time

    from flagscale.serve import codec

    active, peak, lock = [0], [0], threading.Lock()
    load = codec._load_rgb

    def slow_load(img):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return load(img)

    monkeypatch.setattr(codec, "_load_rgb", slow_load)
    png = codec.encode_image(np.zeros((32, 32, 3), np.uint8), "PNG")
    body = v2_body()
    body["images"] = [{"cam_high": png, "cam_left_wrist": png, "cam_right_wrist": png}]
    try:
        with LiveServer(create_app(policy, serve_cfg(decode_threads=1))) as server:
            server.wait_ready()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                replies = list(
                    pool.map(lambda _: httpx.post(f"{server.url}/infer", json=body), range(4))
                )
    finally:
        codec.set_decode_threads(min(4, os.cpu_count() or 1))
    assert [r.status_code for r in replies] == [200] * 4
    assert peak[0] == 1
