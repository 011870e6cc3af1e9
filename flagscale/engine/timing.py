"""GPU timing helpers shared by the benchmarks and the backend comparison tool."""

import numpy as np


def cuda_times(fn, iters: int, warmup: int = 3) -> list:
    """CUDA-event milliseconds of `iters` calls of `fn` after `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def percentiles(samples) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "n": len(a),
    }
