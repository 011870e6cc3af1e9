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
`openpi_prompt_key` is the instruction (engine.instruction when absent). The key `rtc` asks for
real-time chunking (flagscale/serve/rtc.py: an explicit leftover, or {"executed": k,
"inference_delay": d} continuing this connection's last chunk); the reply then has "rtc_guided".
"""

import time
import traceback

import numpy as np

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flagscale.logger import get_logger
from flagscale.serve import msgpack_codec
from flagscale.serve.auth import UNAUTHORIZED, authorized
from flagscale.serve.config import ServeConfig
from flagscale.serve.errors import RequestError
from flagscale.serve.rtc import ConnectionRTC

logger = get_logger("flagscale.serve.openpi")

INTERNAL_ERROR = 1011
POLICY_VIOLATION = 1008
SERVICE_RESTART = 1012  # server restarting: reconnect later
ENDPOINT = "openpi"


def add_openpi_route(app: FastAPI, infer_one) -> None:
    """infer_one(observation, num_steps) -> awaitable (actions [H, A] float32, JobResult)."""
    cfg: ServeConfig = app.state.cfg

    @app.websocket(cfg.openpi_path)
    async def openpi(websocket: WebSocket):
        if not authorized(websocket.headers.get("authorization"), app.state.api_keys):
            await _deny(websocket)
            return
        await websocket.accept()
        await websocket.send_bytes(msgpack_codec.packb(metadata(app)))
        await _serve_connection(websocket, app, infer_one)


async def _deny(websocket: WebSocket) -> None:
    response = JSONResponse({"success": False, "error": UNAUTHORIZED}, status_code=401)
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
    prev_total_ms, rtc = None, ConnectionRTC()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if app.state.draining:  # shutting down: answer nothing new, tell the client to reconnect
            await websocket.close(code=SERVICE_RESTART)
            return
        app.state.ws_in_flight += 1
        try:
            prev_total_ms = await _answer_and_send(
                websocket, message, app, infer_one, prev_total_ms, rtc
            )
        finally:
            app.state.ws_in_flight -= 1
        if prev_total_ms is None:
            return


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
    cfg: ServeConfig = app.state.cfg
    start = time.perf_counter()
    obs, num_steps, rtc_value = await run_in_threadpool(to_observation, data, cfg)
    guide = None if rtc_value is None else rtc.request(rtc_value, cfg)
    preprocess_ms = (time.perf_counter() - start) * 1000.0
    actions, result = await infer_one(obs, num_steps, preprocess_ms, guide)
    rtc.last_chunk = actions
    extra = {} if rtc_value is None else {"rtc_guided": guide is not None}
    return {
        **extra,
        "actions": actions,
        "policy_timing": {
            "infer_ms": result.model_ms,
            "queue_ms": result.queue_ms,
            "preprocess_ms": preprocess_ms,
            "batch_size": result.batch_size,
        },
    }


def _status(error: Exception) -> int:
    return getattr(error, "status", 500)


async def _send_error(websocket: WebSocket, error: Exception) -> None:
    if _status(error) < 500 or getattr(error, "status", None) == 503:
        text = f"{type(error).__name__}: {getattr(error, 'message', error)}"
    else:
        text = "".join(traceback.format_exception(error))
        logger.error("openpi request failed:\n%s", text)
    try:
        await websocket.send_text(text)
        await websocket.close(
            code=INTERNAL_ERROR,
            reason="Internal server error. Traceback included in previous frame.",
        )
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
    images = {}
    for key, slot in cfg.openpi_images.items():
        if key not in flat or slot in images:
            continue
        images[slot] = to_hwc_uint8(key, flat[key], cfg.max_image_side)
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
    if not np.isfinite(array).all():
        raise RequestError(400, f"{key}: contains NaN or infinite values")
    return array


def _prompt(flat: dict, cfg: ServeConfig) -> str:
    value = flat.get(cfg.openpi_prompt_key, cfg.instruction)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        value = str(value)
    if not isinstance(value, str):
        raise RequestError(400, f"{cfg.openpi_prompt_key}: expected a string")
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
