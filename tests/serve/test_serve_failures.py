"""Queue overflow (503), model errors (500) and the loading state, over real HTTP.

Each test starts its own server around the tiny policy (wrapped to be slow or to fail).
"""

import threading
import time

import httpx
import numpy as np

from serve_helpers import LiveServer, PolicyWrapper, serve_cfg, v2_body

from flagscale.serve.app import create_app


class SlowPolicy(PolicyWrapper):
    """The tiny policy, plus a fixed delay per model call (fills the queue)."""

    def __init__(self, policy, delay_s):
        super().__init__(policy)
        self.delay_s = delay_s

    def infer_batch(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return self.policy.infer_batch(*args, **kwargs)


class ExplodingPolicy(SlowPolicy):
    """Raises inside the model call for prompts containing 'explode'."""

    def infer_batch(self, observations, *args, **kwargs):
        if any("explode" in o["prompt"] for o in observations):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return self.policy.infer_batch(observations, *args, **kwargs)


def post_all(url, bodies):
    replies = [None] * len(bodies)

    def send(i):
        replies[i] = httpx.post(f"{url}/infer", json=bodies[i], timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return replies


def test_queue_overflow_gives_503_and_the_server_recovers(policy):
    cfg = serve_cfg(max_queue=1, max_batch_size=1, max_wait_ms=0)
    with LiveServer(create_app(SlowPolicy(policy, 0.4), cfg)) as server:
        server.wait_ready()
        replies = post_all(server.url, [v2_body(num_steps=1) for _ in range(5)])
        codes = sorted(r.status_code for r in replies)
        assert codes.count(503) >= 2, codes
        assert codes.count(200) >= 1, codes
        busy = next(r for r in replies if r.status_code == 503)
        assert set(busy.json()) == {"success", "error"}
        assert busy.json()["success"] is False
        assert "engine.max_queue=1" in busy.json()["error"]
        assert busy.headers["retry-after"] == "1"
        ok = httpx.post(f"{server.url}/infer", json=v2_body(num_steps=1), timeout=60)
        assert ok.status_code == 200


def test_model_error_is_a_json_500_for_that_request_only(policy):
    cfg = serve_cfg(max_batch_size=4, max_wait_ms=100)
    with LiveServer(create_app(ExplodingPolicy(policy, 0), cfg)) as server:
        server.wait_ready()
        good = v2_body(num_steps=1, seed=1)
        bad = v2_body(num_steps=1, seed=1, instruction="please explode")
        replies = post_all(server.url, [good, bad, good])
        assert [r.status_code for r in replies] == [200, 500, 200]
        error = replies[1].json()
        assert error["success"] is False
        # the type only: exception messages and tracebacks can name files and install paths
        assert error["error"] == (
            "internal server error: inference failed (RuntimeError); see the server log"
        )
        np.testing.assert_allclose(
            replies[0].json()["actions"], replies[2].json()["actions"], atol=1e-5
        )
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_health_is_loading_until_the_policy_is_ready(policy):
    release = threading.Event()

    def load():
        assert release.wait(30)
        return policy

    with LiveServer(create_app(None, serve_cfg(), load_policy=load)) as server:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        assert health.json()["model_loaded"] is False
        info = httpx.get(f"{server.url}/info").json()
        assert info["model_loaded"] is False and info["metadata"] is None
        infer = httpx.post(f"{server.url}/infer", json=v2_body())
        assert infer.status_code == 503
        assert "not loaded yet" in infer.json()["error"]
        release.set()
        server.wait_ready()
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 200 and health.json()["status"] == "healthy"


def test_failed_load_is_reported_on_health():
    def load():
        raise FileNotFoundError("/models/lerobot/pi0/config.json")

    failures = []
    app = create_app(None, serve_cfg(), load_policy=load, on_failure=failures.append)
    with LiveServer(app) as server:
        assert not app.state.worker.wait_ready(10)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        assert "config.json" in health.json()["error"]
        infer = httpx.post(f"{server.url}/infer", json=v2_body())
        assert infer.status_code == 503 and "failed to load" in infer.json()["error"]
    assert len(failures) == 1


def test_config_that_does_not_fit_the_model_fails_at_start(policy):
    app = create_app(policy, serve_cfg(action_horizon=60))  # the tiny model's chunk is 50
    with LiveServer(app):
        assert not app.state.worker.wait_ready(10)
        assert "action_horizon" in app.state.worker.error
        assert "chunk_size 50" in app.state.worker.error


class BreakableMetadata(SlowPolicy):
    """metadata raises while `broken` (an unexpected error outside the model call)."""

    broken = False

    @property
    def metadata(self):
        if self.broken:
            raise KeyError("chunk_size")
        return self.policy.metadata


def test_unexpected_error_is_a_json_500_and_the_server_lives_on(policy):
    wrapped = BreakableMetadata(policy, 0)
    with LiveServer(create_app(wrapped, serve_cfg())) as server:
        server.wait_ready()
        wrapped.broken = True
        reply = httpx.post(f"{server.url}/infer", json=v2_body(num_steps=1))
        assert reply.status_code == 500
        assert reply.json() == {
            "success": False,
            "error": "internal server error: unexpected error (KeyError); see the server log",
        }
        wrapped.broken = False
        assert httpx.post(f"{server.url}/infer", json=v2_body(num_steps=1)).status_code == 200
