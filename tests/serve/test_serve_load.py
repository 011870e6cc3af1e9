"""Load: concurrent HTTP clients against the real server (tiny model, CPU) with zero errors."""

import asyncio
import statistics
import time

import httpx
import numpy as np

from serve_helpers import v2_body

CLIENTS = 8
REQUESTS_PER_CLIENT = 25


async def _client(url: str, index: int, latencies: list, errors: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i in range(REQUESTS_PER_CLIENT):
            start = time.perf_counter()
            try:
                response = await client.post("/infer", json=v2_body(index * 100 + i))
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append((time.perf_counter() - start) * 1000.0)
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")


async def run_load(url: str) -> dict:
    latencies, errors = [], []
    start = time.perf_counter()
    await asyncio.gather(*(_client(url, i, latencies, errors) for i in range(CLIENTS)))
    wall = time.perf_counter() - start
    return {
        "requests": CLIENTS * REQUESTS_PER_CLIENT,
        "concurrency": CLIENTS,
        "errors": errors,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_ms": statistics.fmean(latencies),
        "throughput_rps": len(latencies) / wall,
        "wall_s": wall,
    }


def test_http_load_has_zero_errors(live, http):
    before = http.get("/metrics").text
    stats = asyncio.run(run_load(live.url))
    print(
        f"\nHTTP load: {stats['requests']} requests, {stats['concurrency']} clients, "
        f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, "
        f"{stats['throughput_rps']:.1f} req/s, {len(stats['errors'])} errors"
    )
    assert stats["errors"] == []
    after = http.get("/metrics").text
    batches = _value(after, "pi0_batch_size_count") - _value(before, "pi0_batch_size_count")
    observations = _value(after, "pi0_batch_size_sum") - _value(before, "pi0_batch_size_sum")
    assert observations == stats["requests"]
    assert batches < stats["requests"], "concurrent requests should share model calls"


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
