"""Real-time chunking over the wire: POST /infer `rtc`, the openpi websocket `rtc` key (explicit
and per-connection forms), engine.rtc config; against a real uvicorn server (tiny random Pi0)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from serve_helpers import CLIENT, SAMPLE_IMAGES, serve_cfg, v2_body

from flagscale.serve.config import ConfigError
from flagscale.serve.errors import RequestError
from flagscale.serve.rtc import ConnectionRTC, http_requests

openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")

DELAY, EXECUTED = 4, 10


def _mad(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


def _actions(http, body) -> np.ndarray:
    response = http.post("/infer", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_http_guidance_pulls_the_delayed_actions_to_the_leftover(http):
    """The issue's done-when check on the CPU demo: inference_delay 4, the previous chunk's
    leftover; the first 4 actions at most half as far from it as without rtc; plain requests
    unchanged bit for bit."""
    prev = np.array(_actions(http, v2_body(0, seed=1))["actions"][0])
    left = prev[EXECUTED:]
    body = v2_body(1, seed=2, state=[[0.05 * i for i in range(14)]])
    plain = _actions(http, body)
    rtc = {"prev_chunk_left_over": left.tolist(), "inference_delay": DELAY}
    guided = _actions(http, dict(body, rtc=rtc))
    assert guided["rtc_guided"] == [True] and "rtc_guided" not in plain
    g, p = np.array(guided["actions"][0]), np.array(plain["actions"][0])
    before, after = _mad(p[:DELAY], left[:DELAY]), _mad(g[:DELAY], left[:DELAY])
    print(f"first {DELAY} actions vs leftover: mean abs diff {before:.4f} -> {after:.4f}")
    assert after <= 0.5 * before
    again = _actions(http, body)  # the plain request again: the same actions, bit for bit
    assert again["actions"] == plain["actions"]
    print(
        {
            k: (r["timing"]["model_ms"])
            for k, r in (("plain", plain), ("guided", guided), ("again", again))
        }
    )


def test_http_batch_rows_without_rtc_match_a_plain_batch(http):
    body = v2_body(2, seed=[3, 4], state=[[0.1] * 14, [0.2] * 14])
    body["images"] = body["images"] * 2
    plain = _actions(http, body)
    left = np.array(plain["actions"][0])[5:20]
    rtc = [{"prev_chunk_left_over": left.tolist(), "inference_delay": 2}, None]
    mixed = _actions(http, dict(body, rtc=rtc))
    assert mixed["rtc_guided"] == [True, False]
    assert mixed["actions"][1] == plain["actions"][1]
    assert mixed["actions"][0] != plain["actions"][0]


GOOD = {"prev_chunk_left_over": [[0.0] * 14] * 5, "inference_delay": 2}


@pytest.mark.parametrize(
    "rtc, field",
    [
        ("yes", "rtc: expected an object"),
        ({"inference_delay": 2}, "rtc.prev_chunk_left_over: field required"),
        (dict(GOOD, prev_chunk_left_over=[[0.0] * 13] * 5), "rtc.prev_chunk_left_over"),
        (dict(GOOD, prev_chunk_left_over=[[0.0] * 14] * 51), "rtc.prev_chunk_left_over"),
        (dict(GOOD, prev_chunk_left_over=[0.0] * 14), "rtc.prev_chunk_left_over"),
        (dict(GOOD, prev_chunk_left_over=[[0.0] * 14, [0.0]]), "rtc.prev_chunk_left_over"),
        (dict(GOOD, prev_chunk_left_over=[["a"] * 14]), "rtc.prev_chunk_left_over"),
        (dict(GOOD, prev_chunk_left_over=[[float("nan")] * 14]), "NaN"),
        (dict(GOOD, prev_chunk_left_over=[[True] * 14]), "booleans"),
        ({"prev_chunk_left_over": GOOD["prev_chunk_left_over"]}, "rtc.inference_delay"),
        (dict(GOOD, inference_delay=-1), "rtc.inference_delay"),
        (dict(GOOD, inference_delay=2.5), "rtc.inference_delay"),
        (dict(GOOD, inference_delay=True), "rtc.inference_delay"),
        (dict(GOOD, inference_delay=51), "rtc.inference_delay"),
        (dict(GOOD, execution_horizon=0), "rtc.execution_horizon"),
        (dict(GOOD, delay=2), "rtc.delay: unknown field"),
        ([GOOD, GOOD], "rtc: expected an object, or a list"),
    ],
)
def test_http_bad_rtc_fields_are_400_naming_the_field(http, rtc, field):
    body = json.dumps(v2_body(0, rtc=rtc))  # the standard library writes NaN as NaN
    response = http.post("/infer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]


def test_rtc_disabled_is_refused():
    cfg = serve_cfg(rtc={"enabled": False})
    with pytest.raises(RequestError, match=r"rtc: .*engine.rtc.enabled"):
        http_requests(GOOD, 1, cfg)
    with pytest.raises(RequestError, match="engine.rtc.enabled"):
        ConnectionRTC().request({"executed": 3, "inference_delay": 2}, cfg)


def test_rtc_config_block():
    cfg = serve_cfg(rtc={"prefix_attention_schedule": "exp", "max_guidance_weight": 5})
    assert cfg.rtc == {
        "enabled": True,
        "prefix_attention_schedule": "EXP",
        "max_guidance_weight": 5.0,
        "execution_horizon": 10,
        "gradient": "lerobot",
    }
    assert serve_cfg().rtc["prefix_attention_schedule"] == "LINEAR"
    for rtc, message in [
        ({"max_guidance": 5}, "serve.engine.rtc.max_guidance: unknown key; did you mean"),
        ({"prefix_attention_schedule": "linea"}, "did you mean 'linear'"),
        ({"max_guidance_weight": 0}, "serve.engine.rtc.max_guidance_weight: must be > 0"),
        ({"execution_horizon": 0}, "serve.engine.rtc.execution_horizon"),
        ({"gradient": "full"}, "serve.engine.rtc.gradient"),
        ({"enabled": "maybe"}, "serve.engine.rtc.enabled"),
        ("on", "serve.engine.rtc: expected a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message):
            serve_cfg(rtc=rtc)


# ---- openpi websocket ----------------------------------------------------------------------


def _client(live):
    return openpi_client.WebsocketClientPolicy(host="127.0.0.1", port=int(live.url.rsplit(":")[-1]))


def _obs(seed, **extra):
    rng = np.random.default_rng(seed)
    obs = {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "put the bowl on the plate",
    }
    obs.update(extra)
    return obs


def test_openpi_per_connection_rtc_across_reconnects(live):
    step = {"rtc": {"executed": EXECUTED, "inference_delay": DELAY}}
    client = _client(live)
    first = client.infer(_obs(0, **step))
    assert first["rtc_guided"] is False  # a new connection has no previous chunk
    second = client.infer(_obs(1, **step))
    assert second["rtc_guided"] is True
    left = first["actions"][EXECUTED:]
    plain = client.infer(_obs(1))
    assert "rtc_guided" not in plain
    explicit = client.infer(_obs(1, rtc={"prev_chunk_left_over": left, "inference_delay": DELAY}))
    assert explicit["rtc_guided"] is True
    before = _mad(plain["actions"][:DELAY], left[:DELAY])
    for guided in (second, explicit):  # (random noise: no engine.seed on this server)
        assert _mad(guided["actions"][:DELAY], left[:DELAY]) <= 0.5 * before
    assert client.infer(_obs(2, rtc={"executed": 50, "inference_delay": 2}))["rtc_guided"] is False
    reconnected = _client(live)  # the server forgets the chunk with the connection
    assert reconnected.infer(_obs(3, **step))["rtc_guided"] is False
    assert reconnected.infer(_obs(3, **step))["rtc_guided"] is True


@pytest.mark.parametrize(
    "rtc, field",
    [
        ({"executed": -1, "inference_delay": 2}, "rtc.executed"),
        ({"executed": 3}, "rtc.inference_delay: field required"),
        ({"executed": 3, "inference_delay": 2, "horizon": 4}, "rtc.horizon: unknown field"),
        ({"inference_delay": 2}, "rtc: expected prev_chunk_left_over, or executed"),
        ({"prev_chunk_left_over": np.zeros((3, 5)), "inference_delay": 1}, "prev_chunk_left_over"),
        ([1, 2], "rtc: expected an object"),
        ({"prev_chunk_left_over": np.ones((3, 14), bool), "inference_delay": 1}, "bool array"),
    ],
)
def test_openpi_bad_rtc_is_a_text_frame_naming_the_field(live, rtc, field):
    client = _client(live)
    with pytest.raises(RuntimeError, match=field):
        client.infer(_obs(0, rtc=rtc))


# ---- the example client ----------------------------------------------------------------------


def test_client_script_sends_the_previous_leftover(live):
    port = live.url.rsplit(":", 1)[1]
    cmd = [sys.executable, str(CLIENT), "--port", port, "--base-img", str(SAMPLE_IMAGES[0])]
    cmd += ["--seed", "3", "--rtc-delay", str(DELAY), "--repeat", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = re.findall(
        r"rtc: guided=\[True\], first 4 actions vs the leftover: mean abs diff (\S+)", done.stdout
    )
    assert len(lines) == 2, done.stdout  # requests 2 and 3
    assert all(float(v) < 0.1 for v in lines), done.stdout
    bad = subprocess.run(
        [*cmd[:-4], "--rtc-delay", "-1"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--rtc-delay" in bad.stderr


# ---- worker batching -----------------------------------------------------------------------


class RecordingPolicy:
    def __init__(self):
        self.calls = []

    def infer_batch(self, observations, num_steps=None, noise=None, seeds=None, **kwargs):
        self.calls.append(([o["id"] for o in observations], kwargs.get("rtc")))
        return [{"actions": np.zeros((2, 2), np.float32)} for _ in observations]


def test_worker_batches_rtc_requests_only_with_each_other():
    from flagscale.serve.engine import Loaded
    from flagscale.serve.worker import InferenceWorker

    policy = RecordingPolicy()
    worker = InferenceWorker(lambda: Loaded(policy), max_batch_size=8, max_wait_ms=200)
    guide = {"prev_chunk_left_over": np.zeros((3, 2), np.float32), "inference_delay": 1}
    with worker._cond:  # queue everything before the thread takes the first job
        worker.state = "ready"
        futures = [
            worker.submit([{"id": 0}], [None], [None], 10),
            worker.submit([{"id": 1}, {"id": 2}], [None] * 2, [None] * 2, 10, [guide, None]),
            worker.submit([{"id": 3}], [None], [None], 10, [None]),  # per-connection, no chunk
            worker.submit([{"id": 4}], [None], [None], 10, [guide]),
        ]
    worker._thread.start()
    try:
        for future in futures:
            future.result(10)
    finally:
        worker.stop()
    assert sorted(policy.calls, key=lambda c: c[0]) == [
        ([0, 3], None),
        ([1, 2, 4], [guide, None, guide]),
    ]
