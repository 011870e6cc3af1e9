"""Soak: a long mix of valid and malformed /infer requests against a running Pi0 server (loopback
only), to show that it stays up, answers every bad request with a JSON 4xx and does not leak.

    python run.py --config-path ./examples/pi0/conf --config-name serve_demo action=run
    python benchmarks/bench_soak.py --port 9010 --seconds 60 --clients 4 --bad-fraction 0.3 \
        --server-pid "$(cat outputs/pi0_demo/serve_logs/pids/host_0_localhost.pid)" --json soak.json

Each client thread holds one keep-alive HTTP/1.1 connection (reopened after an error or a
`Connection: close`) and loops until --seconds are over: with probability --bad-fraction it sends
a malformed request, else the FlagScale v1 body of bench_http.py (three 640x480 sample JPEGs).
Malformed kinds are taken in turn (each client starts at a different one), so every kind is sent
once a dozen bad requests went out: invalid JSON, a non-object body, corrupt base64, a JPEG cut in
half, a wrong state dimension, NaN in the state, an unknown camera, num_steps 0 and max + 1, a body
2 MB over engine.max_body_mb, a form-encoded body, GET /infer. (The server does not look at
Content-Type: valid JSON under text/plain is served, so the wrong-content-type case sends a form.)
Then the hostile kinds, sized from /info's limits (hostile_requests): a prompt over
max_prompt_chars, a state beyond float32, lossless WebPs over max_request_pixels, a body with more
values than max_json_values, headers over max_header_kb. With --attacks (the default) one more
thread adds raw-socket attacks as background noise (Attacker): --slow-connections connections
stuck in their headers, requests abandoned once sent, Expect: 100-continue over max_body_mb, a
good request pipelined with garbage; their outcomes are judged too (kinds attack_*).

Expected: good -> 200 with actions (503 "queue full" is accepted, counted apart); bad -> 4xx with
a JSON body {"success": false, "error": "..."}. Anything else (wrong status, 5xx, a non-JSON
error body, a connection error or timeout) is unexpected and listed with examples.

Every --interval seconds GET /health, /metrics and /info are polled and the server's RSS
(of --server-pid, and of it plus its descendants), the CUDA-graph counters
of /info (`cuda_graphs`: graphs, captures, replays, eager calls; null without graphs) and the p50
of the good requests finished in that window are recorded. The report gives requests by kind and
status, unexpected outcomes, good latency p50/p99 and first vs last window p50, RSS start / end /
max, graph counters at start and end, and /health at the end. Exit code 0 only if nothing
unexpected happened and the server is healthy at the end.
"""

import argparse
import collections
import http.client
import ipaddress
import json
import math
import os
import random
import select
import socket
import sys
import threading
import time

import numpy as np
import psutil

from bench_http import body, sample_images

JSON_TYPE = {"Content-Type": "application/json"}
MB = 1024 * 1024
MAX_EXAMPLES = 3  # per (kind, problem)


class Client:
    """One persistent connection; send() returns (status, body bytes) or raises on I/O errors.
    (bench_http.KeepAlive only POSTs JSON and raises on any status but 200: here every status and
    body is judged.)"""

    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout, self.conn = host, port, timeout, None

    def send(self, method, path, payload=None, headers=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, payload, headers or {})
            resp = self.conn.getresponse()
            data = resp.read()
        except Exception:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, data

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------- requests


def good_request(steps, state_dim):
    return ("POST", "/infer", body(0, steps, state_dim), JSON_TYPE)


def post(doc):
    return ("POST", "/infer", json.dumps(doc).encode(), JSON_TYPE)


def changed(good, **fields):
    doc = dict(good)
    doc.update(fields)
    return doc


def bad_requests(info, steps):
    """kind -> (method, path, payload, headers), built once from the server's /info."""
    dim = info["state_dim"]
    good = json.loads(body(0, steps, dim))
    images = sample_images()
    cam = next(iter(images))
    text = images[cam]
    half = text[: len(text) // 8 * 4]  # whole base64 quanta: valid base64, half a JPEG
    nan_state = json.dumps(good).replace('"eef_pose": [[0.0', '"eef_pose": [[NaN', 1)
    assert "NaN" in nan_state, "body() changed: no eef_pose to put NaN into"
    cap = int(info["limits"]["max_body_mb"] * MB)
    return {
        "invalid_json": ("POST", "/infer", b'{"images": [{"cam_high": "', JSON_TYPE),
        "non_object": ("POST", "/infer", b"[1, 2, 3]", JSON_TYPE),
        "corrupt_base64": post(changed(good, images=[{cam: text[:1000] + "!!" + text[1000:]}])),
        "half_jpeg": post(changed(good, images=[{cam: half}])),
        "state_dim": post(changed(good, eef_pose=[[0.0] * (dim + 3)])),
        "nan_state": ("POST", "/infer", nan_state.encode(), JSON_TYPE),
        "unknown_camera": post(changed(good, images=[{"cam_nowhere": text}])),
        "steps_zero": post(changed(good, num_steps=0)),
        "steps_too_many": post(changed(good, num_steps=info["num_steps"]["max"] + 1)),
        "oversize": post(changed(good, padding="x" * (cap + 2 * MB))),
        "form_body": form_request(),
        "get_infer": ("GET", "/infer", None, {}),
        **hostile_requests(info, good),
    }


def hostile_requests(info, good):
    """Attacks that fit one HTTP request (issue 19), sized from the server's limits: a prompt
    over max_prompt_chars, a state beyond float32, lossless WebPs with more pixels than
    max_request_pixels, a body with more values than max_json_values, headers over
    max_header_kb. A kind the limits leave no room for (e.g. its body would be over
    max_body_mb) is left out."""
    limits = info["limits"]
    big_prompt = "x" * (limits["max_prompt_chars"] + 1)
    kinds = {
        "big_prompt": post(changed(good, instruction=big_prompt)),
        "float32_overflow": post(changed(good, eef_pose=[[1e39] * info["state_dim"]])),
        "big_header": ("GET", "/info", None, {"X-Pad": "a" * int(limits["max_header_kb"] * 1024)}),
    }
    side = math.ceil(math.sqrt(limits["max_request_pixels"] / 2))
    if side <= limits["max_image_side"]:  # three such images are over the budget
        bomb = lossless_webp(side)
        kinds["pixel_bomb"] = post(changed(good, images=[dict.fromkeys(sample_images(), bomb)]))
    count = max(limits["max_json_values"] + 1, (1 << 20) // 3 + 1)  # counted above 1 MB
    values = json.dumps(good)[:-1] + ', "padding": [' + "[]," * count + "[]]}"
    if len(values) <= limits["max_body_mb"] * MB:
        kinds["many_values"] = ("POST", "/infer", values.encode(), JSON_TYPE)
    return kinds


def lossless_webp(side):
    """base64 of a side x side lossless WebP of one colour: a few hundred bytes."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 90)).save(buf, format="WEBP", lossless=True)
    return base64.b64encode(buf.getvalue()).decode()


def form_request():
    """What requests.post(url, data={...}) sends: a form, not JSON."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return ("POST", "/infer", b"instruction=pick+up+the+cube&num_steps=10", headers)


# ---------------------------------------------------------------- outcomes


def json_body(data):
    try:
        return json.loads(data)
    except ValueError:
        return None


def judge_good(status, data):
    """None if fine, "busy" for a 503 with a JSON error, else what was wrong."""
    doc = json_body(data)
    if status == 200:
        ok = isinstance(doc, dict) and doc.get("success") is True and doc.get("actions")
        return None if ok else "200 without actions"
    if status == 503 and is_error_doc(doc):
        return "busy"
    return f"status {status}" if doc is not None else f"status {status}, non-JSON body"


def judge_bad(status, data):
    doc = json_body(data)
    if not 400 <= status < 500:
        return f"status {status}"
    return None if is_error_doc(doc) else "4xx without a JSON error message"


def is_error_doc(doc):
    return (
        isinstance(doc, dict)
        and doc.get("success") is False
        and isinstance(doc.get("error"), str)
        and doc["error"] != ""
    )


# ---------------------------------------------------------------- clients


class Soak:
    """Shared state: records (kind, status, ms, t_done, problem) appended by the client threads."""

    def __init__(self, args, info):
        self.args = args
        self.good = good_request(args.steps, info["state_dim"])
        self.bad = bad_requests(info, args.steps)
        self.records = []
        self.examples = collections.defaultdict(list)
        self.lock = threading.Lock()

    def client(self, index, deadline):
        rng = random.Random(self.args.seed + index)
        kinds = list(self.bad)
        turn = index * len(kinds) // max(self.args.clients, 1)
        conn = Client(self.args.host, self.args.port, self.args.timeout)
        while time.monotonic() < deadline:
            if rng.random() < self.args.bad_fraction:
                kind, turn = kinds[turn % len(kinds)], turn + 1
                self.one(conn, kind, self.bad[kind], judge_bad)
            else:
                self.one(conn, "good", self.good, judge_good)
        conn.close()

    def one(self, conn, kind, request, judge):
        start = time.perf_counter()
        try:
            status, data = conn.send(*request)
            problem = judge(status, data)
        except Exception as exc:  # counted as unexpected, with the exception as its example
            problem = "timeout" if isinstance(exc, TimeoutError) else "connection error"
            status, data = "conn-error", repr(exc).encode()
        done = time.perf_counter()
        self.records.append((kind, status, (done - start) * 1e3, done, problem))
        if problem not in (None, "busy"):
            self.example(kind, problem, status, data)

    def example(self, kind, problem, status, data):
        with self.lock:
            seen = self.examples[(kind, problem)]
            if len(seen) < MAX_EXAMPLES:
                seen.append({"status": status, "body": data[:300].decode("utf-8", "replace")})


class Attacker:
    """Background noise on raw sockets (issue 19), one attack every --attack-pause seconds:
    slow connections that never finish their headers (--slow-connections of them held open and
    reopened when the server closes them: a 408, or a silent close or a 503 from the connection
    cap, is expected), requests abandoned right after sending (the server must drop them, no
    reply to judge), Expect: 100-continue with a Content-Length over max_body_mb (413 without
    "100 Continue"), and a good request pipelined with garbage (its reply, then a 400)."""

    SLOW_HEAD = b"POST /infer HTTP/1.1\r\nHost: soak\r\nContent-Le"

    def __init__(self, soak, info):
        self.soak, self.args = soak, soak.args
        method, path, payload, headers = soak.good
        self.good = raw_request(method, path, payload, headers)
        self.too_long = int(info["limits"]["max_body_mb"] * MB) * 2
        self.slow = []

    def run(self, deadline):
        attacks = [self.abandon, self.expect_continue, self.pipelined_garbage]
        turn = 0
        while time.monotonic() < deadline:
            self.hold_slow()
            attack = attacks[turn % len(attacks)]
            turn += 1
            self.attack(attack.__name__, attack)
            time.sleep(self.args.attack_pause)
        for sock in self.slow:
            sock.close()

    def attack(self, name, fn):
        start = time.perf_counter()
        try:
            status, problem = fn()
        except Exception as exc:  # counted as unexpected, with the exception as its example
            status, problem = "conn-error", f"connection error: {exc!r}"
        done = time.perf_counter()
        self.soak.records.append((f"attack_{name}", status, (done - start) * 1e3, done, problem))
        if problem is not None:
            self.soak.example(f"attack_{name}", problem, status, str(problem).encode())

    def connect(self):
        return socket.create_connection((self.args.host, self.args.port), timeout=self.args.timeout)

    def exchange(self, data):
        with self.connect() as sock:
            sock.sendall(data)
            return read_all(sock)

    def abandon(self):
        with self.connect() as sock:
            sock.sendall(self.good)
        return "sent", None

    def expect_continue(self):
        head = "POST /infer HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {self.too_long}\r\nExpect: 100-continue\r\n\r\n"
        reply = self.exchange(head.encode())
        ok = reply.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in reply
        return status_of(reply), None if ok else f"expected 413 without 100: {reply[:60]!r}"

    def pipelined_garbage(self):
        reply = self.exchange(self.good + b"\x00\x01 GARBAGE \xff\r\n\r\n")
        first = reply.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 "))  # 503: queue full
        ok = first and b"HTTP/1.1 400 " in reply
        return status_of(reply), None if ok else f"expected a reply then 400: {reply[:60]!r}"

    def hold_slow(self):
        readable = select.select(self.slow, [], [], 0)[0] if self.slow else []
        for sock in readable:
            self.slow.remove(sock)
            self.attack("slow_headers", lambda: self.closed_slow(sock))
        while len(self.slow) < self.args.slow_connections:
            sock = self.connect()
            sock.sendall(self.SLOW_HEAD)
            self.slow.append(sock)

    @staticmethod
    def closed_slow(sock):
        with sock:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
        ok = data == b"" or data.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 503 "))
        return status_of(data) or "closed", None if ok else f"closed with {data[:60]!r}"


def raw_request(method, path, payload, headers):
    lines = [f"{method} {path} HTTP/1.1", "Host: soak", f"Content-Length: {len(payload or b'')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (payload or b"")


def read_all(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def status_of(reply):
    parts = reply.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) > 2 else None


# ---------------------------------------------------------------- server sampling


def process_stats(pid):
    """(RSS MB of the process, RSS MB of it plus its descendants, its user + system CPU seconds);
    Nones when there is no pid or the process is gone."""
    try:
        proc = psutil.Process(pid)
        rss, cpu = proc.memory_info().rss, proc.cpu_times()
        children = proc.children(recursive=True)
    except (psutil.Error, TypeError):  # TypeError: no pid given
        return None, None, None
    tree = rss
    for child in children:
        try:
            tree += child.memory_info().rss
        except psutil.Error:  # it exited meanwhile
            pass
    return mb(rss), mb(tree), round(cpu.user + cpu.system, 2)


def get_json(conn, path):
    try:
        status, data = conn.send("GET", path)
    except Exception as exc:
        return None, {"error": repr(exc)}
    return status, json_body(data)


def metrics_summary(conn):
    """/metrics status, the server's count of /infer answers and its queue depth."""
    try:
        status, data = conn.send("GET", "/metrics")
    except Exception as exc:
        return {"status": None, "error": repr(exc)}
    infer, depth = 0.0, None
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith('pi0_requests_total{endpoint="/infer"'):
            infer += float(line.split()[-1])
        elif line.startswith("pi0_queue_depth "):
            depth = float(line.split()[-1])
    return {"status": status, "infer_answered": infer, "queue_depth": depth}


def sample(args):
    """One poll on a fresh connection (the server closes idle keep-alive ones after ~5 s)."""
    conn = Client(args.host, args.port, args.timeout)
    health_status, health = get_json(conn, "/health")
    info_status, info = get_json(conn, "/info")
    metrics = metrics_summary(conn)
    conn.close()
    rss, tree_rss, cpu = process_stats(args.server_pid)
    return {
        "t": time.monotonic(),
        "health_code": health_status,
        "health": (health or {}).get("status") or (health or {}).get("error"),
        "graphs": (info or {}).get("cuda_graphs") if info_status == 200 else "no /info",
        "metrics": metrics,
        "rss_mb": rss,
        "tree_rss_mb": tree_rss,
        "server_cpu_s": cpu,
        "load_1m": round(os.getloadavg()[0], 2),
    }


def mb(nbytes):
    return round(nbytes / MB, 1)


def monitor(soak, samples, stop):
    while not stop.wait(soak.args.interval):
        last = samples[-1]["t"]
        s = sample(soak.args)
        s["good_p50_ms"] = window_p50(soak.records, last, s["t"])
        s["requests"] = len(soak.records)
        samples.append(s)
        print(progress(s, samples[0]["t"]), flush=True)


def window_p50(records, start, end):
    lat = [r[2] for r in records if r[0] == "good" and r[1] == 200 and start < r[3] <= end]
    return round(float(np.percentile(lat, 50)), 1) if lat else None


def progress(s, t0):
    return (
        f"[{s['t'] - t0:6.1f} s] requests {s['requests']}  good p50 {s['good_p50_ms']} ms  "
        f"rss {s['rss_mb']} MB (tree {s['tree_rss_mb']})  health {s['health_code']} "
        f"{s['health']}  graphs {graph_count(s['graphs'])}  server cpu {s['server_cpu_s']} s  "
        f"load {s['load_1m']}"
    )


def graph_count(graphs):
    if not isinstance(graphs, dict):
        return graphs
    return {k: graphs.get(k) for k in ("graphs", "captures", "replays", "eager_calls")}


# ---------------------------------------------------------------- run and report


def run(args, info):
    soak = Soak(args, info)
    samples = [sample(args)]
    samples[0].update(good_p50_ms=None, requests=0)
    stop = threading.Event()
    mon = threading.Thread(target=monitor, args=(soak, samples, stop))
    mon.start()
    deadline = time.monotonic() + args.seconds
    threads = [
        threading.Thread(target=soak.client, args=(i, deadline)) for i in range(args.clients)
    ]
    if args.attacks:
        threads.append(threading.Thread(target=Attacker(soak, info).run, args=(deadline,)))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    mon.join()
    final = sample(args)
    final.update(good_p50_ms=window_p50(soak.records, samples[-1]["t"], final["t"]))
    final["requests"] = len(soak.records)
    samples.append(final)
    return report(soak, samples, info)


def by_kind(records):
    table = collections.defaultdict(collections.Counter)
    for kind, status, *_ in records:
        table[kind][str(status)] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(table.items())}


def unexpected(soak):
    counts = collections.Counter((r[0], r[4]) for r in soak.records if r[4] not in (None, "busy"))
    return [
        {"kind": k, "problem": p, "count": n, "examples": soak.examples[(k, p)]}
        for (k, p), n in sorted(counts.items())
    ]


def latency(records):
    lat = [r[2] for r in records if r[0] == "good" and r[1] == 200]
    if not lat:
        return {"good_ok": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    p50, p99 = np.percentile(lat, [50, 99])
    return {
        "good_ok": len(lat),
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
        "max_ms": round(max(lat), 1),
    }


def windows(samples):
    values = [s["good_p50_ms"] for s in samples[1:] if s["good_p50_ms"] is not None]
    return {
        "first_window_p50_ms": values[0] if values else None,
        "last_window_p50_ms": values[-1] if values else None,
        "window_p50s_ms": values,
    }


def memory(samples, key):
    """RSS at start (before any traffic), after the first window (allocator warmed), end, max."""
    values = [s[key] for s in samples if s[key] is not None]
    if not values:
        return None
    warm = values[1] if len(values) > 2 else values[0]
    return {
        "start_mb": values[0],
        "first_window_mb": warm,
        "end_mb": values[-1],
        "max_mb": max(values),
        "growth_mb": round(values[-1] - values[0], 1),
        "growth_after_first_window_mb": round(values[-1] - warm, 1),
    }


def report(soak, samples, info):
    records, final = soak.records, samples[-1]
    healthy = final["health_code"] == 200 and final["health"] == "healthy"
    bad = [r for r in records if r[0] != "good"]
    result = {
        "seconds": soak.args.seconds,
        "clients": soak.args.clients,
        "bad_fraction": soak.args.bad_fraction,
        "device": info.get("device"),
        "requests": len(records),
        "good": sum(r[0] == "good" for r in records),
        "bad": len(bad),
        "busy_503": sum(r[4] == "busy" for r in records),
        "by_kind": by_kind(records),
        "bad_kinds_all_4xx": all(r[4] is None for r in bad),
        "unexpected": unexpected(soak),
        "latency": latency(records),
        "drift": {**windows(samples), "window_s": soak.args.interval},
        "rss": memory(samples, "rss_mb"),
        "tree_rss": memory(samples, "tree_rss_mb"),
        "graphs_start": graph_count(samples[0]["graphs"]),
        "graphs_end": graph_count(final["graphs"]),
        "healthy_at_end": healthy,
        "final_health": {"code": final["health_code"], "status": final["health"]},
        "samples": samples,
    }
    result["passed"] = healthy and not result["unexpected"]
    return result


def print_report(r):
    print(f"\n{r['requests']} requests in {r['seconds']} s, {r['clients']} clients:", end=" ")
    print(f"{r['good']} good, {r['bad']} bad, {r['busy_503']} good answered 503 (busy)")
    for kind, codes in r["by_kind"].items():
        print(f"  {kind:16s} {codes}")
    lat, drift = r["latency"], r["drift"]
    print(
        f"good latency: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
        f"({lat['good_ok']} ok)"
    )
    print(
        f"drift: first window p50 {drift['first_window_p50_ms']} ms, last window "
        f"{drift['last_window_p50_ms']} ms (windows of {drift['window_s']} s)"
    )
    for name in ("rss", "tree_rss"):
        print(f"{name}: {r[name]}")
    print(f"graphs: start {r['graphs_start']}, end {r['graphs_end']}")
    print(f"unexpected: {len(r['unexpected'])} kinds of problem")
    for u in r["unexpected"]:
        print(f"  {u['kind']}: {u['problem']} x{u['count']}, e.g. {u['examples'][:1]}")
    print(f"healthy at end: {r['healthy_at_end']} {r['final_health']}")
    print("PASS" if r["passed"] else "FAIL")


def server_info(args):
    conn = Client(args.host, args.port, args.timeout)
    status, info = get_json(conn, "/info")
    conn.close()
    if status != 200 or not isinstance(info, dict) or not info.get("model_loaded"):
        raise SystemExit(f"GET /info: {status} {info}; is the server up and ready?")
    return info


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9010)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--bad-fraction", type=float, default=0.3)
    p.add_argument("--server-pid", type=int, default=None, help="sample this process's RSS")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--steps", type=int, default=10, help="num_steps of the good requests")
    p.add_argument("--timeout", type=float, default=60.0, help="per request")
    p.add_argument("--seed", type=int, default=0, help="good/bad choice per client")
    p.add_argument(
        "--attacks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="raw-socket attacks in the background (see Attacker)",
    )
    p.add_argument("--slow-connections", type=int, default=20, help="held by the attacker")
    p.add_argument("--attack-pause", type=float, default=0.2, help="seconds between attacks")
    args = p.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        raise SystemExit("bench_soak.py only targets loopback addresses")
    return args


def main(argv=None):
    args = parse_args(argv)
    info = server_info(args)
    print(f"soak: {args.seconds} s, {args.clients} clients, bad fraction {args.bad_fraction}")
    print(f"server: device {info.get('device')}, limits {info.get('limits')}", flush=True)
    result = run(args, info)
    result["info"] = info
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
