"""The wire: request bodies -> typed batches of observations, model results -> replies.

POST /infer (JSON, FlagScale v1 and v2 bodies, schemas.py) -> `Batch` (`parse_and_build`); openpi
and FlagScale websocket observations (msgpack) -> one observation (`to_observation`); policy
outputs -> the action chunk every transport sends (`cut_actions`), and /infer's JSON reply
(`infer_reply`, `ActionsResponse`). Nothing here touches a transport's connection or the worker:
every check is against the config and answers a RequestError (4xx) naming the field.
"""

import dataclasses
import json
import time

from typing import Any

import numpy as np

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from flagscale.models import names
from flagscale.serve import msgpack_codec
from flagscale.serve.codec import ImageDecodeError, PixelBudget, decode_images, reduce_large
from flagscale.serve.config import ServeConfig
from flagscale.serve.errors import RequestError, check_float32
from flagscale.serve.limits import check_prompt_length
from flagscale.serve.rtc import http_requests as rtc_requests
from flagscale.serve.schemas import InferRequest, Timing, describe_validation_error

try:
    import orjson
except ImportError:  # optional: the standard library renders the same JSON, slower
    orjson = None

V2_IMAGE_PREFIX = "observation.images."
# bodies above this are counted before parsing and parsed by the standard library (lean)
LEAN_PARSE_BYTES = 1 << 20
TASK_KEY = "task"  # the prompt's key for FlagScale's websocket clients and lerobot


# ---------------------------------------------------------------- POST /infer bodies


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


def parse_and_build(body: bytes, cfg, noise_shape, fixed_noise, codecs) -> "Batch":
    request = parse_request(body, cfg.max_json_values)
    batch = build_batch(request, cfg, noise_shape, fixed_noise, codecs.images)
    codecs.warm_prompts([obs["prompt"] for obs in batch.observations])
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


def check_num_steps(steps: int, cfg: ServeConfig) -> int:
    """A request's num_steps: 1..engine.max_num_steps, else 400 naming both."""
    try:
        return names.check_num_steps(steps, cfg.max_num_steps, "num_steps", "engine.max_num_steps")
    except ValueError as e:
        raise RequestError(400, str(e)) from None


def _num_steps(req: InferRequest, cfg: ServeConfig) -> int:
    return check_num_steps(cfg.num_steps if req.num_steps is None else req.num_steps, cfg)


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


def one_observation(obs: dict, num_steps: int, rtc, cfg: ServeConfig, fixed_noise) -> Batch:
    """One observation of a streaming transport (openpi, lerobot gRPC) as a batch; noise as for
    /infer without request noise or seed: engine.fixed_noise > engine.seed > random."""
    seed = cfg.seed if fixed_noise is None else None
    return Batch([obs], [fixed_noise], [seed], num_steps, None, [rtc])


def infer_reply(
    batch: Batch, actions: np.ndarray, job, preprocess_ms: float, start: float
) -> ActionsResponse:
    """POST /infer's 200 reply: InferResponse's fields, built directly (no per-float validation).
    `job`: the worker's JobResult; `start`: perf_counter() when the request was read."""
    timing = Timing(
        queue_ms=job.queue_ms,
        preprocess_ms=preprocess_ms,
        model_ms=job.model_ms,
        total_ms=(time.perf_counter() - start) * 1000.0,
        batch_size=job.batch_size,
    )
    body = {
        "success": True,
        "actions": actions,
        "qpos": actions,  # same values: v1 clients read the actions from `qpos`
        "num_steps": batch.num_steps,
        "seed": batch.echo_seed,
        "timing": timing.model_dump(exclude_none=True),
        "rtc_guided": None if batch.rtc is None else [r is not None for r in batch.rtc],
    }
    return ActionsResponse({k: v for k, v in body.items() if v is not None})


def openpi_reply(actions: np.ndarray, result, preprocess_ms: float, rtc_guided) -> dict:
    """An openpi reply (server_timing is added by the transport); `action` too, as FlagScale's
    websocket server (run_serve_vla.py) sends both. rtc_guided: None when no `rtc` was asked."""
    extra = {} if rtc_guided is None else {"rtc_guided": rtc_guided}
    return {
        **extra,
        "actions": actions,
        "action": actions,
        "policy_timing": {
            "infer_ms": result.model_ms,
            "queue_ms": result.queue_ms,
            "preprocess_ms": preprocess_ms,
            "batch_size": result.batch_size,
        },
    }


# ---------------------------------------------------------- openpi and FlagScale websocket frames


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
    obs = {
        "images": _obs_images(flat, cfg),
        "state": _obs_state(flat, cfg),
        "prompt": _obs_prompt(flat, cfg),
    }
    return obs, _obs_num_steps(flat, cfg), rtc


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


def _obs_images(flat: dict, cfg: ServeConfig) -> dict:
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


def _obs_state(flat: dict, cfg: ServeConfig) -> np.ndarray:
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


def _obs_prompt(flat: dict, cfg: ServeConfig) -> str:
    value = flat.get(cfg.openpi_prompt_key, flat.get(TASK_KEY, cfg.instruction))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        value = str(value)
    if not isinstance(value, str):
        raise RequestError(400, f"{cfg.openpi_prompt_key}: expected a string")
    check_prompt_length(cfg.openpi_prompt_key, value, cfg)
    return value


def _obs_num_steps(flat: dict, cfg: ServeConfig) -> int:
    value = flat.get("num_steps", cfg.num_steps)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, "num_steps: expected an integer")
    return check_num_steps(value, cfg)
