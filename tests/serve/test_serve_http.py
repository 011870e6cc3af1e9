"""POST /infer, /health, /info over real HTTP against the tiny random Pi0 policy."""

import base64
import io
import json
import random
import threading

import httpx
import numpy as np
import pytest
import torch

from PIL import Image
from serve_helpers import sample_b64, small_image, v2_body

from flagscale.serve.schemas import InferResponse

STATE_DIM = 14
V1_INSTRUCTION = "Grab the orange and put it into the basket."


def v1_body_like_flagscale_client(num_steps=20) -> dict:
    """The payload FlagScale v1's examples/pi0/client_pi0.py builds (build_payload), as is."""
    state = np.random.uniform(-1, 1, size=(1, STATE_DIM)).tolist()
    return {
        "instruction": V1_INSTRUCTION,
        "qpos": [[random.random() for _ in range(STATE_DIM)]],
        "eef_pose": [[random.random() for _ in range(STATE_DIM)]],
        "state": state,
        "high_level_instruction": V1_INSTRUCTION,
        "fine_grained_instruction": None,
        "images": [
            {
                "cam_high": sample_b64(0),
                "cam_left_wrist": sample_b64(1),
                "cam_right_wrist": sample_b64(2),
            }
        ],
        "image_masks": [{"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": True}],
        "num_steps": num_steps,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 64,
        "do_sample": False,
    }


def actions_of(reply: httpx.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["success"] is True
    return np.asarray(body["actions"], dtype=np.float32)


def assert_error(reply: httpx.Response, status: int, *fragments: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["success"] is False
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# ---------------------------------------------------------------- health and info


def test_health_reports_ready(http):
    reply = http.get("/health")
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "healthy"
    assert body["model_loaded"] is True
    assert body["gpu_info"]["available"] is torch.cuda.is_available()  # torch is loaded
    if not torch.cuda.is_available():
        assert body["gpu_info"]["device_name"] == "cpu"
    assert isinstance(body["timestamp"], float)


def test_info_describes_model_and_limits(http):
    body = http.get("/info").json()
    assert body["model_loaded"] is True
    assert body["random_init"] is True
    assert body["metadata"]["preset"] == "tiny"
    assert body["metadata"]["chunk_size"] == 50
    assert body["cameras"]["cam_high"] == "base_0_rgb"
    assert body["action_shape"] == [50, 14]  # served: [:action_horizon, :action_dim]
    assert body["metadata"]["output_action_dim"] == 32  # the policy's, before the cut
    assert body["log_dir"] is None  # set by run_serve_pi0 (run.py's <exp_dir>/serve_logs)
    assert body["state_dim"] == 14
    assert body["ops"] == "native"
    assert body["metadata"]["op_routes"]["linear"] == "native"
    assert body["metadata"]["fused_kernels"] == []  # CPU: composed ops
    assert body["limits"]["max_body_mb"] == 1
    assert body["limits"]["max_batch_size"] == 4
    assert body["num_steps"] == {"default": 10, "max": 100}
    assert body["cuda_graphs"] is None  # CPU: no graphs


# ---------------------------------------------------------------- valid requests


def test_v1_body_as_the_flagscale_client_sends_it(http):
    reply = http.post("/infer", content=json.dumps(v1_body_like_flagscale_client()))
    actions = actions_of(reply)
    body = reply.json()
    assert actions.shape == (1, 50, 14)
    assert np.isfinite(actions).all()
    assert body["qpos"] == body["actions"]  # v1 clients read the actions from `qpos`
    assert body["num_steps"] == 20  # honoured and echoed
    assert set(body["timing"]) == {
        "queue_ms",
        "preprocess_ms",
        "model_ms",
        "total_ms",
        "batch_size",
    }
    assert body["timing"]["batch_size"] >= 1
    assert body["timing"]["total_ms"] >= body["timing"]["model_ms"]
    InferResponse.model_validate(body)  # the documented schema (the body is built directly)


@pytest.mark.parametrize("fast", [True, False])
def test_actions_render_the_same_with_and_without_orjson(fast, monkeypatch):
    from flagscale.serve import wire as app_module

    if fast:
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(app_module, "orjson", None)
    values = np.random.default_rng(0).standard_normal((1, 50, 14)).astype(np.float32)
    values[0, 0, :3] = [1e-7, -3.5e-12, 0.0]
    actions = values.astype(np.float64)
    body = app_module.ActionsResponse({"success": True, "actions": actions, "seed": 3}).body
    parsed = json.loads(body)
    assert parsed["success"] is True and parsed["seed"] == 3
    assert np.asarray(parsed["actions"]).tolist() == actions.tolist()  # every digit round-trips
    assert np.array_equal(np.asarray(parsed["actions"], dtype=np.float32), values)


REQUEST_BODIES = [
    b'{"instruction": "pick", "qpos": [[0.1, -2.5e-300, 9.2e18]], "seed": 7}',
    b'{"a": NaN, "b": -Infinity}',  # the standard library's extensions
    '{"instruction": "caf\u00e9"}'.encode("utf-16"),  # json.loads detects UTF-16/32
    b'{"seed": 123456789012345678901234567890}',  # beyond 64 bits: orjson reads a float
    b'{"seed": 18446744073709551615, "n": -9223372036854775808}',  # 64-bit limits
    b'{"state": [[1e30, -3e25]]}',  # large floats: the standard library reads them too
    b'{"x": 1e400}',  # -> inf in json
    b'{"a": 1, "a": 2}',  # duplicate keys: the last wins
    b"[" * 2000 + b"]" * 2000,  # deeper than orjson's limit
    b"[" * 900 + b"1" + b"]" * 900,  # within it
    b'{"a": [1, 2}',
    b'{"a": "\\ud800"}',  # a lone surrogate
    b'{"a": 1} trailing',
]


@pytest.mark.parametrize("body", REQUEST_BODIES)
def test_request_json_parses_as_the_standard_library_does(body):
    """orjson parses the bodies it takes; the rest fall back: same values, same errors."""
    from flagscale.serve import wire as app_module

    def outcome(parse):
        try:
            return "ok", repr(parse(body))
        except (ValueError, RecursionError) as e:
            return type(e).__name__, str(e)

    assert outcome(app_module.load_json) == outcome(json.loads)


def test_request_json_takes_orjson_when_it_can(monkeypatch):
    orjson = pytest.importorskip("orjson")
    from flagscale.serve import wire as app_module

    calls = []
    real = json.loads
    monkeypatch.setattr(app_module.json, "loads", lambda b: calls.append(b) or real(b))
    assert app_module.load_json(REQUEST_BODIES[0]) == orjson.loads(REQUEST_BODIES[0])
    assert calls == []  # the fast path answered
    assert app_module.load_json(REQUEST_BODIES[1])["b"] == float("-inf")
    assert calls == [REQUEST_BODIES[1]]


def test_eef_pose_is_the_state_and_state_is_ignored_in_v1(http):
    body = v1_body_like_flagscale_client(num_steps=2)
    body["seed"] = 3
    first = actions_of(http.post("/infer", json=body))
    body["state"] = [[5.0] * STATE_DIM]  # v1 ignores `state` when eef_pose is there
    same = actions_of(http.post("/infer", json=body))
    body["eef_pose"] = [[5.0] * STATE_DIM]
    other = actions_of(http.post("/infer", json=body))
    np.testing.assert_array_equal(first, same)
    assert np.abs(first - other).max() > 1e-4


def test_v2_body_with_data_url_and_one_camera(http):
    body = v2_body()
    image = body["images"][0]["observation.images.base_0_rgb"]
    body["images"][0]["observation.images.base_0_rgb"] = "data:image/jpeg;base64," + image
    reply = http.post("/infer", json=body)
    assert actions_of(reply).shape == (1, 50, 14)
    assert "seed" not in reply.json()  # no seed given, none configured


def test_same_seed_same_actions_and_num_steps_matter(http):
    a = actions_of(http.post("/infer", json=v2_body(num_steps=3)))
    b = actions_of(http.post("/infer", json=v2_body(num_steps=3)))
    seeded = v2_body(num_steps=3, seed=7)
    c = actions_of(http.post("/infer", json=seeded))
    d = actions_of(http.post("/infer", json=seeded))
    e = actions_of(http.post("/infer", json={**seeded, "num_steps": 1}))
    assert np.abs(a - b).max() > 1e-3  # fresh noise per request without a seed
    np.testing.assert_array_equal(c, d)
    assert np.abs(c - e).max() > 1e-3


def test_request_noise_is_used(http):
    noise = np.random.default_rng(0).standard_normal((50, 32)).tolist()
    a = actions_of(http.post("/infer", json=v2_body(noise=noise, num_steps=2)))
    b = actions_of(http.post("/infer", json=v2_body(noise=[noise], num_steps=2, seed=9)))
    np.testing.assert_array_equal(a, b)  # noise wins over seed; batch axis optional


def test_masked_camera_is_dropped(http):
    two = {"cam_high": small_image(1), "cam_left_wrist": small_image(2)}
    body = v2_body(seed=4, num_steps=2, images=[two])
    both = actions_of(http.post("/infer", json=body))
    masked = actions_of(
        http.post("/infer", json={**body, "image_masks": [{"left_wrist_0_rgb": False}]})
    )
    alone = actions_of(http.post("/infer", json={**body, "images": [{"cam_high": small_image(1)}]}))
    np.testing.assert_allclose(masked, alone, atol=1e-5)
    assert np.abs(both - masked).max() > 1e-4


# ---------------------------------------------------------------- batching and concurrency


def test_batch_request_equals_solo_runs(http):
    images = [{"cam_high": small_image(10)}, {"cam_left_wrist": small_image(11)}]
    states = [[0.1] * STATE_DIM, [-0.2] * STATE_DIM]
    batch = v2_body(images=images, state=states, seed=[5, 6], num_steps=3)
    together = actions_of(http.post("/infer", json=batch))
    assert together.shape == (2, 50, 14)
    for i in range(2):
        solo = v2_body(images=[images[i]], state=[states[i]], seed=5 + i, num_steps=3)
        np.testing.assert_allclose(
            together[i], actions_of(http.post("/infer", json=solo))[0], atol=1e-5
        )


def test_concurrent_clients_get_their_own_answers(live):
    """6 clients at once: each answer equals that request's solo answer; some were batched."""
    bodies = [v2_body(seed=20 + i, num_steps=2, state=[[0.05 * i] * STATE_DIM]) for i in range(6)]
    with httpx.Client(base_url=live.url, timeout=60) as client:
        solo = [actions_of(client.post("/infer", json=b)) for b in bodies]
    results = [None] * len(bodies)

    def send(i):
        with httpx.Client(base_url=live.url, timeout=60) as client:
            results[i] = client.post("/infer", json=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, reply in enumerate(results):
        np.testing.assert_allclose(actions_of(reply), solo[i], atol=1e-5)
    assert max(r.json()["timing"]["batch_size"] for r in results) >= 2


def test_different_num_steps_are_not_batched_together(live):
    bodies = [v2_body(seed=30 + i, num_steps=1 + i % 2) for i in range(4)]
    results = [None] * 4

    def send(i):
        results[i] = httpx.post(f"{live.url}/infer", json=bodies[i], timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, reply in enumerate(results):
        assert reply.status_code == 200
        assert reply.json()["num_steps"] == 1 + i % 2
        assert reply.json()["timing"]["batch_size"] <= 2


# ---------------------------------------------------------------- bad input -> 4xx, server survives


def _truncated_jpeg() -> str:
    raw = base64.b64decode(sample_b64(0))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


def _png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _nan_eef_pose() -> bytes:
    body = v1_body_like_flagscale_client()
    body["eef_pose"][0][3] = float("nan")
    return json.dumps(body).encode()  # json writes the NaN token


def _huge_state() -> bytes:
    return json.dumps(v2_body(state=[[12345.0] * 14])).replace("12345.0", "1e999", 1).encode()


def _with_raw(field: str, raw: str) -> bytes:
    """v2_body with `field` set to raw JSON text (what json.dumps cannot write)."""
    return json.dumps(v2_body(**{field: "RAW"})).replace('"RAW"', raw).encode()


BAD_JSON = [
    ("not json", b"{images: nope", 400, ["invalid JSON"]),
    # regressions: these were 500s (OverflowError in numpy, TypeError in the tokenizer)
    ("huge int state", _with_raw("state", "[1" + "0" * 400 + "]"), 422, ["state", "too large"]),
    ("huge int noise", _with_raw("noise", "[1" + "0" * 400 + "]"), 422, ["noise", "too large"]),
    ("lone surrogate", _with_raw("instruction", '"\\ud800"'), 400, ["instruction", "Unicode"]),
    ("empty body", b"", 400, ["empty"]),
    ("json array", b"[1, 2]", 400, ["JSON object"]),
    ("nan token", _nan_eef_pose(), 400, ["eef_pose", "NaN or infinite"]),
    ("huge number", _huge_state(), 400, ["state", "NaN or infinite"]),
]


@pytest.mark.parametrize("name,raw,status,fragments", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_raw_bodies(http, name, raw, status, fragments):
    assert_error(http.post("/infer", content=raw), status, *fragments)


def _bad(**changes) -> dict:
    body = v2_body()
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()
BAD_BODIES = [
    ("missing images", _bad(images=_DROP), 422, ["images: field required"]),
    ("images not a list", _bad(images="abc"), 422, ["images"]),
    ("empty images", _bad(images=[]), 422, ["images"]),
    ("image not a string", _bad(images=[{"cam_high": 5}]), 422, ["images.0.cam_high"]),
    ("missing state", _bad(state=_DROP), 422, ["state: field required"]),
    ("state not numbers", _bad(state=[["a"] * 14]), 422, ["state"]),
    ("ragged state", _bad(state=[[1.0] * 14, [1.0]]), 422, ["state"]),
    ("num_steps not int", _bad(num_steps="many"), 422, ["num_steps"]),
    ("num_steps bool", _bad(num_steps=True), 422, ["num_steps"]),
    ("num_steps numeric string", _bad(num_steps="3"), 422, ["num_steps"]),
    ("seed float", _bad(seed=1.5), 422, ["seed"]),
    ("state strings", _bad(state=[["1"] * 14]), 422, ["state", "numbers only"]),
    ("state bools", _bad(state=[[True] * 14]), 422, ["state", "numbers only"]),
    (
        "instruction not str",
        _bad(instruction=5),
        422,
        ["instruction: Input should be a valid string or a valid list"],
    ),
    ("bad base64", _bad(images=[{"cam_high": "%%%"}]), 400, ["images[0].cam_high", "base64"]),
    (
        "not an image",
        _bad(images=[{"cam_high": base64.b64encode(b"hello world").decode()}]),
        400,
        ["images[0].cam_high", "not a recognised image"],
    ),
    ("truncated jpeg", _bad(images=[{"cam_high": _truncated_jpeg()}]), 400, ["truncated"]),
    (
        "image too wide",
        _bad(images=[{"cam_high": _png(2000, 8)}]),
        400,
        ["2000x8", "max_image_side"],
    ),
    ("short state", _bad(state=[[0.0] * 7]), 400, ["state", "expected 14", "got 7"]),
    ("state rows", _bad(state=[[0.0] * 14] * 2), 400, ["state", "2 rows"]),
    ("nan noise", _bad(noise=[[float("nan")] * 32] * 50), 400, ["noise", "NaN"]),
    ("noise shape", _bad(noise=[[0.0] * 32] * 10), 400, ["noise", "[1, 50, 32]"]),
    (
        "unknown camera",
        _bad(images=[{"cam_top": small_image()}]),
        400,
        ["unknown camera 'cam_top'", "cam_high, cam_left_wrist, cam_right_wrist"],
    ),
    ("no camera", _bad(images=[{"cam_high": None}]), 400, ["at least one"]),
    (
        "slot twice, first null",
        _bad(images=[{"cam_high": None, "observation.images.base_0_rgb": small_image()}]),
        400,
        ["given twice"],
    ),
    ("all masked", _bad(image_masks=[{"base_0_rgb": False}]), 400, ["at least one"]),
    ("unknown mask", _bad(image_masks=[{"cam_x": True}]), 400, ["image_masks[0]", "cam_x"]),
    ("num_steps zero", _bad(num_steps=0), 400, ["num_steps", "1..100"]),
    ("num_steps too many", _bad(num_steps=101), 400, ["num_steps", "got 101"]),
    ("negative seed", _bad(seed=-1), 400, ["seed"]),
    (
        "too many observations",
        _bad(images=[{"cam_high": small_image()}] * 5),
        400,
        ["max_batch_size"],
    ),
]


@pytest.mark.parametrize("name,body,status,fragments", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies(http, name, body, status, fragments):
    assert_error(http.post("/infer", content=json.dumps(body)), status, *fragments)


def test_unknown_route_and_method_are_json(http):
    assert_error(http.get("/nope"), 404, "Not Found", "/nope")
    assert_error(http.get("/infer"), 405, "Method Not Allowed")


def test_body_over_limit_with_content_length(http):
    body = v2_body(padding="x" * (1024 * 1024 + 10))
    assert_error(http.post("/infer", json=body), 413, "max_body_mb")


def test_body_over_limit_chunked_without_content_length(http):
    def chunks():
        yield b'{"padding": "'
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MB in all
        yield b'"}'

    reply = http.post("/infer", content=chunks())
    assert "content-length" not in reply.request.headers
    assert_error(reply, 413, "max_body_mb")


def test_very_thin_image_is_served(http):
    # regression: a 1 x 1000 image resized to 0 rows inside the policy (HTTP 500)
    for width, height in ((1000, 1), (1, 1000)):
        body = v2_body(images=[{"cam_high": _png(width, height)}])
        assert http.post("/infer", json=body).status_code == 200


def test_body_is_parsed_off_the_event_loop(live, monkeypatch):
    # regression: json.loads + validation of a 32 MB body ran on the event loop thread and
    # stalled every other request (health probes included) for ~0.5 s
    from flagscale.serve import wire as app_module

    threads = []
    real = app_module.parse_request

    def spy(body, *args):
        threads.append(threading.current_thread())
        return real(body, *args)

    monkeypatch.setattr(app_module, "parse_request", spy)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.post("/infer", json=v2_body()).status_code == 200
    assert threads and threads[0] is not live.thread
