"""benchmarks/bench_soak.py end to end: a short soak (2 clients, 8 s) in another process against a
real uvicorn server with the tiny random policy; every malformed kind gets a JSON 4xx, the good
requests get actions and the server is still healthy at the end."""

import dataclasses
import json
import os
import subprocess
import sys

import httpx
import pytest

from serve_helpers import REPO, LiveServer, serve_cfg

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_soak  # noqa: E402

from flagscale.serve.app import create_app  # noqa: E402

SCRIPT = REPO / "benchmarks" / "bench_soak.py"
BAD_KINDS = {
    "invalid_json",
    "non_object",
    "corrupt_base64",
    "half_jpeg",
    "state_dim",
    "nan_state",
    "unknown_camera",
    "steps_zero",
    "steps_too_many",
    "oversize",
    "form_body",
    "get_infer",
    "big_prompt",
    "float32_overflow",
    "big_header",
    "pixel_bomb",
    "many_values",
}
ATTACKS = {"attack_abandon", "attack_expect_continue", "attack_pipelined_garbage"}


@pytest.fixture(scope="module")
def server(policy):
    # small limits, so that every attack kind fits in the test's 8 s and its 4 MB bodies
    cfg = serve_cfg(max_wait_ms=0, access_log=False, header_timeout_s=1, max_body_mb=4)
    cfg = dataclasses.replace(cfg, max_request_pixels=1_000_000, max_json_values=1000)
    app = create_app(policy, cfg)
    with LiveServer(app) as live:
        live.wait_ready()
        yield live


def soak(server, tmp_path) -> tuple:
    out = tmp_path / "soak.json"
    port = server.url.rsplit(":", 1)[1]
    argv = [sys.executable, str(SCRIPT), "--port", port, "--seconds", "8", "--clients", "2"]
    argv += ["--bad-fraction", "0.4", "--interval", "2", "--json", str(out)]
    argv += ["--server-pid", str(os.getpid())]  # the server runs in this process
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    return proc, json.loads(out.read_text())


def test_soak_finds_nothing_unexpected(server, tmp_path):
    proc, result = soak(server, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["passed"] and result["unexpected"] == []
    assert result["good"] > 0 and result["bad"] > 0
    kinds = result["by_kind"]
    assert set(kinds) - {"attack_slow_headers"} == BAD_KINDS | ATTACKS | {"good"}
    assert kinds["attack_slow_headers"].get("408", 0) > 0  # slow connections timed out
    assert kinds["big_header"] == {"431": kinds["big_header"]["431"]}
    for kind in BAD_KINDS:
        assert all(400 <= int(code) < 500 for code in kinds[kind]), (kind, kinds[kind])
    assert kinds["oversize"] == {"413": kinds["oversize"]["413"]}
    assert kinds["get_infer"] == {"405": kinds["get_infer"]["405"]}
    assert result["bad_kinds_all_4xx"] and result["latency"]["p50_ms"] > 0
    assert result["healthy_at_end"] and result["final_health"]["code"] == 200
    assert result["rss"]["start_mb"] > 0 and result["graphs_end"] is None  # CPU: no CUDA graphs
    assert len(result["samples"]) >= 4  # start, every 2 s, end
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_judges_flag_what_the_soak_must_catch():
    error = json.dumps({"success": False, "error": "num_steps: must be in 1..100"}).encode()
    assert bench_soak.judge_bad(400, error) is None
    assert bench_soak.judge_bad(500, error) == "status 500"
    assert bench_soak.judge_bad(200, b'{"success": true}') == "status 200"
    assert bench_soak.judge_bad(400, b"<html>Bad Request</html>") is not None
    assert bench_soak.judge_bad(422, b'{"success": false, "error": ""}') is not None
    assert bench_soak.judge_good(200, b'{"success": true, "actions": [[[0.1]]]}') is None
    assert bench_soak.judge_good(200, b'{"success": true}') == "200 without actions"
    assert bench_soak.judge_good(503, error) == "busy"
    assert bench_soak.judge_good(502, b"Bad Gateway") == "status 502, non-JSON body"
