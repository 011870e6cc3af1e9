"""benchmarks/bench_http_overhead.py end to end (no timing asserted): the real app and uvicorn
around the sleeping stand-in policy, bench_http.py's keep-alive clients in another process."""

import sys

import pytest

from serve_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_http_overhead  # noqa: E402

from flagscale.serve import engine as app_module  # noqa: E402
from flagscale.serve.codec import GpuJpegDecoder  # noqa: E402


@pytest.mark.parametrize("decoder", ["cpu", "deferred"])
def test_overhead_benchmark_serves_every_request(decoder):
    levels = bench_http_overhead.serve_and_measure(2.0, [1, 2], 4, decoder)
    assert [level["clients"] for level in levels] == [1, 2]
    for level in levels:
        assert level["errors"] == 0 and level["first_error"] is None
        assert level["requests"] == 4 * level["clients"]
        assert level["model_ms"] >= 2.0  # the server's own split: the sleep is inside the call
        assert level["overhead_p50_ms"] == round(level["p50_ms"] - 2.0, 2)
    assert app_module.GpuJpegDecoder is GpuJpegDecoder  # the benchmark's stand-in is gone
