"""Each transport answers with the policy's own actions for the inputs it was sent.

HTTP v1 (FlagScale's client body), HTTP v2 and the openpi websocket against `policy.infer` on the
same decoded observation and the same noise (the server's `engine.seed`). The state, each camera and
the prompt are varied one at a time, so a transport that zeroes the state, transposes a CHW frame,
swaps or drops a camera or ignores the prompt gives other actions and fails."""

import base64
import io

import httpx
import msgpack
import numpy as np
import pytest

from PIL import Image
from serve_helpers import SAMPLE_IMAGES, LiveServer, serve_cfg

from flagscale.serve import msgpack_codec
from flagscale.serve.app import create_app

SEED, STEPS = 7, 2
CAMERAS = {"cam_high": "base_0_rgb", "cam_left_wrist": "left_wrist_0_rgb",
           "cam_right_wrist": "right_wrist_0_rgb"}  # fmt: skip
# float32 actions from the same model call (batch of one): equal up to float32 rounding
ATOL = 1e-5
websockets_sync = pytest.importorskip("websockets.sync.client")


def jpeg(index: int, flip: bool = False) -> bytes:
    if not flip:
        return SAMPLE_IMAGES[index].read_bytes()
    out = io.BytesIO()
    Image.open(SAMPLE_IMAGES[index]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, "JPEG")
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def variants() -> dict:
    """name -> (jpegs per camera, state, prompt): the base and one change at a time."""
    rng = np.random.default_rng(0)
    state = rng.uniform(-1, 1, 14).astype(np.float32)
    base = ({cam: jpeg(i) for i, cam in enumerate(CAMERAS)}, state, "pick up the cube")
    out = {"base": base}
    out["state"] = (base[0], state[::-1].copy(), base[2])
    for i, cam in enumerate(CAMERAS):
        out[cam] = ({**base[0], cam: jpeg(i, flip=True)}, state, base[2])
    out["prompt"] = (base[0], state, "put the bowl on the plate")
    return out


@pytest.fixture(scope="module")
def expected(policy):
    """policy.infer on the decoded observation, the server's noise (seed), cut to [50, 14]."""
    out = {}
    for name, (images, state, prompt) in variants().items():
        obs = {
            "images": {CAMERAS[c]: pixels(data) for c, data in images.items()},
            "state": state,
            "prompt": prompt,
        }
        out[name] = policy.infer(obs, num_steps=STEPS, seed=SEED)["actions"][:50, :14]
    base = out["base"]
    for name, actions in out.items():  # every variant matters to the model
        assert name == "base" or np.abs(actions - base).max() > 1e-3, name
    return out


@pytest.fixture(scope="module")
def seeded(policy):
    with LiveServer(
        create_app(policy, serve_cfg(seed=SEED, num_steps=STEPS, max_body_mb=8))
    ) as server:
        server.wait_ready()
        yield server


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1_body(images, state, prompt) -> dict:
    """FlagScale v1's client body: the state goes in eef_pose; qpos and state are ignored."""
    return {
        "instruction": prompt,
        "qpos": [[0.0] * 14],
        "eef_pose": [state.tolist()],
        "state": [[9.0] * 14],
        "images": [{cam: b64(data) for cam, data in images.items()}],
        "image_masks": [{slot: True for slot in CAMERAS.values()}],
        "num_steps": STEPS,
    }


def v2_body(images, state, prompt) -> dict:
    return {
        "instruction": prompt,
        "state": [state.tolist()],
        "images": [{f"observation.images.{CAMERAS[c]}": b64(d) for c, d in images.items()}],
    }


@pytest.mark.parametrize("make_body", [v1_body, v2_body])
def test_http_actions_equal_the_policys(seeded, expected, make_body):
    with httpx.Client(base_url=seeded.url, timeout=60) as http:
        for name, inputs in variants().items():
            reply = http.post("/infer", json=make_body(*inputs))
            assert reply.status_code == 200, reply.text
            got = np.asarray(reply.json()["actions"], np.float32)
            assert got.shape == (1, 50, 14)
            np.testing.assert_allclose(got[0], expected[name], rtol=0, atol=ATOL, err_msg=name)


def test_openpi_websocket_actions_equal_the_policys(seeded, expected):
    """aloha-style observation with CHW uint8 frames, as openpi's aloha clients send them."""
    url = seeded.url.replace("http://", "ws://")
    with websockets_sync.connect(url, compression=None, max_size=None) as ws:
        msgpack.unpackb(ws.recv())  # metadata
        for name, (images, state, prompt) in variants().items():
            obs = {
                "images": {c: pixels(d).transpose(2, 0, 1).copy() for c, d in images.items()},
                "state": state,
                "prompt": prompt,
            }
            ws.send(msgpack_codec.packb(obs))
            frame = ws.recv()
            assert isinstance(frame, bytes), frame  # a text frame is an error
            reply = msgpack_codec.unpackb(frame, 1 << 30)
            got = reply["actions"]
            assert got.shape == (50, 14) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected[name], rtol=0, atol=ATOL, err_msg=name)
