"""openpi's websocket policy protocol on the same port as HTTP (route `engine.openpi_path`, "/").

Per connection: check the API key (`Authorization: Api-Key <key>`) before accepting, send the
metadata (msgpack), then per binary frame: msgpack-numpy observation -> the shared inference worker
(same batching and queue limits as POST /infer) -> msgpack reply
{"actions": float32 [action_horizon, action_dim], "server_timing": {"infer_ms", "prev_total_ms"},
"policy_timing": {"infer_ms", "queue_ms", "batch_size"}}. On any error, as openpi's server does: a
text frame with the error (the traceback for unexpected errors), then close code 1011.

Observation mapping (config): nested dicts are flattened with "/" ({"images": {"cam_high": x}} ->
"images/cam_high"); `openpi_images` maps those keys to model image slots (uint8 or [0, 1] float,
HWC or CHW); the `openpi_state_keys` present are concatenated and zero-padded to state_dim;
`openpi_prompt_key` (else `task`, FlagScale's and lerobot's name) is the instruction
(engine.instruction when both are absent). FlagScale's websocket clients (run_serve_vla.py) send
`observation.images.<slot>`, `observation.state` and `task`, and read `action`, sent next to
`actions`. The key `rtc` asks for real-time chunking (flagscale/serve/rtc.py: an explicit
leftover, or {"executed": k, "inference_delay": d} continuing this connection's last chunk); the
reply then has "rtc_guided".
"""

import asyncio
import time
import traceback

import numpy as np

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flagscale.logger import get_logger
from flagscale.serve import msgpack_codec
from flagscale.serve.auth import UNAUTHORIZED, authorized
from flagscale.serve.codec import reduce_large
from flagscale.serve.config import ServeConfig
from flagscale.serve.errors import RequestError, check_float32, internal_error
from flagscale.serve.limits import check_prompt_length, warm_prompts
from flagscale.serve.rtc import ConnectionRTC

logger = get_logger("flagscale.serve.openpi")

INTERNAL_ERROR = 1011
POLICY_VIOLATION = 1008
SERVICE_RESTART = 1012  # server restarting: reconnect later
ENDPOINT = "openpi"
TASK_KEY = "task"  # the prompt's key for FlagScale's websocket clients and lerobot


def add_openpi_route(app: FastAPI, infer_one) -> None:
    """infer_one(observation, num_steps) -> awaitable (actions [H, A] float32, JobResult)."""
    cfg: ServeConfig = app.state.cfg

    @app.websocket(cfg.openpi_path)
    async def openpi(websocket: WebSocket):
        if not authorized(websocket.headers.get("authorization"), app.state.api_keys):
            await _deny(websocket)
            return
        if app.state.draining:
            await _deny(websocket, 503, "server is shutting down (draining); retry later")
            return
        await websocket.accept()
        await websocket.send_bytes(msgpack_codec.packb(metadata(app)))
        await _serve_connection(websocket, app, infer_one)


async def _deny(websocket: WebSocket, status: int = 401, error: str = UNAUTHORIZED) -> None:
    headers = {"Retry-After": "1"} if status == 503 else None
    response = JSONResponse({"success": False, "error": error}, status_code=status, headers=headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # server without the websocket.http.response extension
        await websocket.close(code=POLICY_VIOLATION)


def metadata(app: FastAPI) -> dict:
    cfg: ServeConfig = app.state.cfg
    policy = app.state.worker.policy
    variant = None if policy is None else policy.metadata.get("model_variant")
    return {
        "server": "flagscale-pi0",
        "version": app.version,
        "model_variant": variant or cfg.model_variant,
        "action_horizon": cfg.action_horizon,
        "action_dim": cfg.action_dim,
        "state_dim": cfg.state_dim,
        "num_steps": cfg.num_steps,
        "image_keys": dict(cfg.openpi_images),
        "state_keys": list(cfg.openpi_state_keys),
        "prompt_key": cfg.openpi_prompt_key,
        "replica_id": app.state.replica_id,
    }


async def _serve_connection(websocket: WebSocket, app: FastAPI, infer_one) -> None:
    prev_total_ms, early = None, None  # early: a receive() started while answering
    rtc = ConnectionRTC()
    try:
        while True:
            message = await (early or websocket.receive())
            if message["type"] == "websocket.disconnect":
                return
            if app.state.draining:  # shutting down: answer nothing new, the client reconnects
                await websocket.close(code=SERVICE_RESTART)
                return
            app.state.ws_in_flight += 1
            try:
                answer = asyncio.ensure_future(
                    _answer_and_send(websocket, message, app, infer_one, prev_total_ms, rtc)
                )
                early = asyncio.ensure_future(websocket.receive())
                prev_total_ms = await _unless_closed(answer, early)
            finally:
                app.state.ws_in_flight -= 1
            if prev_total_ms is None:
                return
    finally:
        if early is not None:
            early.cancel()
            if early.done() and not early.cancelled():
                early.exception()  # retrieved: a receive after close may have raised


async def _unless_closed(answer: asyncio.Future, early: asyncio.Future):
    """The answer's result; None, with the request cancelled (out of the queue at once), if the
    client closes the connection first. A message the client sends meanwhile stays in `early`."""
    await asyncio.wait((answer, early), return_when=asyncio.FIRST_COMPLETED)
    if not answer.done() and early.result()["type"] == "websocket.disconnect":
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)
        return None
    return await answer


async def _answer_and_send(websocket, message, app, infer_one, prev_total_ms, rtc):
    """Answer one message; returns this request's total ms, or None when the connection ended."""
    start = time.monotonic()
    try:
        reply = await _answer(message, app, infer_one, rtc)
    except Exception as e:
        app.state.metrics.observe_request(ENDPOINT, _status(e), time.monotonic() - start)
        await _send_error(websocket, e)
        return None
    reply["server_timing"] = {"infer_ms": (time.monotonic() - start) * 1000.0}
    if prev_total_ms is not None:
        reply["server_timing"]["prev_total_ms"] = prev_total_ms
    try:
        await websocket.send_bytes(msgpack_codec.packb(reply))
    except (WebSocketDisconnect, RuntimeError):
        return None
    app.state.metrics.observe_request(ENDPOINT, 200, time.monotonic() - start)
    return (time.monotonic() - start) * 1000.0


async def _answer(message: dict, app: FastAPI, infer_one, rtc: ConnectionRTC) -> dict:
    data = message.get("bytes")
    if data is None:
        raise RequestError(400, "expected a binary msgpack frame, got text")
    start = time.perf_counter()
    obs, num_steps, rtc_value = await run_in_threadpool(_prepare, data, app)
    guide = None if rtc_value is None else rtc.request(rtc_value, app.state.cfg)
    preprocess_ms = (time.perf_counter() - start) * 1000.0
    actions, result = await infer_one(obs, num_steps, preprocess_ms, guide)
    rtc.last_chunk = actions
    extra = {} if rtc_value is None else {"rtc_guided": guide is not None}
    return {
        **extra,
        "actions": actions,
        "action": actions,  # FlagScale's websocket server (run_serve_vla.py) sends both
        "policy_timing": {
            "infer_ms": result.model_ms,
            "queue_ms": result.queue_ms,
            "preprocess_ms": preprocess_ms,
            "batch_size": result.batch_size,
        },
    }


def _prepare(data: bytes, app: FastAPI) -> tuple:
    """In a request thread: decode the message and tokenize its prompt (cached by the policy)."""
    obs, num_steps, rtc_value = to_observation(data, app.state.cfg)
    warm_prompts(app.state.codecs, [obs["prompt"]])
    return obs, num_steps, rtc_value


def _status(error: Exception) -> int:
    return getattr(error, "status", 500)


async def _send_error(websocket: WebSocket, error: Exception) -> None:
    """openpi's error reply (a text frame, then close 1011), without the traceback openpi's own
    server sends: it names files and install paths. Our own errors carry their message."""
    if isinstance(error, RequestError):
        text = f"{type(error).__name__}: {error.message}"
    else:
        logger.error("openpi request failed:\n%s", "".join(traceback.format_exception(error)))
        text = internal_error("the request failed", error)
    try:
        await websocket.send_text(text)
        await websocket.close(code=INTERNAL_ERROR, reason="Internal server error.")
    except (WebSocketDisconnect, RuntimeError):
        pass


# ---------------------------------------------------------------- observation mapping


def to_observation(data: bytes, cfg: ServeConfig) -> tuple:
    """msgpack bytes -> (policy observation {"images", "state", "prompt"}, num_steps, the `rtc`
    value or None)."""
    try:
        raw = msgpack_codec.unpackb(data, cfg.max_body_bytes)
    except msgpack_codec.PayloadError as e:
        raise RequestError(400, str(e)) from None
    if not isinstance(raw, dict):
        raise RequestError(400, f"observation must be a map, got {type(raw).__name__}")
    rtc = raw.pop("rtc", None)
    flat = flatten(raw)
    obs = {"images": _images(flat, cfg), "state": _state(flat, cfg), "prompt": _prompt(flat, cfg)}
    return obs, _num_steps(flat, cfg), rtc


def flatten(data: dict, prefix: str = "", depth: int = 0) -> dict:
    if depth > 8:
        raise RequestError(400, "observation is nested too deeply")
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key.decode('utf-8', 'replace') if isinstance(key, bytes) else key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/", depth + 1))
        else:
            flat[name] = value
    return flat


def _images(flat: dict, cfg: ServeConfig) -> dict:
    images, pixels = {}, 0
    for key, slot in cfg.openpi_images.items():
        if key not in flat or slot in images:
            continue
        image = to_hwc_uint8(key, flat[key], cfg.max_image_side)
        pixels += image.shape[0] * image.shape[1]
        if pixels > cfg.max_request_pixels:
            raise RequestError(
                400,
                f"{key}: the observation's images hold more than {cfg.max_request_pixels} pixels "
                "in all (engine.max_request_pixels); send smaller images",
            )
        images[slot] = reduce_large(image)
    if not images:
        raise RequestError(
            400,
            "no image found; expected one of the keys "
            f"{', '.join(cfg.openpi_images)} (engine.openpi_images)",
        )
    return images


def to_hwc_uint8(key: str, value, max_side: int) -> np.ndarray:
    """uint8 (or [0, 1] float) HWC or CHW array -> writable uint8 HWC RGB."""
    if not isinstance(value, np.ndarray) or value.ndim != 3:
        raise RequestError(400, f"{key}: expected a 3-D image array (HWC or CHW)")
    if value.shape[-1] != 3 and value.shape[0] == 3:
        value = np.transpose(value, (1, 2, 0))
    if value.shape[-1] != 3:
        raise RequestError(400, f"{key}: expected 3 color channels, got shape {list(value.shape)}")
    if min(value.shape[:2]) < 1 or max(value.shape[:2]) > max_side:
        raise RequestError(400, f"{key}: image sides must be 1..{max_side} (engine.max_image_side)")
    if value.dtype == np.uint8:
        return np.ascontiguousarray(value).copy()
    if value.dtype.kind != "f" or not np.isfinite(value).all():
        raise RequestError(400, f"{key}: expected uint8 or finite float pixels, got {value.dtype}")
    return (np.clip(value, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _state(flat: dict, cfg: ServeConfig) -> np.ndarray:
    parts = []
    for key in cfg.openpi_state_keys:
        if key in flat:
            parts.append(_numbers(key, flat[key]))
    if not parts:
        keys = ", ".join(cfg.openpi_state_keys)
        raise RequestError(
            400, f"no state found; expected one of {keys} (engine.openpi_state_keys)"
        )
    state = np.concatenate(parts)
    if state.size > cfg.state_dim:
        raise RequestError(
            400, f"state: {state.size} values, more than engine.state_dim={cfg.state_dim}"
        )
    return np.pad(state, (0, cfg.state_dim - state.size)).astype(np.float32)


def _numbers(key: str, value) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RequestError(400, f"{key}: expected numbers") from None
    check_float32(key, array)
    return array


def _prompt(flat: dict, cfg: ServeConfig) -> str:
    value = flat.get(cfg.openpi_prompt_key, flat.get(TASK_KEY, cfg.instruction))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        value = str(value)
    if not isinstance(value, str):
        raise RequestError(400, f"{cfg.openpi_prompt_key}: expected a string")
    check_prompt_length(cfg.openpi_prompt_key, value, cfg)
    return value


def _num_steps(flat: dict, cfg: ServeConfig) -> int:
    value = flat.get("num_steps", cfg.num_steps)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, "num_steps: expected an integer")
    if not 1 <= value <= cfg.max_num_steps:
        raise RequestError(400, f"num_steps: must be in 1..{cfg.max_num_steps}")
    return value
