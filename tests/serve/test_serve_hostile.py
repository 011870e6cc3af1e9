"""Hostile and careless clients (issue 19): each test reproduces one attack against a real uvicorn
server on loopback (tiny random policy) with small configured limits, and checks the answer."""

import os
import threading

import httpx
import msgpack
import numpy as np
import pytest

from serve_helpers import LiveServer, PolicyWrapper, serve_cfg, small_image, v2_body

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


class RecordingPolicy(PolicyWrapper):
    """The tiny policy; records the image shapes each model call receives."""

    def __init__(self, policy):
        super().__init__(policy)
        self.shapes = []

    def infer_batch(self, observations, *args, **kwargs):
        self.shapes += [im.shape for o in observations for im in o["images"].values()]
        return self.policy.infer_batch(observations, *args, **kwargs)


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


def test_pixel_budget_charges_every_image_even_identical_ones():
    from flagscale.serve.codec import ImageDecodeError, PixelBudget, decode_images

    bomb = webp_b64(708, 708)  # 0.5 M pixels; three are over a 1 M budget
    budget = PixelBudget(1_000_000)
    out = decode_images([bomb] * 3, 1024, budget)
    assert sum(isinstance(x, ImageDecodeError) for x in out) == 2 and budget.used == 3 * 708**2


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


# ---------------------------------------------------------------- (1) (3) (10) connections


def raw_exchange(url: str, data: bytes, timeout: float = 10.0, wait_first: float = 0.0) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes."""
    import socket
    import time

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if wait_first:
            time.sleep(wait_first)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class LimitLines(list):
    """Collects the connection-limit log lines of `server` (its rate limit reset)."""

    def __init__(self, server):
        super().__init__()
        server.server.config.http_protocol_class.limit_log.next_at = 0.0

    def __enter__(self):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.append(record.getMessage())
        logging.getLogger("flagscale.serve.limits").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("flagscale.serve.limits").removeHandler(self.handler)


@pytest.fixture(scope="module")
def strict(policy):
    """A server with small connection limits."""
    cfg = serve_cfg(header_timeout_s=0.5, body_timeout_s=0.5, max_connections=40, max_header_kb=4)
    with LiveServer(create_app(policy, cfg)) as server:
        server.wait_ready()
        yield server


@pytest.mark.parametrize(
    "sent, what",
    [
        (b"", "request headers"),
        (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Le", "request headers"),
        (
            b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{\"images",
            "request body",
        ),
    ],
    ids=["idle", "half-headers", "half-body"],
)
def test_slow_clients_are_timed_out_and_logged(strict, sent, what):
    import time

    with LimitLines(strict) as lines:
        start = time.monotonic()
        reply = raw_exchange(strict.url, sent)
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    key = "header_timeout_s" if what == "request headers" else "body_timeout_s"
    assert f"{what} not received within 0.5 s (engine.{key})".encode() in reply
    assert 0.4 < elapsed < 3.0
    assert any(what in line for line in lines), lines


def test_connection_cap_closes_idle_connections_first(strict):
    import socket

    host, port = strict.url.removeprefix("http://").split(":")
    slow = []
    with LimitLines(strict) as lines:
        try:
            for _ in range(200):  # far beyond the cap of 40, each stuck in its headers
                sock = socket.create_connection((host, int(port)), timeout=5)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                slow.append(sock)
            reply = httpx.post(f"{strict.url}/infer", json=v2_body(), timeout=30)
            assert reply.status_code == 200
            assert len(strict.server.server_state.connections) <= 40
        finally:
            for sock in slow:
                sock.close()
    assert any("connection cap" in line for line in lines), lines


@pytest.mark.parametrize("size", [8 * 1024, 1024 * 1024])
def test_oversized_headers_get_431(strict, size):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    try:
        reply = raw_exchange(strict.url, head)
    except ConnectionResetError:  # the server closed while the rest was still being sent
        pytest.fail("no 431 reply before the connection closed")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"engine.max_header_kb" in reply


def test_expect_continue_over_the_limit_is_413_without_100(http, live):
    head = (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
    )
    reply = raw_exchange(live.url, head)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"100 Continue" not in reply and b"engine.max_body_mb" in reply


def test_pipelined_good_request_then_garbage_keeps_its_reply(live):
    import json

    body = json.dumps(v2_body()).encode()
    good = (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    reply = raw_exchange(live.url, good + b"\x00\x01 GARBAGE \xff\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    assert b'"actions"' in reply
    assert b"HTTP/1.1 400 " in reply and b"invalid HTTP request" in reply


# ---------------------------------------------------------------- (5) abandoned requests


class GatedPolicy(PolicyWrapper):
    """The tiny policy; each model call waits for `gate` and the observations it served are
    counted (abandoned requests must never reach it)."""

    def __init__(self, policy):
        import threading

        super().__init__(policy)
        self.gate, self.served = threading.Event(), 0

    def infer_batch(self, observations, *args, **kwargs):
        self.gate.wait(30)
        self.served += len(observations)
        return self.policy.infer_batch(observations, *args, **kwargs)


def send_and_leave(url: str, data: bytes) -> None:
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)


def wait_until(condition, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_abandoned_requests_leave_the_queue(policy):
    import concurrent.futures
    import json
    import time

    gated = GatedPolicy(policy)
    gated.gate.set()  # start-up probe
    cfg = serve_cfg(max_queue=2, max_batch_size=1, max_wait_ms=0)
    body = json.dumps(v2_body()).encode()
    request = (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    with LiveServer(create_app(gated, cfg)) as server:
        server.wait_ready()
        worker, served = server.app.state.worker, gated.served
        gated.gate.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{server.url}/infer", json=v2_body(), timeout=30)
            wait_until(lambda: worker.busy_since is not None)  # the model call is running
            send_and_leave(server.url, request)  # HTTP: sent, then the socket closed
            with websockets_sync.connect(ws_url(server)) as ws:  # openpi: the same
                ws.recv()
                ws.send(msgpack_codec.packb(libero_obs()))
                time.sleep(0.5)  # both queued by now (main kept them there: max_queue=2)
            wait_until(lambda: worker.queue_depth == 0)  # both dropped, not waiting their turn
            second = pool.submit(httpx.post, f"{server.url}/infer", json=v2_body(), timeout=30)
            wait_until(lambda: worker.queue_depth == 1)
            gated.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert gated.served - served == 2  # the abandoned requests were never computed


# ---------------------------------------------------------------- (7) SIGTERM drain


class DrainingLiveServer(LiveServer):
    """LiveServer running the entry point's DrainingServer (handle_exit is what SIGTERM calls)."""

    def __init__(self, app):
        from flagscale.serve.run_serve_pi0 import DrainingServer

        super().__init__(app)
        self.server = DrainingServer(self.server.config, app, app.state.cfg.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def sigterm(self):
        import signal

        self.server.handle_exit(signal.SIGTERM, None)


@pytest.mark.parametrize("finishes", [True, False], ids=["within-drain", "past-drain"])
def test_sigterm_refuses_new_requests_and_answers_in_flight_ones(policy, finishes):
    import concurrent.futures
    import time

    gated = GatedPolicy(policy)
    gated.gate.set()
    app = create_app(gated, serve_cfg(drain_timeout_s=30 if finishes else 0.5, max_batch_size=1))
    server = DrainingLiveServer(app)
    try:
        with server, concurrent.futures.ThreadPoolExecutor(2) as pool:
            server.wait_ready()
            gated.gate.clear()
            running = pool.submit(httpx.post, f"{server.url}/infer", json=v2_body(), timeout=30)
            wait_until(lambda: app.state.worker.busy_since is not None)
            queued = pool.submit(httpx.post, f"{server.url}/infer", json=v2_body(), timeout=30)
            wait_until(lambda: app.state.worker.queue_depth == 1)
            signalled = time.monotonic()
            server.sigterm()
            new = httpx.post(f"{server.url}/infer", json=v2_body(), timeout=5)
            assert new.status_code == 503 and new.headers["retry-after"] == "1"
            assert "shutting down" in new.json()["error"]
            health = httpx.get(f"{server.url}/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            if finishes:
                gated.gate.set()
            replies = [running.result(), queued.result()]
            answered = time.monotonic() - signalled
            server.thread.join(10)
            assert not server.thread.is_alive(), "the server did not exit after draining"
    finally:
        gated.gate.set()
        app.state.worker._thread.join(30)  # the abandoned model call ends before the test does
    if finishes:
        assert [r.status_code for r in replies] == [200, 200]
    else:  # past engine.drain_timeout_s: a JSON 503, not uvicorn's plain 500
        assert [r.status_code for r in replies] == [503, 503]
        assert all("engine.drain_timeout_s=0.5" in r.json()["error"] for r in replies)
        assert answered < 3.0


# ---------------------------------------------------------------- (9) API keys


def test_non_ascii_keys_in_the_environment_are_refused():
    from flagscale.serve.auth import resolve_keys
    from flagscale.serve.config import ConfigError

    with pytest.raises(ConfigError, match="PI0_API_KEYS: an API key needs at least 8 printable"):
        resolve_keys((), {"PI0_API_KEYS": "good-key-123,clé-secrète"})
    assert resolve_keys(("cfg-key-123",), {"PI0_API_KEYS": "env-key-456"}) == (
        b"cfg-key-123",
        b"env-key-456",
    )


# ---------------------------------------------------------------- (10) odds and ends


@pytest.mark.parametrize("path", ["/health", "/healthz"])
def test_head_health_probes(http, path):
    reply = http.head(path)
    assert reply.status_code == 200 and reply.content == b""


def test_big_ignored_fields_are_refused_before_parsing(policy):
    import json
    import time
    import tracemalloc

    cfg = serve_cfg(max_body_mb=8, max_json_values=100_000)
    body = json.dumps(v2_body())[:-1] + ', "padding": [' + "[]," * 2_000_000 + "[]]}"
    with LiveServer(create_app(policy, cfg)) as server:
        server.wait_ready()
        tracemalloc.start()  # this process runs the server: its Python allocations are seen
        start = time.monotonic()
        reply = httpx.post(
            f"{server.url}/infer", content=body, headers={"Content-Type": "application/json"}
        )
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert reply.status_code == 400
    assert "JSON values; at most 100000 (engine.max_json_values)" in reply.json()["error"]
    assert peak < 60 * 2**20, peak  # the 6 MB body, its copies; parsed it would be ~200 MB
    assert elapsed < 5.0


def test_open_file_limit_is_raised_for_the_connection_cap(monkeypatch):
    import resource

    from flagscale.serve import run_serve_pi0

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, value: calls.append(value))
    run_serve_pi0.ensure_file_limit(serve_cfg(max_connections=1000))
    assert calls == [(1256, 4096)]
