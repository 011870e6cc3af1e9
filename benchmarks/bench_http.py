"""HTTP end-to-end latency and throughput against a running Pi0 server (loopback only).

    python benchmarks/bench_http.py --port 9010 --clients 1 4 8 --requests 50

Each client thread sends FlagScale v1 bodies with the three 640x480 sample JPEGs from examples/pi0/,
one request at a time, for a bounded number of requests (and at most --max-seconds): a new
connection per request (urllib, like examples/pi0/client_pi0.py), or with `--keep-alive` one
persistent HTTP/1.1 connection per client (http.client; what a robot loop would hold). Reports
round-trip p50/p90/p99, requests/s, errors, and the server's own timing split (means): queue,
preprocess (body, parsing, image decoding), model (the policy call: GPU preprocessing, the model,
the copy back) and total (in the handler).
"""

import argparse
import base64
import http.client
import ipaddress
import json
import threading
import time
import urllib.request

from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "examples" / "pi0"
CAMERAS = {
    "cam_high": "orbbec_0_latest.jpg",
    "cam_left_wrist": "orbbec_1_latest.jpg",
    "cam_right_wrist": "orbbec_2_latest.jpg",
}


def sample_images() -> dict:
    """camera -> base64 text of the three 640x480 sample JPEGs."""
    return {
        cam: base64.b64encode((SAMPLES / f).read_bytes()).decode() for cam, f in CAMERAS.items()
    }


def body(seed: int, steps: int, state_dim: int) -> bytes:
    images = sample_images()
    state = [[0.0] * state_dim]
    return json.dumps(
        {
            "images": [images],
            "instruction": "pick up the cube",
            "eef_pose": state,
            "qpos": state,
            "num_steps": steps,
            "seed": seed,
        }
    ).encode()


def post_urllib(url, payload, timeout):
    req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class KeepAlive:
    """One persistent connection (reopened after an error)."""

    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout, self.conn = host, port, timeout, None

    def __call__(self, url, payload, timeout):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request("POST", "/infer", payload, {"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            data = resp.read()
        except Exception:
            self.conn.close()
            self.conn = None
            raise
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data)


def client(url, payload, n, deadline, out, timeout, post=post_urllib):
    for _ in range(n):
        if time.monotonic() > deadline:
            return
        t = time.perf_counter()
        try:
            reply = post(url, payload, timeout)
            out.append(((time.perf_counter() - t) * 1e3, reply.get("timing", {}), None))
        except Exception as exc:  # counted, reported
            out.append(((time.perf_counter() - t) * 1e3, {}, repr(exc)))


def run_level(args, clients):
    url = f"http://{args.host}:{args.port}/infer"
    payload = body(0, args.steps, args.state_dim)
    posts = [
        KeepAlive(args.host, args.port, args.timeout) if args.keep_alive else post_urllib
        for _ in range(clients)
    ]
    for post in posts:  # warm-up (and the connections opened)
        client(url, payload, 2, time.monotonic() + 60, [], args.timeout, post)
    results, threads = [], []
    deadline = time.monotonic() + args.max_seconds
    start = time.perf_counter()
    for post in posts:
        th = threading.Thread(
            target=client, args=(url, payload, args.requests, deadline, results, args.timeout, post)
        )
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r[2] is None]
    lat = np.array([r[0] for r in ok]) if ok else np.array([np.nan])
    keys = ("queue_ms", "preprocess_ms", "model_ms", "total_ms")  # the server's own split (mean)
    split = {k: float(np.mean([r[1].get(k, np.nan) for r in ok])) for k in keys}
    return {
        "clients": clients,
        "keep_alive": args.keep_alive,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "req_per_s": len(ok) / wall,
        **split,
        "first_error": next((r[2] for r in results if r[2]), None),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9010)
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=50, help="per client")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--state-dim", type=int, default=14)
    p.add_argument("--max-seconds", type=float, default=120.0, help="per concurrency level")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--keep-alive", action="store_true", help="one persistent connection per client")
    args = p.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        raise SystemExit("bench_http.py only targets loopback addresses")
    for clients in args.clients:
        print(json.dumps(run_level(args, clients)), flush=True)


if __name__ == "__main__":
    main()
