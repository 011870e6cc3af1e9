"""openpi websocket round trips against a running Pi0 server (loopback only).

    python benchmarks/bench_openpi.py --port 9010 --requests 50 [--size 224 224 | --size 480 640]

One connection, as openpi's WebsocketClientPolicy holds it: the metadata frame, then one ALOHA-style
observation per request (three uint8 HWC camera frames of --size, a 14-dim state, a prompt;
msgpack-numpy, as openpi-client packs it), the next sent when the answer is in. openpi clients
resize to 224x224 before sending, so no JPEG is decoded and the frames are the model's size.
Reports round-trip p50/p90/p99 and the server's own timing (means).
"""

import argparse
import json
import time

import numpy as np

from flagscale.serve import msgpack_codec

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")


def observation(size, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {c: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for c in CAMERAS},
        "state": rng.standard_normal(14).astype(np.float32),
        "prompt": "pick up the cube",
    }


def run(host: str, port: int, requests: int, size, timeout: float) -> dict:
    from websockets.sync.client import connect

    payload = msgpack_codec.packb(observation(size))
    times, server = [], []
    url = f"ws://{host}:{port}/"  # no compression, no size limit: as openpi-client connects
    with connect(url, compression=None, max_size=None, open_timeout=timeout) as ws:
        msgpack_codec.unpackb(ws.recv(timeout), max_bytes=1 << 20)  # the metadata
        for i in range(requests + 2):  # two warm-up round trips
            start = time.perf_counter()
            ws.send(payload)
            reply = ws.recv(timeout)
            elapsed = (time.perf_counter() - start) * 1e3
            if isinstance(reply, str):
                raise RuntimeError(f"server error: {reply[:500]}")
            out = msgpack_codec.unpackb(reply, max_bytes=1 << 24)
            if i >= 2:
                times.append(elapsed)
                server.append(split(out))
    lat = np.array(times)
    return {
        "protocol": "openpi websocket",
        "image_size": list(size),
        "requests": len(times),
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "payload_kb": round(len(payload) / 1024, 1),
        **{k: float(np.mean([row[k] for row in server])) for k in server[0]},
    }


def split(reply: dict) -> dict:
    """The server's own timing of one reply: handler total, parsing, queue, the policy call."""
    policy, total = reply.get("policy_timing", {}), reply.get("server_timing", {})
    return {
        "total_ms": total.get("infer_ms", np.nan),
        "preprocess_ms": policy.get("preprocess_ms", np.nan),
        "queue_ms": policy.get("queue_ms", np.nan),
        "model_ms": policy.get("infer_ms", np.nan),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9010)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--size", nargs=2, type=int, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    print(json.dumps(run(args.host, args.port, args.requests, tuple(args.size), args.timeout)))


if __name__ == "__main__":
    main()
