"""benchmarks/bench_openpi.py against the shared live server (no timing asserted)."""

import sys

from serve_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_openpi  # noqa: E402


def test_openpi_benchmark_round_trips(live):
    port = int(live.url.rsplit(":", 1)[1])
    result = bench_openpi.run("127.0.0.1", port, requests=3, size=(48, 64), timeout=60)
    assert result["requests"] == 3 and result["image_size"] == [48, 64]
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["model_ms"] > 0 and result["total_ms"] >= result["model_ms"]
    assert result["payload_kb"] > 3 * 48 * 64 * 3 / 1024  # the frames travel raw
