"""Lifecycle: a crashed or hung inference thread is reported, SIGTERM drains in-flight requests."""

import concurrent.futures
import signal
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from serve_helpers import LiveServer, PolicyWrapper, serve_cfg, v2_body
from test_serve_entry import ENTRY, REPO, resolved_config, start, wait_healthy

from flagscale.serve.app import create_app


class Crash(BaseException):
    """Not an Exception: escapes the worker's per-batch error handling and kills the thread."""


class FlakyPolicy(PolicyWrapper):
    """The tiny policy, until `mode` says to crash the thread or hang in the model call."""

    def __init__(self, policy):
        super().__init__(policy)
        self.mode = None
        self.release = threading.Event()

    def infer_batch(self, *args, **kwargs):
        if self.mode == "crash":
            raise Crash("simulated fatal error")
        if self.mode == "hang":
            self.release.wait(30)
        return self.policy.infer_batch(*args, **kwargs)


def test_dead_inference_thread_is_reported_and_requests_fail_fast(policy):
    flaky = FlakyPolicy(policy)
    with LiveServer(create_app(flaky, serve_cfg())) as server:
        server.wait_ready()
        flaky.mode = "crash"
        start_s = time.monotonic()
        first = httpx.post(f"{server.url}/infer", json=v2_body(), timeout=30)
        assert first.status_code == 500 and "inference failed" in first.json()["error"]
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and "Crash" in health.json()["error"]
        again = httpx.post(f"{server.url}/infer", json=v2_body(), timeout=30)
        assert again.status_code == 503
        assert time.monotonic() - start_s < 10


def test_hung_model_call_gets_timely_503_and_health_says_stalled(policy):
    flaky = FlakyPolicy(policy)
    with LiveServer(create_app(flaky, serve_cfg(infer_timeout_s=1))) as server:
        server.wait_ready()
        flaky.mode = "hang"
        start_s = time.monotonic()
        response = httpx.post(f"{server.url}/infer", json=v2_body(), timeout=30)
        assert response.status_code == 503 and "infer_timeout_s" in response.json()["error"]
        assert time.monotonic() - start_s < 5
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and "stalled" in health.json()["error"]
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 503
        flaky.mode = None
        flaky.release.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "did not recover after the model call returned"
            time.sleep(0.05)
        assert httpx.post(f"{server.url}/infer", json=v2_body(), timeout=30).status_code == 200


def _post(url: str, index: int):
    try:
        response = httpx.post(f"{url}/infer", json=v2_body(index, num_steps=40), timeout=60)
    except httpx.TransportError as e:  # refused / reset before the server accepted it
        return index, None, type(e).__name__, time.monotonic()
    return index, response.status_code, response.text[:200], time.monotonic()


def _sigterm_mid_load(tmp_path, call, n: int):
    """Start the real server entry, run `call(port, i)` for n clients, SIGTERM once 2 answered.
    Returns (results, sigterm time, exit code, port)."""
    config, port = resolved_config(tmp_path, max_batch_size=2, drain_timeout_s=60, access_log=False)
    proc = start([sys.executable, str(ENTRY), "--config-path", str(config)], tmp_path, REPO)
    try:
        wait_healthy(proc, port)
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(call, port, i) for i in range(n)]
            while sum(f.done() for f in futures) < 2:  # mid-way: some answered, most in flight
                time.sleep(0.01)
                assert proc.poll() is None
            sigterm_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return results, sigterm_at, code, port


@pytest.mark.slow
def test_sigterm_during_load_loses_no_accepted_request(tmp_path):
    results, sigterm_at, code, port = _sigterm_mid_load(
        tmp_path, lambda port, i: _post(f"http://127.0.0.1:{port}", i), 16
    )
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").read_text()
    answered = [r for r in results if r[1] is not None]
    assert all(r[1] == 200 for r in answered), [r for r in answered if r[1] != 200]
    after = [r for r in answered if r[3] > sigterm_at]
    print(
        "answered",
        len(answered),
        "after SIGTERM",
        len(after),
        "refused",
        len(results) - len(answered),
    )
    assert len(after) >= 4, f"expected in-flight requests to finish after SIGTERM: {results}"
    assert code == 0, log[-2000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def _ws_infer(port: int, index: int, connected: threading.Barrier):
    """One openpi client: connect, wait until all are connected, send one request."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    rng = np.random.default_rng(index)
    obs = {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": np.zeros(8, np.float32),
        "prompt": "put the bowl on the plate",
        "num_steps": 40,
    }
    connected.wait(30)
    try:
        out = client.infer(obs)
    except Exception as e:  # the connection was closed under the request
        return index, type(e).__name__, time.monotonic()
    return index, out["actions"].shape, time.monotonic()


@pytest.mark.slow
def test_sigterm_drains_in_flight_websocket_requests(tmp_path):
    pytest.importorskip("openpi_client")
    n = 8
    connected = threading.Barrier(n)
    results, sigterm_at, code, _ = _sigterm_mid_load(
        tmp_path, lambda port, i: _ws_infer(port, i, connected), n
    )
    failed = [r for r in results if r[1] != (50, 14)]
    assert not failed, f"in-flight websocket requests lost on SIGTERM: {results}"
    assert any(r[2] > sigterm_at for r in results), results
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
