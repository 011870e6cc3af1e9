"""FastAPI app factory for the Pi0 policy: POST /infer, GET /health, GET /info, GET /metrics,
GET /healthz and openpi's websocket protocol (see openpi_ws.py) on the same port.

State lives on app.state (cfg, worker); routes are thin: read body -> validate -> decode
(thread pool) -> worker (one inference thread, micro-batching) -> response. Every error is JSON
{"success": false, "error": "..."} naming the field.
"""

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import sys
import time

from typing import Any, Callable

import numpy as np

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from flagscale.logger import get_logger
from flagscale.serve.auth import resolve_keys, warn_if_exposed
from flagscale.serve.codec import (
    GpuJpegDecoder,
    ImageDecodeError,
    PixelBudget,
    decode_images,
    set_decode_threads,
)
from flagscale.serve.config import IMAGE_SLOTS, ConfigError, ServeConfig, load_serve_config
from flagscale.serve.docs import add_docs_routes
from flagscale.serve.errors import RequestError, check_float32, internal_error
from flagscale.serve.limits import (
    ClientGone,
    check_prompt_length,
    unless_client_leaves,
    warm_prompts,
)
from flagscale.serve.metrics import CONTENT_TYPE, Metrics
from flagscale.serve.middleware import ServeMiddleware
from flagscale.serve.openpi_ws import add_openpi_route
from flagscale.serve.rtc import http_requests as rtc_requests
from flagscale.serve.schemas import (
    ErrorResponse,
    InferRequest,
    InferResponse,
    Timing,
    describe_validation_error,
)
from flagscale.serve.worker import InferenceWorker, InferTimeout, NotReady, QueueFull

try:
    import orjson
except ImportError:  # optional: the standard library renders the same JSON, slower
    orjson = None

logger = get_logger("flagscale.serve.app")

V2_IMAGE_PREFIX = "observation.images."
# with image_decoder: gpu, bodies up to this size are parsed in the event loop (no thread hop);
# three 640x480 JPEGs as base64 JSON are ~140-400 KB
INLINE_PARSE_BYTES = 512 * 1024
# bodies above this are counted before parsing and parsed by the standard library (lean)
LEAN_PARSE_BYTES = 1 << 20
# set by run.py for the server it starts; /health echoes it
START_TOKEN = os.environ.get("PI0_START_TOKEN", "")
STOP_JOIN_S = 2.0  # at shutdown, how long to wait for a running model call
DRAINING = "server is shutting down (draining); retry on another replica or after a restart"


def _package_version() -> str:
    try:
        return importlib.metadata.version("flagscale-pi0")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__version__ = _package_version()


def create_app(
    policy,
    cfg,
    *,
    load_policy: Callable[[], Any] | None = None,
    on_failure=None,
    env=None,
    replica_id: str | None = None,
) -> FastAPI:
    """Build the app around a ready `policy`, or pass policy=None and `load_policy` (called in the
    inference thread once the server runs; /health answers "loading" (503) until it is warmed up).

    cfg: a ServeConfig, or anything load_serve_config accepts. on_failure(exc) runs in the
    inference thread if loading or warm-up fails (the server keeps answering /health "failed").
    The inference thread starts and stops with the app's lifespan. env (default os.environ) may
    add API keys (PI0_API_KEYS). replica_id is echoed as X-Replica-ID (Ray Serve replicas).
    """
    cfg = load_serve_config(cfg)
    fixed_noise = _load_fixed_noise(cfg.fixed_noise)
    if cfg.decode_threads is not None:
        set_decode_threads(cfg.decode_threads)
    metrics_ref = {}
    # request thread: base64 text -> images, prompts -> tokens (cached by the policy);
    # inference thread: a batch's deferred JPEGs -> pixels
    codecs = {"images": decode_images, "frames": None, "prompts": None}

    def prepare(policy):
        prepare_policy(policy, cfg, fixed_noise)
        codecs["prompts"] = getattr(policy, "warm_prompts", None)
        if cfg.image_decoder == "gpu":  # in the inference thread: a failure fails start-up
            gpu = GpuJpegDecoder(cfg.device)
            codecs.update(images=gpu, frames=gpu.decode_frames)

    def before_batch(observations):
        return codecs["frames"](observations) if codecs["frames"] else observations

    worker = InferenceWorker(
        policy,
        load_policy=load_policy,
        prepare=prepare,
        before_batch=before_batch,
        max_batch_size=cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms,
        max_queue=cfg.max_queue,
        on_failure=on_failure,
        on_batch=lambda size, seconds: metrics_ref["m"].observe_batch(size, seconds),
    )
    metrics_ref["m"] = metrics = Metrics(worker)
    keys = resolve_keys(cfg.api_keys, os.environ if env is None else env)
    warn_if_exposed(cfg.host, keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        lerobot = _start_lerobot_grpc(app.state) if cfg.lerobot_grpc.enabled else None
        yield
        if lerobot is not None:  # in-flight RPCs get drain_timeout_s, off the event loop
            await run_in_threadpool(lambda: lerobot.stop(cfg.drain_timeout_s).wait())
        # requests are answered or failed by now (drain); a model call still running cannot
        # be interrupted: the process exits without waiting long for it
        await run_in_threadpool(worker.stop, STOP_JOIN_S)

    app = FastAPI(  # /docs and /redoc: ours, with local assets (docs.py), not FastAPI's CDN pages
        title="FlagScale Pi0 server",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.cfg = cfg
    app.state.worker = worker
    app.state.fixed_noise = fixed_noise
    app.state.codecs = codecs
    app.state.metrics = metrics
    app.state.api_keys = keys
    app.state.replica_id = replica_id
    app.state.draining = False  # set on SIGTERM: no new requests (503), in-flight ones finish
    app.state.ws_in_flight = 0  # openpi requests being answered (drained before shutdown)
    app.state.http_in_flight = 0  # POST /infer requests being answered
    _add_routes(app)
    add_docs_routes(app)
    if cfg.openpi:
        add_openpi_route(app, lambda *args: _infer_one(app, *args))
    _add_error_handlers(app)
    app.add_middleware(
        ServeMiddleware,
        metrics=metrics,
        keys=keys,
        access_log=cfg.access_log,
        replica_id=replica_id,
    )
    if cfg.cors_allow_origins:  # outermost, so preflight requests are not asked for a key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    return app


def _start_lerobot_grpc(state):
    """lerobot's async-inference gRPC service (engine.lerobot_grpc); grpcio is imported here."""
    from flagscale.serve import lerobot_grpc

    state.lerobot_grpc = lerobot_grpc.start(state)
    return state.lerobot_grpc


# ---------------------------------------------------------------- startup checks


def prepare_policy(policy, cfg: ServeConfig, fixed_noise: np.ndarray | None) -> None:
    """Runs in the inference thread after load: check dims, warm up, probe one inference."""
    meta = policy.metadata
    _check_dims(policy, meta, cfg, fixed_noise)
    if hasattr(policy, "rtc_config"):
        from flagscale.models.pi0.rtc import RTCConfig

        policy.rtc_config = RTCConfig(**{k: v for k, v in cfg.rtc.items() if k != "enabled"})
    if cfg.warmup and hasattr(policy, "warmup"):
        start = time.perf_counter()
        # on a GPU every bucket (graph capture, Triton / FlagGems compilation per shape); on the
        # CPU nothing is captured or compiled: one batch size warms the code paths
        on_gpu = str(cfg.device).startswith("cuda")
        policy.warmup(
            batch_sizes=batch_buckets(cfg) if on_gpu else [1], num_steps_list=warmup_steps(cfg)
        )
        logger.info("warm-up done in %.1f s", time.perf_counter() - start)
    probe = {
        "images": {slot: np.zeros((224, 224, 3), np.uint8) for slot in cfg.cameras.values()},
        "state": np.zeros(cfg.state_dim, np.float32),
        "prompt": cfg.instruction,
    }
    out = policy.infer_batch([probe], num_steps=cfg.num_steps, noise=[None], seeds=[0])[0]
    actions = np.asarray(out["actions"])
    if (
        actions.ndim != 2
        or actions.shape[0] < cfg.action_horizon
        or actions.shape[1] < cfg.action_dim
    ):
        raise ConfigError(
            f"serve.engine.action_horizon/action_dim: the model returns actions of shape "
            f"{list(actions.shape)}, cannot cut [:{cfg.action_horizon}, :{cfg.action_dim}]"
        )


def warmup_steps(cfg: ServeConfig) -> list:
    """The num_steps values warmed up (and captured): the default and engine.warmup_num_steps."""
    return sorted({cfg.num_steps, *cfg.warmup_num_steps})


def batch_buckets(cfg: ServeConfig) -> list:
    """Batch sizes to warm up / capture (CUDA graphs pad a batch up to the next bucket), always
    ending at max_batch_size. `engine.batch_buckets` if set; else every size up to 8 (a batch of
    5 then runs as 5, not padded to 8: the model's time grows with the batch) and powers of two
    above 8."""
    top = cfg.max_batch_size
    if cfg.batch_buckets:
        sizes = set(cfg.batch_buckets)
    else:
        sizes = set(range(1, min(8, top) + 1)) | {b for b in (16, 32, 64, 128) if b < top}
    return sorted(sizes | {top})


def _check_dims(policy, meta, cfg: ServeConfig, fixed_noise) -> None:
    if cfg.state_dim > meta["max_state_dim"]:
        raise ConfigError(
            f"serve.engine.state_dim: {cfg.state_dim} exceeds the model's max_state_dim "
            f"{meta['max_state_dim']}"
        )
    if cfg.action_horizon > meta["chunk_size"]:
        raise ConfigError(
            f"serve.engine.action_horizon: {cfg.action_horizon} exceeds the model's chunk_size "
            f"{meta['chunk_size']}"
        )
    missing = [s for s in cfg.cameras.values() if s not in tuple(policy.image_keys)]
    if missing:
        raise ConfigError(f"serve.engine.cameras: the model has no image slot {missing}")
    expected = (meta["chunk_size"], meta["max_action_dim"])
    if fixed_noise is not None and fixed_noise.shape != expected:
        raise ConfigError(
            f"serve.engine.fixed_noise: expected shape {list(expected)} "
            f"(chunk_size x max_action_dim), got {list(fixed_noise.shape)}"
        )


def _load_fixed_noise(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    noise = np.load(path, allow_pickle=False).astype(np.float32)
    if not np.isfinite(noise).all():
        raise ConfigError(f"serve.engine.fixed_noise: {path} contains NaN or infinite values")
    noise.setflags(write=False)
    return noise


# ---------------------------------------------------------------- routes


def _add_routes(app: FastAPI) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD
    async def health():
        return _health(app.state.worker, app.state.cfg, app.state.draining)

    @app.api_route("/healthz", methods=["GET", "HEAD"], response_class=PlainTextResponse)
    async def healthz():
        """openpi's liveness probe: 200 "OK" once the model serves, else 503."""
        ok = (
            app.state.worker.ready
            and not app.state.draining
            and app.state.worker.problem(app.state.cfg.infer_timeout_s) is None
        )
        return PlainTextResponse("OK\n" if ok else "NOT READY\n", status_code=200 if ok else 503)

    @app.get("/info")
    async def info():
        info = _info(app.state.worker, app.state.cfg)
        info["log_dir"] = getattr(app.state, "log_dir", None)  # <exp_dir>/serve_logs (run.py)
        return JSONResponse(_jsonable(info))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/infer", openapi_extra=INFER_OPENAPI)
    async def infer(request: Request):
        return await _infer(request, app)


def _schema_ref(model) -> dict:
    return {"content": {"application/json": {"schema": model.model_json_schema()}}}


# /infer reads its raw body (bounded size, exact errors); describe it for OpenAPI clients and fuzzers.
INFER_OPENAPI = {
    "requestBody": {"required": True, **_schema_ref(InferRequest)},
    "responses": {
        "200": {"description": "actions", **_schema_ref(InferResponse)},
        "400": {"description": "invalid request", **_schema_ref(ErrorResponse)},
        "401": {"description": "missing or wrong API key", **_schema_ref(ErrorResponse)},
        "413": {"description": "body too large", **_schema_ref(ErrorResponse)},
        "422": {"description": "invalid field", **_schema_ref(ErrorResponse)},
        "503": {"description": "loading, busy, stalled or draining", **_schema_ref(ErrorResponse)},
    },
}


def _health(worker: InferenceWorker, cfg: ServeConfig, draining: bool = False) -> JSONResponse:
    status = {"ready": "healthy", "loading": "loading"}.get(worker.state, worker.state)
    problem = worker.problem(cfg.infer_timeout_s)
    if problem:
        status = "unhealthy"
    if draining:  # load balancers stop sending here; in-flight requests still finish
        status, problem = "draining", DRAINING
    body = {
        "status": status,
        "model_loaded": worker.ready,
        "gpu_info": gpu_info(worker.ready),
        "device": cfg.device,
        "timestamp": time.time(),
    }
    if START_TOKEN:  # set by run.py: tells it that this process is the child it started
        body["start_token"] = START_TOKEN
    if worker.error or problem:
        body["error"] = problem or worker.error
    ok = worker.ready and problem is None
    return JSONResponse(body, status_code=200 if ok else 503)


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


def _info(worker: InferenceWorker, cfg: ServeConfig) -> dict:
    policy = worker.policy
    meta = None if policy is None else dict(policy.metadata)
    return {
        "status": worker.state,
        "model_loaded": worker.ready,
        "version": __version__,
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


async def _infer(request: Request, app: FastAPI):
    if app.state.draining:
        raise RequestError(503, DRAINING, {"Connection": "close"})
    app.state.http_in_flight += 1
    try:
        return await _answer_infer(request, app)
    finally:
        app.state.http_in_flight -= 1


async def _answer_infer(request: Request, app: FastAPI):
    cfg, worker = app.state.cfg, app.state.worker
    start = time.perf_counter()
    policy = worker.policy
    if policy is None:
        raise RequestError(503, _not_ready(worker))
    body = await read_body(request, cfg.max_body_bytes, cfg.max_body_mb)
    args = (body, cfg, _noise_shape(policy), app.state.fixed_noise, app.state.codecs)
    if app.state.codecs["frames"] is not None and len(body) <= INLINE_PARSE_BYTES:
        # JPEGs are decoded later (image_decoder: gpu): parsing a small body here blocks the loop
        # for ~0.5 ms, less than the hop to a thread costs (0.4 ms less per request, measured)
        batch = _parse_and_build(*args)
    else:  # parsing and image decoding off the event loop (a 32 MB body must not block it)
        batch = await run_in_threadpool(_parse_and_build, *args)
    preprocess_ms = (time.perf_counter() - start) * 1000.0
    try:
        result = await unless_client_leaves(
            request.receive,
            run_worker(
                app, batch.observations, batch.noises, batch.seeds, batch.num_steps, batch.rtc
            ),
        )
    except ClientGone:  # nobody reads the answer; 499 (client closed request) in the metrics
        raise RequestError(499, "the client closed the connection") from None
    app.state.metrics.observe_result(result.queue_ms, preprocess_ms)
    actions = cut_actions(result.outputs, cfg)
    timing = Timing(
        queue_ms=result.queue_ms,
        preprocess_ms=preprocess_ms,
        model_ms=result.model_ms,
        total_ms=(time.perf_counter() - start) * 1000.0,
        batch_size=result.batch_size,
    )
    body = {  # InferResponse's fields, built directly: no per-float validation
        "success": True,
        "actions": actions,
        "qpos": actions,  # same values: v1 clients read the actions from `qpos`
        "num_steps": batch.num_steps,
        "seed": batch.echo_seed,
        "timing": timing.model_dump(exclude_none=True),
        "rtc_guided": None if batch.rtc is None else [r is not None for r in batch.rtc],
    }
    return ActionsResponse({k: v for k, v in body.items() if v is not None})


async def run_worker(app: FastAPI, observations, noises, seeds, num_steps: int, rtc=None):
    """Queue one request on the shared worker; worker errors become 503 / 500 RequestErrors.
    `rtc`: None, or one real-time chunking dict (or None) per observation."""
    worker, cfg = app.state.worker, app.state.cfg
    problem = worker.problem(cfg.infer_timeout_s)
    if problem:
        raise RequestError(503, problem)
    try:
        return await worker.infer(
            observations, noises, seeds, num_steps, cfg.infer_timeout_s, rtc=rtc
        )
    except (QueueFull, NotReady, InferTimeout) as e:
        raise RequestError(503, str(e)) from None
    except ImageDecodeError as e:  # a JPEG left to the inference thread (image_decoder: gpu)
        raise RequestError(400, f"images: {e}") from None
    except Exception as e:  # logged with its traceback by the worker; the client gets no details
        raise RequestError(500, internal_error("inference failed", e)) from None


async def _infer_one(
    app: FastAPI, observation: dict, num_steps: int, preprocess_ms: float, rtc=None
):
    """One openpi observation (and its RTC dict or None) -> (float32 actions
    [action_horizon, action_dim], JobResult)."""
    if app.state.worker.policy is None:
        raise RequestError(503, _not_ready(app.state.worker))
    noise = app.state.fixed_noise  # same precedence as HTTP: engine.fixed_noise > engine.seed
    seed = app.state.cfg.seed if noise is None else None
    result = await run_worker(app, [observation], [noise], [seed], num_steps, [rtc])
    app.state.metrics.observe_result(result.queue_ms, preprocess_ms)
    actions = cut_actions(result.outputs, app.state.cfg)
    return np.asarray(actions[0], dtype=np.float32), result


def _not_ready(worker: InferenceWorker) -> str:
    if worker.state == "failed":
        return f"model failed to load: {worker.error}"
    return f"model not loaded yet (status: {worker.state}); poll GET /health until it is healthy"


def _noise_shape(policy) -> tuple:
    meta = policy.metadata
    return (int(meta["chunk_size"]), int(meta["max_action_dim"]))


# ---------------------------------------------------------------- body and request parsing


async def read_body(request: Request, limit: int, limit_mb: float) -> bytes:
    """Read the body, stopping at `limit` bytes whatever Content-Length says (413 beyond it)."""
    too_large = RequestError(
        413, f"request body is larger than {limit_mb:g} MB (engine.max_body_mb)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        if request.headers.get("expect", "").lower() == "100-continue":
            # the client waits for "100 Continue" before sending: refuse without asking for it
            too_large.headers = {"Connection": "close"}
        else:
            await _discard(request, 0, limit)
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await _discard(request, size, limit)
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected while sending the body") from None
    return b"".join(chunks)


async def _discard(request: Request, size: int, limit: int) -> None:
    """Drain a bounded part of an oversized body so the client reads the 413, not a reset."""
    cap = 2 * limit + (8 << 20)
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                return
    except Exception:  # the stream may already be consumed or disconnected
        return


def _parse_and_build(body: bytes, cfg, noise_shape, fixed_noise, codecs) -> "Batch":
    request = parse_request(body, cfg.max_json_values)
    batch = build_batch(request, cfg, noise_shape, fixed_noise, codecs["images"])
    warm_prompts(codecs, [obs["prompt"] for obs in batch.observations])
    return batch


def load_json(body: bytes):
    """json.loads, through orjson when it takes the body (~4x faster on a 140 KB request). Bodies
    orjson refuses (NaN, non-UTF-8 encodings, deep nesting, broken JSON) or reads differently
    (integers beyond 64 bits become floats there) go to the standard library, which accepts them
    or words the error exactly as before. Bodies above LEAN_PARSE_BYTES go to the standard
    library too: orjson's peak memory is ~12x the body (a 28 MB body of base64 text: 347 vs
    53 MB for json, measured)."""
    if orjson is not None and len(body) <= LEAN_PARSE_BYTES:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if not _has_huge_number(data):
                return data
    return json.loads(body)


def _has_huge_number(data) -> bool:
    """Any number of magnitude >= 2**63 in a parsed body (iterative: no recursion limit)."""
    stack = [data]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is float and not abs(value) < 2.0**63:
            return True
        if kind is dict:
            stack.extend(value.values())
        elif kind is list:
            stack.extend(value)
    return False


def parse_request(body: bytes, max_values: int = 1_000_000) -> InferRequest:
    if not body.strip():
        raise RequestError(400, "empty request body; expected a JSON object")
    _check_value_count(body, max_values)
    try:
        data = load_json(body)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"invalid JSON body: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(data).__name__}")
    try:
        return InferRequest.model_validate(data)
    except ValidationError as e:
        raise RequestError(422, describe_validation_error(e)) from None


def _check_value_count(body: bytes, max_values: int) -> None:
    """Python objects cost 30-60x their JSON text ("[]," is a 56-byte list): a large body is
    counted (commas and brackets, ~1 ms per MB) and refused before it is parsed. Bodies up to
    LEAN_PARSE_BYTES cannot hold enough values to matter and are not counted."""
    if len(body) <= LEAN_PARSE_BYTES:
        return
    values = body.count(b",") + body.count(b"[")
    if values > max_values:
        raise RequestError(
            400, f"body: about {values} JSON values; at most {max_values} (engine.max_json_values)"
        )


@dataclasses.dataclass
class Batch:
    observations: list  # policy observations {"images", "state", "prompt"}
    noises: list  # per observation: float32 (chunk_size, max_action_dim) or None
    seeds: list  # per observation: int or None
    num_steps: int
    echo_seed: Any  # the request's or the config's seed, echoed in the response
    rtc: list | None = None  # per observation: a real-time chunking dict or None


def build_batch(
    req: InferRequest, cfg: ServeConfig, noise_shape: tuple, fixed_noise, decode=decode_images
) -> Batch:
    """Validate against the config and decode images (`decode`: codec.decode_images or a
    GpuJpegDecoder): one observation per `images` element."""
    size = req.batch_size
    if size > cfg.max_batch_size:
        raise RequestError(
            400,
            f"images: {size} observations in one request; at most {cfg.max_batch_size} "
            "(engine.max_batch_size)",
        )
    num_steps = _num_steps(req, cfg)
    prompts = _prompts(req, cfg)
    states = _states(req, cfg)
    masks = _masks(req, cfg)
    noises, seeds, echo = _noise_and_seeds(req, cfg, noise_shape, fixed_noise)
    rtc = rtc_requests(req.rtc, size, cfg)
    budget = PixelBudget(cfg.max_request_pixels)
    observations = [
        {
            "images": _images(i, req.images[i], masks[i], cfg, decode, budget),
            "state": states[i],
            "prompt": prompts[i],
        }
        for i in range(size)
    ]
    return Batch(observations, noises, seeds, num_steps, echo, rtc)


def _num_steps(req: InferRequest, cfg: ServeConfig) -> int:
    steps = cfg.num_steps if req.num_steps is None else req.num_steps
    if not 1 <= steps <= cfg.max_num_steps:
        raise RequestError(
            400, f"num_steps: must be in 1..{cfg.max_num_steps} (engine.max_num_steps), got {steps}"
        )
    return steps


def _prompts(req: InferRequest, cfg: ServeConfig) -> list:
    value = cfg.instruction if req.instruction is None else req.instruction
    prompts = [value] * req.batch_size if isinstance(value, str) else list(value)
    if len(prompts) != req.batch_size:
        raise RequestError(
            400,
            f"instruction: a list needs one string per observation ({req.batch_size}), "
            f"got {len(prompts)}",
        )
    for prompt in prompts:
        check_prompt_length("instruction", prompt, cfg)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # JSON "\ud800": the tokenizer would fail with a 500
            raise RequestError(400, "instruction: not valid Unicode (lone surrogate)") from None
    return prompts


def _states(req: InferRequest, cfg: ServeConfig) -> list:
    field = req.state_field
    state = getattr(req, field)
    if state is None:
        raise RequestError(422, "state: field required (send `state`, or `eef_pose` as in v1)")
    if state.ndim == 1:
        state = state[None, :]
    if state.ndim != 2:
        raise RequestError(
            400,
            f"{field}: expected [batch, {cfg.state_dim}] numbers, got shape {list(state.shape)}",
        )
    if state.shape[0] != req.batch_size:
        raise RequestError(
            400,
            f"{field}: {state.shape[0]} rows but images has {req.batch_size} observations; "
            "send one row per observation",
        )
    if state.shape[1] != cfg.state_dim:
        raise RequestError(
            400,
            f"{field}: expected {cfg.state_dim} values per observation (engine.state_dim), "
            f"got {state.shape[1]}",
        )
    check_float32(field, state)
    return list(state.astype(np.float32))


def _slot_for(name: str, cfg: ServeConfig) -> str | None:
    if name in cfg.cameras:
        return cfg.cameras[name]
    slot = name.removeprefix(V2_IMAGE_PREFIX)
    return slot if slot in cfg.cameras.values() else None


def _unknown_camera(field: str, name: str, cfg: ServeConfig) -> RequestError:
    known = ", ".join(cfg.cameras)
    slots = ", ".join(cfg.cameras.values())
    return RequestError(
        400,
        f"{field}: unknown camera {name!r}; known cameras: {known} "
        f"(or image slots {slots}, optionally prefixed '{V2_IMAGE_PREFIX}')",
    )


def _masks(req: InferRequest, cfg: ServeConfig) -> list:
    """image_masks -> per observation, the set of slots masked out (value false)."""
    value = req.image_masks
    if value is None:
        return [set() for _ in range(req.batch_size)]
    items = [value] * req.batch_size if isinstance(value, dict) else value
    if len(items) != req.batch_size:
        raise RequestError(
            400, f"image_masks: {len(items)} entries but images has {req.batch_size} observations"
        )
    masks = []
    for i, item in enumerate(items):
        masked = set()
        for name, keep in item.items():
            slot = _slot_for(name, cfg)
            if slot is None:
                raise _unknown_camera(f"image_masks[{i}]", name, cfg)
            if not keep:
                masked.add(slot)
        masks.append(masked)
    return masks


def _images(index: int, cams: dict, masked: set, cfg: ServeConfig, decode, budget) -> dict:
    todo, seen = [], set()  # (camera name, slot, base64 text)
    for name, text in cams.items():
        slot = _slot_for(name, cfg)
        if slot is None:
            raise _unknown_camera(f"images[{index}]", name, cfg)
        if slot in seen:
            raise RequestError(400, f"images[{index}].{name}: slot {slot} is given twice")
        seen.add(slot)
        if text is not None and slot not in masked:
            todo.append((name, slot, text))
    if not todo:
        raise RequestError(
            400,
            f"images[{index}]: at least one (unmasked) camera image is required; "
            f"known cameras: {', '.join(cfg.cameras)}",
        )
    images = {}
    decoded = decode([t for *_, t in todo], cfg.max_image_side, budget)
    for (name, slot, _), image in zip(todo, decoded):
        if isinstance(image, ImageDecodeError):
            raise RequestError(400, f"images[{index}].{name}: {image}")
        images[slot] = image
    return images


def _noise_and_seeds(req: InferRequest, cfg: ServeConfig, shape: tuple, fixed_noise):
    """Precedence: request noise > request seed > engine.fixed_noise > engine.seed > random."""
    size = req.batch_size
    if req.noise is not None:
        return _request_noise(req.noise, size, shape), [None] * size, None
    if req.seed is not None:
        seeds = _request_seeds(req.seed, size)
        return [None] * size, seeds, req.seed
    if fixed_noise is not None:
        return [fixed_noise] * size, [None] * size, None
    if cfg.seed is not None:
        return [None] * size, [cfg.seed] * size, cfg.seed
    return [None] * size, [None] * size, None


def _request_noise(noise: np.ndarray, size: int, shape: tuple) -> list:
    if noise.ndim == 2 and size == 1:
        noise = noise[None]
    if noise.shape != (size, *shape):
        raise RequestError(
            400,
            f"noise: expected shape {[size, *shape]} (batch x chunk_size x max_action_dim; "
            f"the batch axis may be left out for one observation), got {list(noise.shape)}",
        )
    check_float32("noise", noise)
    return list(noise.astype(np.float32))


def _request_seeds(seed, size: int) -> list:
    seeds = [seed] * size if isinstance(seed, int) else list(seed)
    if len(seeds) != size:
        raise RequestError(
            400, f"seed: a list needs one seed per observation ({size}), got {len(seeds)}"
        )
    for value in seeds:
        if not 0 <= value < 2**63:
            raise RequestError(400, f"seed: must be in 0..2**63-1, got {value}")
    return seeds


class ActionsResponse(JSONResponse):
    """JSON with numpy arrays inside, rendered by orjson when installed (~30x faster than the
    standard library for an action chunk; the same float64 digits), else by json."""

    def render(self, content) -> bytes:
        if orjson is not None:
            return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
        plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in content.items()}
        return super().render(plain)


def cut_actions(outputs: list, cfg: ServeConfig) -> np.ndarray:
    """Policy outputs -> [B, action_horizon, action_dim] float64 array of the float32 actions
    (v1 truncation; float64 so that JSON prints the same digits as before)."""
    chunks = []
    for out in outputs:
        actions = np.asarray(out["actions"], dtype=np.float32)
        if (
            actions.ndim != 2
            or actions.shape[0] < cfg.action_horizon
            or actions.shape[1] < cfg.action_dim
        ):
            raise RequestError(
                500,
                f"the model returned actions of shape {list(actions.shape)}; cannot cut "
                f"[:{cfg.action_horizon}, :{cfg.action_dim}]",
            )
        chunks.append(actions[: cfg.action_horizon, : cfg.action_dim])
    stacked = np.stack(chunks)
    if not np.isfinite(stacked).all():
        raise RequestError(500, "the model produced NaN or infinite actions")
    return stacked.astype(np.float64)


# ---------------------------------------------------------------- errors and helpers


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        headers.update(exc.headers or {})
        if exc.status >= 500 and exc.status != 503:
            logger.error(
                "%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message
            )
        return _error(exc.status, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(422, "; ".join(str(e) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, internal_error("unexpected error", exc))


def _error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"success": False, "error": message}, status_code=status, headers=headers)


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
