"""A real server with the tiny random Pi0.5 policy: HTTP /infer, /info and the openpi websocket."""

import httpx
import numpy as np
import pytest

from serve_helpers import LiveServer, serve_cfg, v2_body

from flagscale.serve.app import create_app


@pytest.fixture(scope="module")
def live05():
    from flagscale.models.pi0 import PI0Policy

    policy = PI0Policy.random(preset="pi05_tiny", device="cpu", dtype="float32", seed=0)
    cfg = serve_cfg(preset="pi05_tiny", model_variant="pi0.5")
    with LiveServer(create_app(policy, cfg)) as server:
        server.wait_ready()
        yield server


def test_http_infer_and_info(live05):
    with httpx.Client(base_url=live05.url, timeout=60) as http:
        reply = http.post("/infer", json=v2_body(seed=1))
        assert reply.status_code == 200, reply.text
        assert np.asarray(reply.json()["actions"]).shape == (1, 50, 14)
        again = http.post("/infer", json=v2_body(seed=1))
        assert again.json()["actions"] == reply.json()["actions"]  # seeded: deterministic
        other = http.post("/infer", json=v2_body(seed=1, state=[[0.5] * 14]))
        assert other.json()["actions"] != reply.json()["actions"]  # the state reaches the prompt
        info = http.get("/info").json()
        assert info["model_variant"] == "pi0.5"
        assert info["metadata"]["reference_choices"]["reference"] == "lerobot"


def test_bad_state_is_a_clear_4xx(live05):
    with httpx.Client(base_url=live05.url, timeout=60) as http:
        reply = http.post("/infer", json=v2_body(state=[[0.0] * 3]))
        assert reply.status_code == 400 and "expected 14 values" in reply.json()["error"]
        reply = http.post("/infer", json={k: v for k, v in v2_body().items() if k != "state"})
        assert reply.status_code == 422 and "state" in reply.json()["error"]


def test_stock_openpi_client(live05):
    openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
    client = openpi_client.WebsocketClientPolicy(
        host="127.0.0.1", port=int(live05.url.rsplit(":", 1)[1])
    )
    assert client.get_server_metadata()["model_variant"] == "pi0.5"
    rng = np.random.default_rng(0)
    obs = {
        "images": {c: rng.integers(0, 256, (3, 224, 224), dtype=np.uint8) for c in ("cam_high",)},
        "state": np.zeros(14, np.float32),
        "prompt": "fold the towel",
    }
    out = client.infer(obs)
    assert out["actions"].shape == (50, 14) and np.isfinite(out["actions"]).all()


def test_real_time_chunking(live05):
    """RTC on Pi0.5 over HTTP: the first inference_delay actions follow the leftover."""
    with httpx.Client(base_url=live05.url, timeout=60) as http:
        prev = np.asarray(http.post("/infer", json=v2_body(seed=1)).json()["actions"][0])
        body = v2_body(1, seed=2, state=[[0.3] * 14])
        plain = np.asarray(http.post("/infer", json=body).json()["actions"][0])
        rtc = {"prev_chunk_left_over": prev[10:].tolist(), "inference_delay": 4}
        reply = http.post("/infer", json=dict(body, rtc=rtc)).json()
    assert reply["rtc_guided"] == [True]
    guided = np.asarray(reply["actions"][0])
    before, after = (np.abs(a[:4] - prev[10:14]).mean() for a in (plain, guided))
    assert after <= 0.5 * before
