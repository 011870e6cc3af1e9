"""Real-time chunking on the wire: the `rtc` field of POST /infer and of openpi observations.

Explicit form (HTTP body, or the openpi observation key `rtc`), one object per observation (HTTP:
a list of objects or nulls for a batch):
    {"prev_chunk_left_over": [[...], ...],   # the previous chunk's unexecuted actions, as returned
     "inference_delay": d,                   # actions executed while this request is computed
     "execution_horizon": h}                 # optional: how far guidance reaches (engine.rtc)
Per-connection form (openpi websocket only): {"executed": k, "inference_delay": d} continues from
the chunk this connection received last, of which k actions have been executed; with no such chunk
(a new connection) or nothing left of it, the request runs without guidance.

Checks here are against the config and need no model (400 naming the field); what reaches the
worker is a plain dict per observation (`flagscale.models.pi0.RTCRequest`'s fields) or None.
"""

import numpy as np

from flagscale.serve.config import ServeConfig
from flagscale.serve.errors import RequestError
from flagscale.serve.schemas import to_array

FIELDS = ("prev_chunk_left_over", "inference_delay", "execution_horizon")
CONNECTION_FIELDS = ("executed", "inference_delay", "execution_horizon")


def check_enabled(cfg: ServeConfig, field: str = "rtc") -> None:
    if not cfg.rtc["enabled"]:
        raise RequestError(
            400, f"{field}: real-time chunking is disabled on this server (engine.rtc.enabled)"
        )


def rtc_request(field: str, value, cfg: ServeConfig) -> dict:
    """One explicit-form object -> {"prev_chunk_left_over": float32 [n, action_dim], ...}."""
    chunk = cfg.action_horizon
    if not isinstance(value, dict):
        raise RequestError(400, f"{field}: expected an object with {', '.join(FIELDS[:2])}")
    _unknown(field, value, FIELDS)
    left = _leftover(f"{field}.prev_chunk_left_over", value.get("prev_chunk_left_over"), cfg, chunk)
    return {"prev_chunk_left_over": left, **_delay_and_horizon(field, value, chunk)}


def _unknown(field: str, value: dict, known) -> None:
    extra = [str(k) for k in value if k not in known]
    if extra:
        raise RequestError(400, f"{field}.{extra[0]}: unknown field; expected {', '.join(known)}")


def _leftover(field: str, value, cfg: ServeConfig, chunk: int) -> np.ndarray:
    if value is None:
        raise RequestError(400, f"{field}: field required")
    if isinstance(value, np.ndarray):  # msgpack-numpy
        if value.dtype.kind not in "iuf":
            raise RequestError(400, f"{field}: expected numbers, got a {value.dtype} array")
        array = value.astype(np.float64)
    else:
        try:
            array = to_array(value)
        except ValueError as e:
            raise RequestError(400, f"{field}: {e}") from None
    if array.ndim != 2:
        raise RequestError(
            400, f"{field}: expected [n, {cfg.action_dim}] numbers, got shape {list(array.shape)}"
        )
    rows, cols = array.shape
    if not 1 <= rows <= chunk or cols != cfg.action_dim:
        raise RequestError(
            400,
            f"{field}: expected [n, {cfg.action_dim}] with 1 <= n <= {chunk} "
            f"(engine.action_horizon, engine.action_dim), got {list(array.shape)}",
        )
    if not np.isfinite(array).all():
        raise RequestError(400, f"{field}: contains NaN or infinite values")
    return array.astype(np.float32)


def _int(field: str, value, low: int, high: int) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{field}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise RequestError(400, f"{field}: must be in {low}..{high}, got {value}")
    return value


def _delay_and_horizon(field: str, value: dict, chunk: int) -> dict:
    if value.get("inference_delay") is None:
        raise RequestError(400, f"{field}.inference_delay: field required")
    delay = _int(f"{field}.inference_delay", value["inference_delay"], 0, chunk)
    horizon = value.get("execution_horizon")
    if horizon is not None:
        horizon = _int(f"{field}.execution_horizon", horizon, 1, chunk)
    return {"inference_delay": delay, "execution_horizon": horizon}


def http_requests(value, batch_size: int, cfg: ServeConfig) -> list | None:
    """The /infer `rtc` field -> one dict or None per observation (None: no field)."""
    if value is None:
        return None
    check_enabled(cfg)
    if isinstance(value, dict):
        if batch_size != 1:
            raise RequestError(
                400, f"rtc: {batch_size} observations need a list of {batch_size} rtc objects"
            )
        return [rtc_request("rtc", value, cfg)]
    if not isinstance(value, list) or len(value) != batch_size:
        raise RequestError(
            400, "rtc: expected an object, or a list of one object (or null) per observation"
        )
    return [None if v is None else rtc_request(f"rtc[{i}]", v, cfg) for i, v in enumerate(value)]


class ConnectionRTC:
    """One openpi connection's RTC state: the last chunk sent on it (the per-connection form)."""

    def __init__(self):
        self.last_chunk = None  # float32 [action_horizon, action_dim]

    def request(self, value, cfg: ServeConfig) -> dict | None:
        """The observation's `rtc` value -> a worker dict, or None (run unguided)."""
        check_enabled(cfg)
        if not isinstance(value, dict) or "prev_chunk_left_over" in value:
            return rtc_request("rtc", value, cfg)
        _unknown("rtc", value, CONNECTION_FIELDS)
        if value.get("executed") is None:
            raise RequestError(
                400, "rtc: expected prev_chunk_left_over, or executed (of the last chunk sent here)"
            )
        executed = _int("rtc.executed", value["executed"], 0, cfg.action_horizon)
        parts = _delay_and_horizon("rtc", value, cfg.action_horizon)
        if self.last_chunk is None or executed >= len(self.last_chunk):
            return None
        return {"prev_chunk_left_over": self.last_chunk[executed:], **parts}
