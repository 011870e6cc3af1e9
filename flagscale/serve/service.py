"""The service every transport calls: a typed state and one transport-free `infer`.

POST /infer (app.py), the openpi websocket (openpi_ws.py) and lerobot's gRPC endpoint
(lerobot_grpc.py) turn their wire bodies into a `wire.Batch`, call `infer` (`infer_blocking` from
gRPC's threads) and shape the `InferResult` into their reply. /health and /info read the same state.
"""

import dataclasses
import sys
import time

from typing import Any

import numpy as np

from flagscale.serve.codec import Codecs, ImageDecodeError
from flagscale.serve.config import IMAGE_SLOTS, ServeConfig
from flagscale.serve.errors import RequestError, internal_error
from flagscale.serve.metrics import Metrics
from flagscale.serve.wire import Batch, cut_actions
from flagscale.serve.worker import InferenceWorker, InferTimeout, JobResult, NotReady, QueueFull

DRAINING = "server is shutting down (draining); retry on another replica or after a restart"


@dataclasses.dataclass(eq=False)
class ServeState:
    """What the routes share (FastAPI's `app.state` is this object)."""

    cfg: ServeConfig
    worker: InferenceWorker
    metrics: Metrics
    codecs: Codecs  # the engine's decoders (images, prompts; a batch's deferred JPEGs)
    fixed_noise: np.ndarray | None = None
    api_keys: tuple = ()
    replica_id: str | None = None
    version: str = "unknown"
    start_token: str = ""  # set by run.py for the server it starts; /health echoes it
    draining: bool = False  # set on SIGTERM: no new requests (503), in-flight ones finish
    ws_in_flight: int = 0  # openpi requests being answered (drained before shutdown)
    http_in_flight: int = 0  # POST /infer requests being answered
    lerobot_grpc: Any = None  # the running gRPC endpoint, when engine.lerobot_grpc is on
    log_dir: str | None = None  # <exp_dir>/serve_logs (run.py); in /info: action=stop names it


@dataclasses.dataclass
class InferResult:
    actions: np.ndarray  # float64 [B, action_horizon, action_dim] (JSON prints float64 digits)
    job: JobResult


async def infer(state: ServeState, batch: Batch, preprocess_ms: float) -> InferResult:
    """Queue one batch on the shared worker and cut its actions; worker errors become 503 / 500
    RequestErrors (400 for a JPEG the inference thread could not decode)."""
    worker, cfg = state.worker, state.cfg
    if worker.policy is None:
        raise RequestError(503, worker.not_ready_message())
    problem = worker.problem(cfg.infer_timeout_s)
    if problem:
        raise RequestError(503, problem)
    try:
        job = await worker.infer(
            batch.observations,
            batch.noises,
            batch.seeds,
            batch.num_steps,
            cfg.infer_timeout_s,
            rtc=batch.rtc,
        )
    except (QueueFull, NotReady, InferTimeout) as e:
        raise RequestError(503, str(e)) from None
    except ImageDecodeError as e:  # a JPEG left to the inference thread (image_decoder: gpu)
        raise RequestError(400, f"images: {e}") from None
    except Exception as e:  # logged with its traceback by the worker; the client gets no details
        raise RequestError(500, internal_error("inference failed", e)) from None
    state.metrics.observe_result(job.queue_ms, preprocess_ms)
    return InferResult(cut_actions(job.outputs, cfg), job)


def infer_blocking(state: ServeState, batch: Batch) -> InferResult:
    """`infer` for a caller's own thread (gRPC): the worker's errors come as they are (NotReady,
    QueueFull, TimeoutError after engine.infer_timeout_s, the model's exception), for the
    transport to word; a bad model output is a RequestError(500)."""
    future = state.worker.submit(
        batch.observations, batch.noises, batch.seeds, batch.num_steps, batch.rtc
    )
    try:
        job = future.result(timeout=state.cfg.infer_timeout_s)
    except TimeoutError:
        future.cancel()
        raise
    return InferResult(cut_actions(job.outputs, state.cfg), job)


def noise_shape(policy) -> tuple:
    meta = policy.metadata
    return (int(meta["chunk_size"]), int(meta["max_action_dim"]))


# ---------------------------------------------------------------- /health and /info


def health(state: ServeState) -> tuple:
    """(body, ok) of GET /health."""
    worker, cfg = state.worker, state.cfg
    status = {"ready": "healthy", "loading": "loading"}.get(worker.state, worker.state)
    problem = worker.problem(cfg.infer_timeout_s)
    if problem:
        status = "unhealthy"
    if state.draining:  # load balancers stop sending here; in-flight requests still finish
        status, problem = "draining", DRAINING
    body = {
        "status": status,
        "model_loaded": worker.ready,
        "gpu_info": gpu_info(worker.ready),
        "device": cfg.device,
        "timestamp": time.time(),
    }
    if state.start_token:  # tells run.py that this process is the child it started
        body["start_token"] = state.start_token
    if worker.error or problem:
        body["error"] = problem or worker.error
    return body, worker.ready and problem is None


def live(state: ServeState) -> bool:
    """openpi's liveness (GET /healthz): the model serves."""
    worker = state.worker
    return worker.ready and not state.draining and worker.problem(state.cfg.infer_timeout_s) is None


def _graph_stats(policy) -> dict | None:
    """The CUDA-graph sampler's counters (None without graphs): steady-state captures or eager
    calls show up here."""
    sampler = getattr(policy, "sampler", None)
    if not hasattr(sampler, "graphs"):
        return None
    return {
        "graphs": len(sampler.graphs),
        "max_graphs": sampler.max_graphs,
        "shapes": [dict(zip(("batch", "cameras", "num_steps"), k)) for k in sorted(sampler.graphs)],
        "captures": sampler.captures,
        "replays": sampler.replays,
        "eager_calls": sampler.eager_calls,
    }


def info(state: ServeState) -> dict:
    """GET /info's body (JSON-ready)."""
    body = _info(state)
    body["log_dir"] = state.log_dir  # action=stop with another exp_dir can name this one
    return _jsonable(body)


def _info(state: ServeState) -> dict:
    worker, cfg = state.worker, state.cfg
    policy = worker.policy
    meta = None if policy is None else dict(policy.metadata)
    return {
        "status": worker.state,
        "model_loaded": worker.ready,
        "version": state.version,
        "random_init": cfg.random_init,
        "model_variant": (meta or {}).get("model_variant", cfg.model_variant),
        "metadata": meta,
        "cuda_graphs": _graph_stats(policy),
        "ops": cfg.ops,
        "device": cfg.device,
        "dtype": cfg.torch_dtype,
        "cameras": dict(cfg.cameras),
        "image_slots": list(IMAGE_SLOTS),
        "state_dim": cfg.state_dim,
        "action_shape": [cfg.action_horizon, cfg.action_dim],
        "num_steps": {"default": cfg.num_steps, "max": cfg.max_num_steps},
        "instruction": cfg.instruction,
        "seed": cfg.seed,
        "fixed_noise": cfg.fixed_noise,
        "limits": {
            "max_batch_size": cfg.max_batch_size,
            "max_wait_ms": cfg.max_wait_ms,
            "max_queue": cfg.max_queue,
            "max_body_mb": cfg.max_body_mb,
            "max_image_side": cfg.max_image_side,
            "max_request_pixels": cfg.max_request_pixels,
            "max_prompt_chars": cfg.max_prompt_chars,
            "max_json_values": cfg.max_json_values,
            "max_header_kb": cfg.max_header_kb,
            "max_connections": cfg.max_connections,
            "header_timeout_s": cfg.header_timeout_s,
            "body_timeout_s": cfg.body_timeout_s,
        },
        "image_decoder": cfg.image_decoder,
        "rtc": dict(cfg.rtc),
        "queue_depth": worker.queue_depth,
    }


def gpu_info(model_loaded: bool = True) -> dict:
    """FlagScale robotics /health gpu_info (memory in bytes). torch is only queried once the model
    is loaded (it may be mid-import in the loading thread before that)."""
    torch = sys.modules.get("torch") if model_loaded else None
    try:
        if torch is None or not torch.cuda.is_available():
            return {"available": False, "device_count": 0, "device_name": "cpu"}
        index = torch.cuda.current_device()
        return {
            "available": True,
            "device_count": torch.cuda.device_count(),
            "current_device": index,
            "device_name": torch.cuda.get_device_name(index),
            "memory_allocated": torch.cuda.memory_allocated(index),
            "memory_reserved": torch.cuda.memory_reserved(index),
        }
    except Exception as e:  # health must answer whatever the driver says
        return {"available": False, "error": f"{type(e).__name__}: {e}"}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
