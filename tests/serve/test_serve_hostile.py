"""Hostile and careless clients (issue 19): each test reproduces one attack against a real uvicorn
server on loopback (tiny random policy) with small configured limits, and checks the answer."""

import msgpack
import numpy as np
import pytest

from serve_helpers import v2_body

from flagscale.serve import msgpack_codec

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
