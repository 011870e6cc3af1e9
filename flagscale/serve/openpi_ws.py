"""openpi's websocket policy protocol on the same port as HTTP (route `engine.openpi_path`, "/").

Per connection: check the API key (`Authorization: Api-Key <key>`) before accepting, send the
metadata (msgpack), then per binary frame: msgpack-numpy observation -> the shared inference worker
(same batching and queue limits as POST /infer) -> msgpack reply
{"actions": float32 [action_horizon, action_dim], "server_timing": {"infer_ms", "prev_total_ms"},
"policy_timing": {"infer_ms", "queue_ms", "batch_size"}}. On any error, as openpi's server does: a
text frame with the error (the traceback for unexpected errors), then close code 1011.

Observation mapping (config; wire.to_observation): nested dicts are flattened with "/"
({"images": {"cam_high": x}} -> "images/cam_high"); `openpi_images` maps those keys to model
image slots (uint8 or [0, 1] float, HWC or CHW); the `openpi_state_keys` present are
concatenated and zero-padded to state_dim; `openpi_prompt_key` (else `task`, FlagScale's and
lerobot's name) is the instruction (engine.instruction when both are absent). FlagScale's
websocket clients (run_serve_vla.py) send `observation.images.<slot>`, `observation.state` and
`task`, and read `action`, sent next to `actions`. The key `rtc` asks for real-time chunking
(flagscale/serve/rtc.py: an explicit leftover, or {"executed": k, "inference_delay": d}
continuing this connection's last chunk); the reply then has "rtc_guided".
"""

import asyncio
import time
import traceback

import numpy as np

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flagscale.logger import get_logger
from flagscale.serve import msgpack_codec, service, wire
from flagscale.serve.auth import UNAUTHORIZED, authorized
from flagscale.serve.errors import RequestError, internal_error
from flagscale.serve.rtc import ConnectionRTC
from flagscale.serve.service import ServeState
from flagscale.serve.wire import to_observation

logger = get_logger("flagscale.serve.openpi")

INTERNAL_ERROR = 1011
POLICY_VIOLATION = 1008
SERVICE_RESTART = 1012  # server restarting: reconnect later
ENDPOINT = "openpi"


def add_openpi_route(app: FastAPI) -> None:
    """The websocket route at engine.openpi_path, on the app's ServeState."""
    state: ServeState = app.state

    @app.websocket(state.cfg.openpi_path)
    async def openpi(websocket: WebSocket):
        if not authorized(websocket.headers.get("authorization"), state.api_keys):
            await _deny(websocket)
            return
        if state.draining:
            await _deny(websocket, 503, "server is shutting down (draining); retry later")
            return
        await websocket.accept()
        await websocket.send_bytes(msgpack_codec.packb(metadata(state)))
        await _serve_connection(websocket, state)


async def _deny(websocket: WebSocket, status: int = 401, error: str = UNAUTHORIZED) -> None:
    headers = {"Retry-After": "1"} if status == 503 else None
    response = JSONResponse({"success": False, "error": error}, status_code=status, headers=headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # server without the websocket.http.response extension
        await websocket.close(code=POLICY_VIOLATION)


def metadata(state: ServeState) -> dict:
    cfg = state.cfg
    policy = state.worker.policy
    variant = None if policy is None else policy.metadata.get("model_variant")
    return {
        "server": "flagscale-pi0",
        "version": state.version,
        "model_variant": variant or cfg.model_variant,
        "action_horizon": cfg.action_horizon,
        "action_dim": cfg.action_dim,
        "state_dim": cfg.state_dim,
        "num_steps": cfg.num_steps,
        "image_keys": dict(cfg.openpi_images),
        "state_keys": list(cfg.openpi_state_keys),
        "prompt_key": cfg.openpi_prompt_key,
        "replica_id": state.replica_id,
    }


async def _serve_connection(websocket: WebSocket, state: ServeState) -> None:
    prev_total_ms, early = None, None  # early: a receive() started while answering
    rtc = ConnectionRTC()
    try:
        while True:
            message = await (early or websocket.receive())
            if message["type"] == "websocket.disconnect":
                return
            if state.draining:  # shutting down: answer nothing new, the client reconnects
                await websocket.close(code=SERVICE_RESTART)
                return
            state.ws_in_flight += 1
            try:
                answer = asyncio.ensure_future(
                    _answer_and_send(websocket, message, state, prev_total_ms, rtc)
                )
                early = asyncio.ensure_future(websocket.receive())
                prev_total_ms = await _unless_closed(answer, early)
            finally:
                state.ws_in_flight -= 1
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


async def _answer_and_send(websocket, message, state, prev_total_ms, rtc):
    """Answer one message; returns this request's total ms, or None when the connection ended."""
    start = time.monotonic()
    try:
        reply = await _answer(message, state, rtc)
    except Exception as e:
        state.metrics.observe_request(ENDPOINT, _status(e), time.monotonic() - start)
        await _send_error(websocket, e)
        return None
    reply["server_timing"] = {"infer_ms": (time.monotonic() - start) * 1000.0}
    if prev_total_ms is not None:
        reply["server_timing"]["prev_total_ms"] = prev_total_ms
    try:
        await websocket.send_bytes(msgpack_codec.packb(reply))
    except (WebSocketDisconnect, RuntimeError):
        return None
    state.metrics.observe_request(ENDPOINT, 200, time.monotonic() - start)
    return (time.monotonic() - start) * 1000.0


async def _answer(message: dict, state: ServeState, rtc: ConnectionRTC) -> dict:
    data = message.get("bytes")
    if data is None:
        raise RequestError(400, "expected a binary msgpack frame, got text")
    start = time.perf_counter()
    obs, num_steps, rtc_value = await run_in_threadpool(_prepare, data, state)
    guide = None if rtc_value is None else rtc.request(rtc_value, state.cfg)
    preprocess_ms = (time.perf_counter() - start) * 1000.0
    batch = wire.one_observation(obs, num_steps, guide, state.cfg, state.fixed_noise)
    result = await service.infer(state, batch, preprocess_ms)
    actions = np.asarray(result.actions[0], dtype=np.float32)
    rtc.last_chunk = actions
    guided = None if rtc_value is None else guide is not None
    return wire.openpi_reply(actions, result.job, preprocess_ms, guided)


def _prepare(data: bytes, state: ServeState) -> tuple:
    """In a request thread: decode the message and tokenize its prompt (cached by the policy)."""
    obs, num_steps, rtc_value = to_observation(data, state.cfg)
    state.codecs.warm_prompts([obs["prompt"]])
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
