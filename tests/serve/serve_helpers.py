"""Helpers for server tests: a real uvicorn server on a loopback port, request bodies."""

import io
import socket
import threading
import time

from pathlib import Path

import numpy as np
import torch
import uvicorn

from PIL import Image

from flagscale.serve.codec import encode_image
from flagscale.serve.config import load_serve_config
from flagscale.serve.protocol import uvicorn_config

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "examples" / "pi0" / "client_pi0.py"
SAMPLE_IMAGES = [REPO / "examples" / "pi0" / f"orbbec_{i}_latest.jpg" for i in range(3)]
TEST_ENGINE = {
    "random_init": True,
    "device": "cpu",
    "torch_dtype": "float32",
    "preset": "tiny",
    "warmup": False,
    "max_body_mb": 1,
    "max_image_side": 1024,
    "max_batch_size": 4,
    "max_wait_ms": 5,
}


def serve_cfg(**engine):
    return load_serve_config({"engine": {**TEST_ENGINE, **engine}}, env={})


class PolicyWrapper:
    """A test's stand-in for `policy`: the policy in everything a subclass does not override."""

    def __init__(self, policy):
        self.policy = policy

    def __getattr__(self, name):
        return getattr(self.policy, name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on a socket bound to 127.0.0.1:0 (no port race)."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn_config(app, app.state.cfg, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn thread died"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.app.state.worker.wait_ready(timeout), self.app.state.worker.error

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def small_image(seed: int = 0, size=(48, 64)) -> str:
    rng = np.random.default_rng(seed)
    return encode_image(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def sample_b64(index: int) -> str:
    import base64

    return base64.b64encode(SAMPLE_IMAGES[index].read_bytes()).decode("utf-8")


def v2_body(image_seed: int = 0, **extra) -> dict:
    """A v2-style body (one base camera); extra keys are added or replace defaults."""
    body = {
        "instruction": "pick up the cube",
        "state": [[0.1 * i for i in range(14)]],
        "images": [{"observation.images.base_0_rgb": small_image(image_seed)}],
    }
    body.update(extra)
    return body


class PilDecodeJpeg:
    """Stands in for torchvision's decode_jpeg(list of uint8 tensors, device) -> [3, H, W]: Pillow's
    pixels, so results can be compared exactly; records each batch."""

    def __init__(self, fail=False):
        self.batches, self.fail = [], fail

    def __call__(self, data, device):
        self.batches.append(len(data))
        if self.fail:
            raise RuntimeError("nvjpeg: bitstream corrupt")
        out = []
        for t in data:
            rgb = np.array(Image.open(io.BytesIO(t.numpy().tobytes())).convert("RGB"))
            out.append(torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(device))
        return out


def damaged_jpeg(index: int = 0) -> bytes:
    """A sample JPEG with bytes of its entropy-coded data changed; length and markers intact."""
    raw = bytearray(SAMPLE_IMAGES[index].read_bytes())
    for i in range(2000, len(raw) - 2, 97):
        raw[i] ^= 0x5A
    return bytes(raw)
