"""What the server adds around the model, without a GPU: the real app and uvicorn (loopback) around
a stand-in policy whose model call sleeps a fixed time; `bench_http.py --keep-alive` (a separate
process) sends the FlagScale v1 body with the three 640x480 sample JPEGs.

    python benchmarks/bench_http_overhead.py [--model-ms 16] [--clients 1 4 8] [--requests 200]

Round trip - sleep = HTTP, JSON, base64 and JPEG decoding, the hand-offs to and from the inference
thread, the response and the client (the issue's HTTP target: round trip <= model + 5 ms). Not
included: the policy's own preprocessing (stacking, upload and resize of the frames, prompt and
state: ~1 ms on the GPU hosts). The access log is written (to /dev/null) as in a deployment.
`--decoder deferred` serves as `engine.image_decoder: gpu` does, with the GPU decode replaced by
blank frames (it costs ~0.3 ms on an H100 or H200): what the server adds besides decoding.
"""

import argparse
import dataclasses
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

from pathlib import Path

import numpy as np
import torch
import uvicorn

from PIL import Image

from flagscale.models.pi0 import PI0Policy
from flagscale.serve import app as app_module, engine as engine_module
from flagscale.serve.codec import GpuJpegDecoder
from flagscale.serve.config import load_serve_config
from flagscale.serve.protocol import uvicorn_config


class SleepingPolicy:
    """The tiny random policy's metadata and post-processing; the model call is a sleep."""

    def __init__(self, seconds: float):
        self.policy, self.seconds = PI0Policy.random("tiny", device="cpu"), seconds

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def infer_batch(self, observations, num_steps=None, noise=None, seeds=None):
        time.sleep(self.seconds)
        c = self.policy.config
        zeros = np.zeros((c.chunk_size, c.max_action_dim), np.float32)
        return [{"actions": self.policy.postprocess(zeros), "timing": {}} for _ in observations]


def blank_frames(data, device):
    """Stands in for nvJPEG: uint8 [3, H, W] of each JPEG's size (from its header), unfilled (the
    stand-in policy never reads them; a CPU fill would start torch's spinning OpenMP threads)."""
    sizes = [Image.open(io.BytesIO(t.numpy().tobytes())).size for t in data]
    return [torch.empty((3, h, w), dtype=torch.uint8) for w, h in sizes]


def serve_and_measure(model_ms: float, clients: list, requests: int, decoder="cpu") -> list:
    """Serve the sleeping policy on a loopback port; bench_http.py (another process, as a robot
    would be) runs the keep-alive clients. One result dict per client count."""
    engine = dict(random_init=True, device="cpu", torch_dtype="float32", preset="tiny")
    engine.update(warmup=False, max_wait_ms=0.0)
    cfg = load_serve_config({"engine": engine}, env={})
    if decoder == "deferred":  # image_decoder: gpu without a GPU (the config would refuse it)
        cfg = dataclasses.replace(cfg, image_decoder="gpu")
        engine_module.GpuJpegDecoder = lambda device: GpuJpegDecoder("cpu", blank_frames)
    try:  # the decoder is built once the policy is up (in the inference thread)
        app = app_module.create_app(SleepingPolicy(model_ms / 1e3), cfg)
        return _measure(app, clients, requests, model_ms)
    finally:
        engine_module.GpuJpegDecoder = GpuJpegDecoder


def _measure(app, clients: list, requests: int, model_ms: float) -> list:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn_config(app, app.state.cfg, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        if not app.state.worker.wait_ready(60):
            raise RuntimeError(f"the server did not get ready: {app.state.worker.error}")
        cmd = [sys.executable, str(Path(__file__).with_name("bench_http.py")), "--keep-alive"]
        cmd += ["--port", str(sock.getsockname()[1]), "--requests", str(requests), "--clients"]
        done = subprocess.run(cmd + [str(c) for c in clients], capture_output=True, text=True)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    if done.returncode != 0:
        raise RuntimeError(f"bench_http.py failed: {done.stderr[-2000:]}")
    levels = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for level in levels:
        level["model_ms (sleep)"] = model_ms
        level["overhead_p50_ms"] = round(level["p50_ms"] - model_ms, 2)
    return levels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-ms", type=float, default=16.0, help="the stand-in model call's sleep")
    p.add_argument("--clients", nargs="+", type=int, default=[1])
    p.add_argument("--requests", type=int, default=200, help="per client")
    p.add_argument("--decoder", default="cpu", choices=["cpu", "deferred"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    # the access log is formatted and written as deployed, but not onto this script's output
    quiet = logging.StreamHandler(open(os.devnull, "w"))
    quiet.setFormatter(logging.getLogger("flagscale").handlers[0].formatter)
    access = logging.getLogger("flagscale.serve.access")
    access.addHandler(quiet)
    access.propagate = False
    result = serve_and_measure(args.model_ms, args.clients, args.requests, args.decoder)
    for level in result:
        print(json.dumps(level))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
