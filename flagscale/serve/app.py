"""FastAPI app factory for the Pi0 policy: POST /infer, GET /health, GET /info, GET /metrics,
GET /healthz and openpi's websocket protocol (see openpi_ws.py) on the same port.

Wiring only. The routes share one typed state (`service.ServeState`, which is `app.state`); a
request's way: read body -> `wire.parse_and_build` (thread pool) -> `service.infer` (one inference
thread, micro-batching) -> `wire.infer_reply`. Every error is JSON {"success": false, "error":
"..."} naming the field.
"""

import contextlib
import importlib.metadata
import os
import time

from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from flagscale.logger import get_logger
from flagscale.serve import service, wire
from flagscale.serve.auth import resolve_keys, warn_if_exposed
from flagscale.serve.config import load_serve_config
from flagscale.serve.docs import add_docs_routes
from flagscale.serve.engine import Engine
from flagscale.serve.errors import RequestError, internal_error
from flagscale.serve.limits import ClientGone, unless_client_leaves
from flagscale.serve.metrics import CONTENT_TYPE, Metrics
from flagscale.serve.middleware import ServeMiddleware
from flagscale.serve.openpi_ws import add_openpi_route
from flagscale.serve.schemas import ErrorResponse, InferRequest, InferResponse
from flagscale.serve.service import DRAINING, ServeState
from flagscale.serve.worker import InferenceWorker

logger = get_logger("flagscale.serve.app")

# with image_decoder: gpu, bodies up to this size are parsed in the event loop (no thread hop);
# three 640x480 JPEGs as base64 JSON are ~140-400 KB
INLINE_PARSE_BYTES = 512 * 1024
# set by run.py for the server it starts; /health echoes it
START_TOKEN = os.environ.get("PI0_START_TOKEN", "")
STOP_JOIN_S = 2.0  # at shutdown, how long to wait for a running model call


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
    """Build the app around `policy`, or with policy=None the one `load_policy()` returns, or
    else the one the config names (built in the inference thread once the server runs; /health
    answers "loading" (503) until it is checked and warmed up).

    cfg: a ServeConfig, or anything load_serve_config accepts. on_failure(exc) runs in the
    inference thread if loading or warm-up fails (the server keeps answering /health "failed").
    The inference thread starts and stops with the app's lifespan. env (default os.environ) may
    add API keys (PI0_API_KEYS). replica_id is echoed as X-Replica-ID (Ray Serve replicas).
    """
    cfg = load_serve_config(cfg)
    engine = Engine(cfg, policy, build=load_policy)
    worker = InferenceWorker(
        engine.load,
        max_batch_size=cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms,
        max_queue=cfg.max_queue,
        on_failure=on_failure,
    )
    metrics = Metrics(worker)
    worker.on_batch = metrics.observe_batch
    keys = resolve_keys(cfg.api_keys, os.environ if env is None else env)
    warn_if_exposed(cfg.host, keys)
    app = FastAPI(  # /docs and /redoc: ours, with local assets (docs.py), not FastAPI's CDN pages
        title="FlagScale Pi0 server",
        version=__version__,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state = ServeState(
        cfg=cfg,
        worker=worker,
        metrics=metrics,
        codecs=engine.codecs,
        fixed_noise=engine.fixed_noise,
        api_keys=keys,
        replica_id=replica_id,
        version=__version__,
        start_token=START_TOKEN,
    )
    _add_routes(app)
    add_docs_routes(app)
    if cfg.openpi:
        add_openpi_route(app)
    _add_error_handlers(app)
    _add_middleware(app, cfg, metrics, keys, replica_id)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """The inference thread (and lerobot's gRPC endpoint) run while the app does."""
    state: ServeState = app.state
    cfg, worker = state.cfg, state.worker
    worker.start()
    lerobot = _start_lerobot_grpc(state) if cfg.lerobot_grpc.enabled else None
    yield
    if lerobot is not None:  # in-flight RPCs get drain_timeout_s, off the event loop
        await run_in_threadpool(lambda: lerobot.stop(cfg.drain_timeout_s).wait())
    # requests are answered or failed by now (drain); a model call still running cannot
    # be interrupted: the process exits without waiting long for it
    await run_in_threadpool(worker.stop, STOP_JOIN_S)


def _add_middleware(app: FastAPI, cfg, metrics, keys, replica_id) -> None:
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


def _start_lerobot_grpc(state):
    """lerobot's async-inference gRPC service (engine.lerobot_grpc); grpcio is imported here."""
    from flagscale.serve import lerobot_grpc

    state.lerobot_grpc = lerobot_grpc.start(state)
    return state.lerobot_grpc


# ---------------------------------------------------------------- routes


def _add_routes(app: FastAPI) -> None:
    state: ServeState = app.state

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD
    async def health():
        body, ok = service.health(state)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.api_route("/healthz", methods=["GET", "HEAD"], response_class=PlainTextResponse)
    async def healthz():
        """openpi's liveness probe: 200 "OK" once the model serves, else 503."""
        ok = service.live(state)
        return PlainTextResponse("OK\n" if ok else "NOT READY\n", status_code=200 if ok else 503)

    @app.get("/info")
    async def info():
        return JSONResponse(service.info(state))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/infer", openapi_extra=INFER_OPENAPI)
    async def infer(request: Request):
        return await _infer(request, state)


def _schema_ref(model) -> dict:
    return {"content": {"application/json": {"schema": model.model_json_schema()}}}


# /infer reads its raw body (bounded size, exact errors); described for OpenAPI clients and fuzzers
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


async def _infer(request: Request, state: ServeState):
    if state.draining:
        raise RequestError(503, DRAINING, {"Connection": "close"})
    state.http_in_flight += 1
    try:
        return await _answer_infer(request, state)
    finally:
        state.http_in_flight -= 1


async def _answer_infer(request: Request, state: ServeState):
    cfg = state.cfg
    start = time.perf_counter()
    policy = state.worker.policy
    if policy is None:
        raise RequestError(503, state.worker.not_ready_message())
    body = await wire.read_body(request, cfg.max_body_bytes, cfg.max_body_mb)
    args = (body, cfg, service.noise_shape(policy), state.fixed_noise, state.codecs)
    if state.codecs.frames is not None and len(body) <= INLINE_PARSE_BYTES:
        # JPEGs are decoded later (image_decoder: gpu): parsing a small body here blocks the loop
        # for ~0.5 ms, less than the hop to a thread costs (0.4 ms less per request, measured)
        batch = wire.parse_and_build(*args)
    else:  # parsing and image decoding off the event loop (a 32 MB body must not block it)
        batch = await run_in_threadpool(wire.parse_and_build, *args)
    preprocess_ms = (time.perf_counter() - start) * 1000.0
    try:
        result = await unless_client_leaves(
            request.receive, service.infer(state, batch, preprocess_ms)
        )
    except ClientGone:  # nobody reads the answer; 499 (client closed request) in the metrics
        raise RequestError(499, "the client closed the connection") from None
    return wire.infer_reply(batch, result.actions, result.job, preprocess_ms, start)


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
