"""Operations: Prometheus metrics, request ids, API keys (HTTP + websocket), CORS, /healthz."""

import re

import httpx
import pytest

from serve_helpers import LiveServer, serve_cfg, v2_body

from flagscale.serve.app import create_app
from flagscale.serve.auth import authorized

KEY = "test-key-0123456789"


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_move_with_requests(http):
    before = http.get("/metrics").text
    for seed in range(3):
        assert http.post("/infer", json=v2_body(seed)).status_code == 200
    assert http.post("/infer", json={"images": []}).status_code == 422
    after = http.get("/metrics").text
    ok = dict(endpoint="/infer", status="200")
    assert (
        metric(after, "pi0_requests_total", **ok) == metric(before, "pi0_requests_total", **ok) + 3
    )
    bad = dict(endpoint="/infer", status="422")
    assert (
        metric(after, "pi0_requests_total", **bad)
        == metric(before, "pi0_requests_total", **bad) + 1
    )
    for name in ("pi0_queue_wait_seconds_count", "pi0_preprocess_seconds_count"):
        assert metric(after, name) == metric(before, name) + 3
    assert metric(after, "pi0_model_seconds_count") > metric(before, "pi0_model_seconds_count")
    assert metric(after, "pi0_batch_size_sum") >= metric(before, "pi0_batch_size_sum") + 3
    assert metric(after, "pi0_worker_ready") == 1.0
    assert 'pi0_request_duration_seconds_bucket{endpoint="/infer",le="+Inf"}' in after


def test_request_id_is_echoed_or_generated(http):
    given = http.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = http.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert (
        made.headers["x-request-id"] != "bad id with spaces"
        and len(made.headers["x-request-id"]) == 32
    )
    assert http.get("/nope").headers["x-request-id"]


def test_healthz_for_openpi_probes(http):
    response = http.get("/healthz")
    assert response.status_code == 200 and response.text == "OK\n"


def test_cors_is_off_by_default(http):
    response = http.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_authorized_schemes_and_mismatches():
    keys = (KEY.encode(),)
    assert authorized(f"Bearer {KEY}", keys) and authorized(f"Api-Key {KEY}", keys)
    assert authorized(f"bearer  {KEY}", keys)
    for header in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer ", "Bearer  "):
        assert not authorized(header, keys), header
    assert authorized(None, ())


@pytest.fixture(scope="module")
def secured(policy):
    cfg = serve_cfg(api_keys=[KEY], cors_allow_origins=["https://app.example"])
    app = create_app(policy, cfg, env={"PI0_API_KEYS": "second-key-abcdefgh"})
    with LiveServer(app) as server:
        server.wait_ready()
        yield server


def test_http_api_keys(secured):
    url = secured.url
    body = v2_body()
    for headers in ({}, {"Authorization": "Bearer wrong-key-123456"}, {"Authorization": KEY}):
        response = httpx.post(f"{url}/infer", json=body, headers=headers, timeout=60)
        assert response.status_code == 401
        assert response.json() == {"success": False, "error": response.json()["error"]}
        assert "wrong" not in response.json()["error"] and "x-request-id" in response.headers
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/info").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # stays open for probes
    for key in (KEY, "second-key-abcdefgh"):
        response = httpx.post(
            f"{url}/infer", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        assert response.status_code == 200, response.text
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert metric(text, "pi0_requests_total", endpoint="/infer", status="401") == 3


def test_websocket_api_keys(secured):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from test_serve_openpi import libero_obs
    from websockets.exceptions import InvalidStatus

    host = secured.url.replace("http://", "ws://")
    for key in (None, "wrong-key-123456"):
        with pytest.raises(InvalidStatus) as denied:
            WebsocketClientPolicy(host=host, api_key=key)
        assert denied.value.response.status_code == 401
    client = WebsocketClientPolicy(host=host, api_key=KEY)
    assert client.infer(libero_obs())["actions"].shape == (50, 14)


def test_cors_allow_list(secured):
    allowed = httpx.options(
        f"{secured.url}/infer",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{secured.url}/infer",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_api_keys_never_leave_the_config():
    cfg = serve_cfg(api_keys=[KEY])
    assert KEY not in str(cfg.to_dict()) and KEY not in repr(cfg)


def test_public_bind_without_key_warns():
    from unittest import mock

    from flagscale.serve import auth

    with mock.patch.object(auth.logger, "warning") as warning:
        auth.warn_if_exposed("127.0.0.1", ())
        auth.warn_if_exposed("0.0.0.0", (KEY.encode(),))
        assert warning.call_count == 0
        auth.warn_if_exposed("0.0.0.0", ())
        auth.warn_if_exposed("::", ())
        assert warning.call_count == 2


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"api_keys": ["short"]}, "api_keys[0]: an API key needs at least 8"),
        ({"api_keys": "one-string-key"}, "api_keys: expected a list"),
        ({"openpi_path": "/infer"}, "already an HTTP route"),
        ({"openpi_path": "ws"}, "starting with '/'"),
        ({"openpi_images": {"observation/image": "nope"}}, "unknown image slot"),
        ({"openpi_state_keys": []}, "must not be empty"),
        ({"drain_timeout_s": -1}, "drain_timeout_s"),
        ({"infer_timeout_s": 0}, "infer_timeout_s"),
        ({"cors_allow_origins": [""]}, "cors_allow_origins[0]"),
    ],
)
def test_new_engine_keys_are_validated(engine, message):
    from flagscale.serve.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        serve_cfg(**engine)
