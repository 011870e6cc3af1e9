"""Prometheus metrics for the server (one registry per app, served at GET /metrics).

pi0_requests_total{endpoint,status}         requests answered (HTTP routes and openpi messages)
pi0_request_duration_seconds{endpoint}      end-to-end latency per request
pi0_queue_wait_seconds                      enqueue -> start of the model call, per request
pi0_preprocess_seconds                      body parsing + image decoding, per request
pi0_model_seconds                           wall time of each model call (a batch)
pi0_batch_size                              observations per model call
pi0_queue_depth, pi0_worker_ready           gauges read at scrape time
pi0_gpu_memory_allocated_bytes / _reserved  CUDA only
"""

import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, worker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pi0_requests", "Requests answered", ["endpoint", "status"], registry=r
        )
        self.duration = Histogram(
            "pi0_request_duration_seconds",
            "End-to-end request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = _histogram("pi0_queue_wait_seconds", "Time queued before the model", r)
        self.preprocess = _histogram("pi0_preprocess_seconds", "Parsing and image decoding", r)
        self.model = _histogram("pi0_model_seconds", "Wall time of one model call (a batch)", r)
        self.batch_size = Histogram(
            "pi0_batch_size", "Observations per model call", buckets=BATCH_BUCKETS, registry=r
        )
        depth = Gauge("pi0_queue_depth", "Requests waiting for the model", registry=r)
        depth.set_function(lambda: worker.queue_depth)
        ready = Gauge("pi0_worker_ready", "1 when the model is loaded and serving", registry=r)
        ready.set_function(lambda: 1.0 if worker.ready else 0.0)
        self._add_gpu_gauges(worker)

    def _add_gpu_gauges(self, worker) -> None:
        allocated = Gauge(
            "pi0_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", registry=self.registry
        )
        reserved = Gauge(
            "pi0_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", registry=self.registry
        )
        allocated.set_function(lambda: _cuda_memory(worker, "memory_allocated"))
        reserved.set_function(lambda: _cuda_memory(worker, "memory_reserved"))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    def observe_result(self, queue_ms: float, preprocess_ms: float) -> None:
        self.queue_wait.observe(queue_ms / 1000.0)
        self.preprocess.observe(preprocess_ms / 1000.0)

    def observe_batch(self, size: int, model_s: float) -> None:
        self.batch_size.observe(size)
        self.model.observe(model_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _histogram(name: str, doc: str, registry) -> Histogram:
    return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=registry)


def _cuda_memory(worker, what: str) -> float:
    """0 on CPU; torch is only touched once the model is loaded (it may be mid-import before)."""
    torch = sys.modules.get("torch") if worker.ready else None
    try:
        if torch is None or not torch.cuda.is_available():
            return 0.0
        return float(getattr(torch.cuda, what)(torch.cuda.current_device()))
    except Exception:
        return 0.0
