"""Serve config: the `serve` section (`engine` + legacy `generate`) as a validated dataclass.

Import-light on purpose (no torch): the launcher calls `load_serve_config` for pre-flight checks.
Every problem raises one `ConfigError` naming the key, e.g.
"serve.engine.num_steps: must be in 1..100 (serve.engine.max_num_steps), got 200".
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from pathlib import Path
from typing import Any, Mapping

from flagscale.logger import get_logger
from flagscale.models.names import (
    DTYPE_NAMES,
    IMAGE_SLOTS,
    MODEL_VARIANTS,
    PRESET_VARIANTS,
    TOKENIZER_FILES,
    check_num_steps,
)
from flagscale.ops import TRUE_STRINGS, flaggems_requested, is_true

logger = get_logger("flagscale.serve.config")

DEFAULT_CAMERAS = {
    "cam_high": "base_0_rgb",
    "cam_left_wrist": "left_wrist_0_rgb",
    "cam_right_wrist": "right_wrist_0_rgb",
}
# openpi observation key (nested dicts flattened with "/") -> model image slot. Covers openpi's
# LIBERO, DROID and ALOHA example layouts; several keys may feed one slot (different robots).
DEFAULT_OPENPI_IMAGES = {
    "observation/image": "base_0_rgb",
    "observation/wrist_image": "left_wrist_0_rgb",
    "observation/exterior_image_1_left": "base_0_rgb",
    "observation/wrist_image_left": "left_wrist_0_rgb",
    "images/cam_high": "base_0_rgb",
    "images/cam_left_wrist": "left_wrist_0_rgb",
    "images/cam_right_wrist": "right_wrist_0_rgb",
    # FlagScale's websocket server (run_serve_vla.py) and lerobot: the model's own feature names
    "observation.images.base_0_rgb": "base_0_rgb",
    "observation.images.left_wrist_0_rgb": "left_wrist_0_rgb",
    "observation.images.right_wrist_0_rgb": "right_wrist_0_rgb",
}
# openpi state keys, in order; those present are concatenated (DROID: joint + gripper position).
DEFAULT_OPENPI_STATE = (
    "observation/state",
    "state",
    "observation.state",
    "observation/joint_position",
    "observation/gripper_position",
)
PRESETS = tuple(PRESET_VARIANTS)
DEMO_PRESETS = {"pi0": "tiny", "pi0.5": "pi05_tiny"}
# config.json "type" / "model_variant" -> variant (lerobot writes "pi0" / "pi05")
CHECKPOINT_TYPES = {"pi0": "pi0", "pi05": "pi0.5", "pi0.5": "pi0.5"}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
OPS_BACKENDS = ("native", "flaggems")

# FlagScale v1 keys that are accepted so old YAMLs load, but do nothing here.
V1_UNUSED_ENGINE_KEYS = ("loader", "results_path", "output_format", "transformations")
# v1 `generate` block: only action_dim / action_horizon are used (as fallbacks for engine keys).
GENERATE_KEYS = (
    "images_keys",
    "images_shape",
    "batch_size",
    "action_dim",
    "action_horizon",
    "state_key",
    "instruction",
)
SERVE_KEYS = ("engine", "generate")
# engine.rtc: real-time chunking (flagscale.models.pi0.rtc.RTCConfig; lerobot's defaults)
RTC_DEFAULTS = {
    "enabled": True,
    "prefix_attention_schedule": "LINEAR",
    "max_guidance_weight": 10.0,
    "execution_horizon": 10,
    "gradient": "lerobot",
}
RTC_SCHEDULES = ("LINEAR", "EXP", "ONES", "ZEROS")
RTC_GRADIENTS = ("lerobot", "vjp")

_REFUSED_DTYPES = ("float16", "fp16", "half", "float64", "fp64", "double")
_FALSE = ("0", "false", "no", "off")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")

# SIGTERM -> exit takes at most engine.drain_timeout_s plus this (shutdown and the inference
# thread's join, run_serve_pi0.py): the launcher's default stop_timeout
DRAIN_MARGIN_S = 10.0

_warned_unused = set()


class ConfigError(ValueError):
    """A serve config value is missing, unknown or out of range (the message names the key)."""


def _key(parse, default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **kwargs):
    """A config key, declared once: its parser `parse(key, value)` (type and range; returns what
    the field holds) and its default (or default factory). The parser tables are read off the
    fields."""
    return dataclasses.field(
        default=default, default_factory=factory, metadata={"parse": parse}, **kwargs
    )


def load_serve_config(source, env: Mapping[str, str] | None = None) -> ServeConfig:
    """Build a validated ServeConfig.

    source: a path to a YAML file (a resolved full config with top-level `serve`, or the serve
    task file itself), a dict (either form), an OmegaConf DictConfig, or a ServeConfig.
    env: environment used for USE_FLAGGEMS (default os.environ).
    """
    if isinstance(source, ServeConfig):
        return source
    data = _to_plain(source)
    serve = data["serve"] if isinstance(data, Mapping) and "serve" in data else data
    return parse_serve_section(serve, os.environ if env is None else env)


def parse_serve_section(serve, env: Mapping[str, str]) -> ServeConfig:
    if isinstance(serve, list):  # FlagScale's current form: - serve_id: ... engine_args: {...}
        from flagscale.serve.flagscale_compat import parse_list_form

        return parse_list_form(serve, env)
    if not isinstance(serve, Mapping):
        raise ConfigError(
            "serve: expected a mapping with an 'engine' block, or a list with one "
            f"'- serve_id: ... engine_args: ...' entry, got {type(serve).__name__}"
        )
    _check_known("serve", serve, SERVE_KEYS)
    engine = serve.get("engine")
    if not isinstance(engine, Mapping):
        raise ConfigError("serve.engine: missing or not a mapping")
    generate = serve.get("generate") or {}
    if not isinstance(generate, Mapping):
        raise ConfigError("serve.generate: expected a mapping")
    _check_known("serve.engine", engine, ENGINE_KEYS)
    _check_known("serve.generate", generate, GENERATE_KEYS)
    _warn_unused(engine, generate)
    values = _engine_values(dict(engine), generate, env)
    cfg = ServeConfig(**values)
    _check_cross_fields(cfg)
    return cfg


# ---------------------------------------------------------------- loading


def _to_plain(source):
    if isinstance(source, (str, Path)):
        return _read_yaml(Path(source))
    if type(source).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(source, resolve=True)
    if isinstance(source, (Mapping, list)):
        return source
    raise ConfigError(
        f"config: expected a path, a mapping, a list or a ServeConfig, got {type(source).__name__}"
    )


def _read_yaml(path: Path):
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
    if not isinstance(data, (Mapping, list)):
        raise ConfigError(f"config file {path}: expected a mapping or a list at the top level")
    return data


def _check_known(where: str, data: Mapping, known) -> None:
    for key in data:
        if key in known:
            continue
        hint = difflib.get_close_matches(str(key), known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"{where}.{key}: unknown key{suggestion}")


def _warn_unused(engine: Mapping, generate: Mapping) -> None:
    unused = [f"engine.{k}" for k in V1_UNUSED_ENGINE_KEYS if k in engine]
    unused += [f"generate.{k}" for k in generate if k not in ("action_dim", "action_horizon")]
    new = [k for k in unused if k not in _warned_unused]
    if new:
        _warned_unused.update(new)
        logger.warning(
            "serve config: accepted for FlagScale v1 compatibility and ignored: %s", ", ".join(new)
        )


# ---------------------------------------------------------------- field parsing


PATH_KEYS = {"model": "directory", "tokenizer": "directory", "stat_path": "file",
             "fixed_noise": "file"}  # fmt: skip


def _check_paths_exist(engine: Mapping) -> None:
    """Every missing directory or file in one message, not one per start."""
    missing = []
    for key, kind in PATH_KEYS.items():
        value = engine.get(key)
        if value is None or (key == "model" and is_true(engine.get("random_init"))):
            continue
        path = Path(str(value)).expanduser()
        if not (path.is_dir() if kind == "directory" else path.is_file()):
            missing.append(f"serve.engine.{key}: {kind} not found: {path}")
    if missing:
        raise ConfigError("; ".join(missing))


def _engine_values(engine: dict, generate: Mapping, env: Mapping[str, str]) -> dict:
    for key in ("action_dim", "action_horizon"):
        if engine.get(key) is None and generate.get(key) is not None:
            engine[key] = generate[key]
    if engine.get("state_dim") is None and generate.get("action_dim") is not None:
        engine["state_dim"] = generate["action_dim"]  # v1: generate.action_dim is the state dim too
    _check_paths_exist(engine)
    defaults = ServeConfig()
    out = {}
    for name in ENGINE_KEYS:
        value = engine.get(name)
        out[name] = getattr(defaults, name) if value is None else value
    for name in ENGINE_KEYS:
        if engine.get(name) is not None and name in _PARSERS:
            out[name] = _PARSERS[name](f"serve.engine.{name}", out[name])
    if flaggems_requested(env):
        out["ops"] = "flaggems"
    return out


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + _FALSE:
        return is_true(value)
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _as_auto_bool(key: str, value) -> str:
    """ "auto", or true/false spelled any way _as_bool accepts -> "auto" | "true" | "false"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return "true" if _as_bool(key, value) else "false"


def _as_int(key: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    _check_range(key, value, lo, hi)
    return value


def _as_float(key: str, value, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    _check_range(key, number, lo, hi)
    return number


def _check_range(key: str, value, lo, hi) -> None:
    if hi is None and lo is not None and value < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}: must be in {lo}..{hi}, got {value}")


def _as_str(key: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _as_text(key: str, value) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _as_choice(key: str, value, choices) -> str:
    text = _as_str(key, value).lower()
    if text not in choices:
        hint = difflib.get_close_matches(text, choices, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}{suggestion}")
    return text


def _as_dtype(key: str, value) -> str:
    text = _as_str(key, str(value)).lower().removeprefix("torch.")
    if text in _REFUSED_DTYPES:
        raise ConfigError(f"{key}: {value!r} is not supported (use bfloat16 or float32)")
    if text not in DTYPE_NAMES:
        raise ConfigError(f"{key}: unknown dtype {value!r} (use bfloat16 or float32)")
    return DTYPE_NAMES[text]


def _as_device(key: str, value) -> str:
    text = _as_str(key, str(value)).lower()
    if not _DEVICE_RE.match(text):
        raise ConfigError(f"{key}: expected cpu, cuda or cuda:N, got {value!r}")
    return text


def _as_cameras(key: str, value) -> dict:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{key}: expected a non-empty mapping of camera name -> image slot")
    cameras = {}
    for name, slot in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: camera names must be non-empty strings, got {name!r}")
        _check_slot(f"{key}.{name}", slot)
        if slot in cameras.values():
            raise ConfigError(f"{key}.{name}: slot {slot!r} is already used by another camera")
        cameras[name] = slot
    return cameras


def _as_dir(key: str, value) -> str:
    path = Path(_as_str(key, str(value))).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}: directory not found: {path}")
    return str(path)


def _as_file(key: str, value) -> str:
    path = Path(_as_str(key, str(value))).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    return str(path)


def _as_noise_file(key: str, value) -> str:
    path = _as_file(key, value)
    if not path.endswith(".npy"):
        raise ConfigError(f"{key}: expected a .npy file (chunk_size x max_action_dim), got {path}")
    import numpy as np

    try:
        noise = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    if noise.ndim != 2 or noise.dtype.kind != "f":
        raise ConfigError(
            f"{key}: expected a 2-D float array (chunk_size x max_action_dim), "
            f"got shape {noise.shape} dtype {noise.dtype}"
        )
    return path


def _as_seed(key: str, value) -> int:
    return _as_int(key, value, 0, 2**63 - 1)


@dataclasses.dataclass(frozen=True)
class LerobotGrpcConfig:
    """`engine.lerobot_grpc`: lerobot's async-inference gRPC service (see lerobot_grpc.py)."""

    enabled: bool = _key(_as_bool, False)
    # None: engine.host
    host: str | None = _key(_as_str, None)
    port: int = _key(lambda k, v: _as_int(k, v, 0, 65535), 8080)
    # robot camera -> slot
    cameras: Mapping[str, str] = _key(lambda k, v: _as_cameras(k, v) if v else {}, factory=dict)
    # returned action i is stamped observation timestamp + i / fps
    fps: float = _key(lambda k, v: _as_float(k, v, 0.1, 10000.0), 30.0)
    # GetActions waits this long for an observation
    obs_queue_timeout_s: float = _key(lambda k, v: _as_float(k, v, 0.01, 60.0), 2.0)
    # one observation, all its chunks together
    max_message_mb: float = _key(lambda k, v: _as_float(k, v, 0.001, 4096.0), 32.0)
    # robots (gRPC peers) with state kept; the least recent is dropped
    max_robots: int = _key(lambda k, v: _as_int(k, v, 1, 1024), 16)


LEROBOT_GRPC_KEYS = tuple(f.name for f in dataclasses.fields(LerobotGrpcConfig))
_LEROBOT_GRPC_PARSERS = {f.name: f.metadata["parse"] for f in dataclasses.fields(LerobotGrpcConfig)}


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    host: str = _key(_as_str, "127.0.0.1")
    port: int = _key(lambda k, v: _as_int(k, v, 1, 65535), 9010)
    model: str | None = _key(_as_str, None)
    tokenizer: str | None = _key(lambda k, v: _check_tokenizer_dir(k, _as_dir(k, v)), None)
    stat_path: str | None = _key(_as_file, None)
    device: str = _key(_as_device, "cuda")
    torch_dtype: str = _key(_as_dtype, "bfloat16")
    preset: str | None = _key(lambda k, v: _as_choice(k, v, PRESETS), None)
    # pi0 | pi0.5; None: from the checkpoint (or the preset)
    model_variant: str | None = _key(lambda k, v: _as_choice(k, v, MODEL_VARIANTS), None)
    # {STATE | ACTION: mode} over config.json's normalization_mapping; {} = the checkpoint's
    normalization_mapping: Mapping[str, str] = _key(
        lambda k, v: _as_norm_mapping(k, v), factory=dict
    )
    random_init: bool = _key(_as_bool, False)
    ops: str = _key(lambda k, v: _as_choice(k, v, OPS_BACKENDS), "native")
    num_steps: int = _key(lambda k, v: _as_int(k, v, 1), 10)
    max_num_steps: int = _key(lambda k, v: _as_int(k, v, 1, 1000), 100)
    cameras: Mapping[str, str] = _key(_as_cameras, factory=lambda: dict(DEFAULT_CAMERAS))
    state_dim: int = _key(lambda k, v: _as_int(k, v, 1, 1024), 14)
    action_dim: int = _key(lambda k, v: _as_int(k, v, 1, 1024), 14)
    action_horizon: int = _key(lambda k, v: _as_int(k, v, 1, 4096), 50)
    instruction: str = _key(_as_text, "Grab the orange and put it into the basket.")
    seed: int | None = _key(_as_seed, None)
    deterministic: bool = _key(_as_bool, False)
    fixed_noise: str | None = _key(_as_noise_file, None)
    max_batch_size: int = _key(lambda k, v: _as_int(k, v, 1, 256), 8)
    batch_buckets: tuple = _key(lambda k, v: _as_buckets(k, v), ())
    max_graphs: int = _key(lambda k, v: _as_int(k, v, 1, 4096), 64)
    max_wait_ms: float = _key(lambda k, v: _as_float(k, v, 0.0, 1000.0), 0.0)
    max_queue: int = _key(lambda k, v: _as_int(k, v, 1, 100000), 64)
    max_body_mb: float = _key(lambda k, v: _as_float(k, v, 0.001, 4096.0), 32.0)
    max_image_side: int = _key(lambda k, v: _as_int(k, v, 16, 65536), 4096)
    image_decoder: str = _key(lambda k, v: _as_choice(k, v, ("cpu", "gpu")), "cpu")
    cuda_graphs: bool = _key(_as_bool, True)
    compile: bool = _key(_as_bool, False)
    fused_kernels: str = _key(lambda k, v: _as_auto_bool(k, v), "auto")
    persistent_layers: bool = _key(_as_bool, True)
    precision: str = _key(lambda k, v: _as_choice(k, v, ("bf16", "fp8")), "bf16")
    warmup: bool = _key(_as_bool, True)
    warmup_num_steps: tuple = _key(lambda k, v: _as_steps_list(k, v), ())
    image_pad: str = _key(lambda k, v: _as_choice(k, v, ("center", "top_left")), "center")
    flaggems_cache_dir: str | None = _key(_as_str, None)
    uvicorn_log_level: str = _key(lambda k, v: _as_choice(k, v, LOG_LEVELS), "warning")
    access_log: bool = _key(_as_bool, True)
    openpi: bool = _key(_as_bool, True)
    openpi_path: str = _key(lambda k, v: _as_route(k, v), "/")
    openpi_images: Mapping[str, str] = _key(
        lambda k, v: _as_openpi_images(k, v), factory=lambda: dict(DEFAULT_OPENPI_IMAGES)
    )
    openpi_state_keys: tuple = _key(
        lambda k, v: _as_str_list(k, v, allow_empty=False), DEFAULT_OPENPI_STATE
    )
    openpi_prompt_key: str = _key(_as_str, "prompt")
    api_keys: tuple = _key(lambda k, v: _as_api_keys(k, v), default=(), repr=False)
    cors_allow_origins: tuple = _key(lambda k, v: _as_str_list(k, v, allow_empty=True), ())
    drain_timeout_s: float = _key(lambda k, v: _as_float(k, v, 0.0, 3600.0), 10.0)
    infer_timeout_s: float = _key(lambda k, v: _as_float(k, v, 0.1, 86400.0), 120.0)
    lerobot_grpc: LerobotGrpcConfig = _key(
        lambda k, v: _as_lerobot_grpc(k, v), factory=LerobotGrpcConfig
    )
    max_prompt_chars: int = _key(lambda k, v: _as_int(k, v, 1, 1_000_000), 2048)
    max_request_pixels: int = _key(lambda k, v: _as_int(k, v, 256, 2**40), 4096 * 4096)
    decode_threads: int | None = _key(lambda k, v: _as_int(k, v, 1, 256), None)
    header_timeout_s: float = _key(lambda k, v: _as_float(k, v, 0.05, 3600.0), 10.0)
    body_timeout_s: float = _key(lambda k, v: _as_float(k, v, 0.05, 3600.0), 30.0)
    max_connections: int = _key(lambda k, v: _as_int(k, v, 1, 1_000_000), 512)
    max_header_kb: float = _key(lambda k, v: _as_float(k, v, 1.0, 65536.0), 64.0)
    max_json_values: int = _key(lambda k, v: _as_int(k, v, 1000, 2**31), 1_000_000)
    rtc: Mapping[str, Any] = _key(lambda k, v: _as_rtc(k, v), factory=lambda: dict(RTC_DEFAULTS))
    # v1 keys kept only so old YAMLs load
    loader: str | None = None
    results_path: str | None = None
    output_format: str | None = None
    transformations: Any = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["cameras"] = dict(self.cameras)
        out["openpi_images"] = dict(self.openpi_images)
        out["rtc"] = dict(self.rtc)
        out["api_keys"] = ["<redacted>"] * len(self.api_keys)  # never written to logs or files
        return out


ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(ServeConfig))
# each key's parser (its type and range), from the fields
_PARSERS = {f.name: f.metadata["parse"] for f in dataclasses.fields(ServeConfig) if f.metadata}


def _as_rtc(key: str, value) -> dict:
    """engine.rtc: a mapping of RTC_DEFAULTS' keys; missing keys keep their defaults."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping with keys {', '.join(RTC_DEFAULTS)}")
    _check_known(key, value, tuple(RTC_DEFAULTS))
    out = dict(RTC_DEFAULTS)
    for name, given in value.items():
        if given is not None:
            out[name] = _RTC_PARSERS[name](f"{key}.{name}", given)
    return out


def _as_guidance_weight(key: str, value) -> float:
    weight = _as_float(key, value, 0.0, 1e6)
    if weight == 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    return weight


_RTC_PARSERS = {
    "enabled": _as_bool,
    "prefix_attention_schedule": lambda k, v: _as_choice(
        k, v, tuple(s.lower() for s in RTC_SCHEDULES)
    ).upper(),
    "max_guidance_weight": _as_guidance_weight,
    "execution_horizon": lambda k, v: _as_int(k, v, 1, 4096),
    "gradient": lambda k, v: _as_choice(k, v, RTC_GRADIENTS),
}


# flagscale.models.pi0.normalize.NORM_MODES (that module imports torch)
NORM_MODES = ("MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY")


def _as_norm_mapping(key: str, value) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, e.g. {{STATE: MEAN_STD, ACTION: MEAN_STD}}")
    out = {}
    for feature, mode in value.items():
        name = _as_choice(key, feature, ("state", "action")).upper()
        modes = tuple(m.lower() for m in NORM_MODES)
        out[name] = _as_choice(f"{key}.{feature}", mode, modes).upper()
    return out


def _as_lerobot_grpc(key: str, value) -> LerobotGrpcConfig:
    if isinstance(value, LerobotGrpcConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, e.g. {{enabled: true, port: 8080}}")
    _check_known(key, value, LEROBOT_GRPC_KEYS)
    parsed = {
        name: _LEROBOT_GRPC_PARSERS[name](f"{key}.{name}", item)
        for name, item in value.items()
        if item is not None
    }
    return LerobotGrpcConfig(**parsed)


def _as_str_list(key: str, value, allow_empty: bool) -> tuple:
    if isinstance(value, str) or not hasattr(value, "__iter__") or isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    items = tuple(_as_str(f"{key}[{i}]", v) for i, v in enumerate(value))
    if not items and not allow_empty:
        raise ConfigError(f"{key}: must not be empty")
    return items


def _as_api_keys(key: str, value) -> tuple:
    keys = _as_str_list(key, value, allow_empty=True)
    for i, item in enumerate(keys):
        check_api_key(f"{key}[{i}]", item)
    return keys


def check_api_key(where: str, key: str) -> None:
    """At least 8 printable ASCII characters, no spaces or commas: an HTTP header carries no
    other characters (a key with others could never match), and PI0_API_KEYS is comma-separated."""
    if len(key) < 8 or not all("!" <= c <= "~" and c != "," for c in key):
        raise ConfigError(
            f"{where}: an API key needs at least 8 printable ASCII characters, without spaces "
            "or commas"
        )


def _as_route(key: str, value) -> str:
    text = _as_str(key, value)
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", text):
        raise ConfigError(f"{key}: expected a URL path starting with '/', got {value!r}")
    if text in ("/infer", "/health", "/healthz", "/info", "/metrics"):
        raise ConfigError(f"{key}: {text} is already an HTTP route")
    return text


def _check_slot(key: str, slot) -> None:
    if slot not in IMAGE_SLOTS:
        raise ConfigError(
            f"{key}: unknown image slot {slot!r}; must be one of {', '.join(IMAGE_SLOTS)}"
        )


def _as_openpi_images(key: str, value) -> dict:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{key}: expected a non-empty mapping of openpi key -> image slot")
    images = {}
    for name, slot in value.items():
        if not isinstance(name, str) or not name.strip("/"):
            raise ConfigError(f"{key}: keys must be non-empty strings, got {name!r}")
        _check_slot(f"{key}.{name}", slot)
        images[name.strip("/")] = slot
    return images


def _is_scalar(value) -> bool:
    return isinstance(value, (int, str)) or not hasattr(value, "__iter__")


def _as_steps_list(key: str, value) -> tuple:
    if value is None:
        return ()
    return tuple(_as_int(key, v, 1, 1000) for v in ([value] if _is_scalar(value) else value))


def _as_buckets(key: str, value) -> tuple:
    if value is None:
        return ()
    if _is_scalar(value):
        raise ConfigError(
            f"{key}: expected a list of batch sizes, e.g. [1, 2, 4, 8], got {value!r}"
        )
    return tuple(sorted({_as_int(f"{key}[{i}]", v, 1, 256) for i, v in enumerate(value)}))


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _check_tokenizer_dir(key: str, path: str) -> str:
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}: no {', '.join(TOKENIZER_FILES)} in {path}")
    return path


def _check_checkpoint(cfg: ServeConfig) -> None:
    if cfg.model is None:
        raise ConfigError(
            "serve.engine.model: required when random_init is false "
            "(a directory with config.json + model.safetensors)"
        )
    model = Path(_as_dir("serve.engine.model", cfg.model))
    if not (model / "config.json").is_file():
        raise ConfigError(f"serve.engine.model: no config.json in {model}")
    if not any((model / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"serve.engine.model: no {' or '.join(WEIGHT_FILES)} in {model}")
    if cfg.tokenizer is None and not any((model / n).is_file() for n in TOKENIZER_FILES):
        raise ConfigError(
            f"serve.engine.tokenizer: required, {model} has no tokenizer "
            "(a google/paligemma-3b-pt-224 directory)"
        )


def _check_stats(cfg: ServeConfig) -> None:
    """Read engine.stat_path as the server will; every stat of the state must have state_dim
    values, of the action at least action_dim (whatever normalization mode the model uses)."""
    from flagscale.models.pi0.normalize import StatsError, read_stats_file

    try:
        raw = read_stats_file(cfg.stat_path)
    except (OSError, StatsError) as e:
        raise ConfigError(f"serve.engine.stat_path: {e}") from None
    checks = (("state", raw.state, cfg.state_dim), ("action", raw.action, cfg.action_dim))
    for (what, stats, want), feature in zip(checks, raw.features):
        for key, values in stats.items():
            n = values.shape[0]
            if n != want if what == "state" else n < want:
                raise ConfigError(
                    f"serve.engine.stat_path: stats file {cfg.stat_path}, feature {feature!r}, "
                    f"key {key!r}: {n} values, but serve.engine.{what}_dim is {want}"
                )
        lengths = {k: v.shape[0] for k, v in stats.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"serve.engine.stat_path: stats file {cfg.stat_path}, feature {feature!r}: "
                f"its stats differ in length {lengths}"
            )


def demo_preset(cfg: ServeConfig) -> str:
    """The preset of a random_init server: engine.preset, else the variant's tiny demo preset."""
    return cfg.preset or DEMO_PRESETS[cfg.model_variant or "pi0"]


def _check_variant(cfg: ServeConfig) -> None:
    """engine.model_variant against the preset (random_init) or the checkpoint's config.json
    (its "type"; openpi's converter writes none: the tensors are checked at load)."""
    if cfg.model_variant is None:
        return
    key = "serve.engine.model_variant"
    if cfg.random_init:
        found, where = PRESET_VARIANTS[demo_preset(cfg)], f"preset {demo_preset(cfg)!r}"
    else:
        found, where = _checkpoint_variant(Path(cfg.model) / "config.json")
    if found is not None and found != cfg.model_variant:
        raise ConfigError(
            f"{key}: {cfg.model_variant} does not match {where}, a {found} policy; set "
            f"{key}: {found} (or leave it out: auto)"
        )


def _checkpoint_variant(path: Path):
    import json

    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"serve.engine.model: cannot read {path}: {e}") from None
    for name in ("model_variant", "type"):
        value = str(raw.get(name, "")).lower() if isinstance(raw, dict) else ""
        if value in CHECKPOINT_TYPES:
            return CHECKPOINT_TYPES[value], f"{path} ({name}: {raw[name]})"
    return None, str(path)


def _check_cross_fields(cfg: ServeConfig) -> None:
    if not cfg.random_init:
        _check_checkpoint(cfg)
    _check_variant(cfg)
    if cfg.stat_path is not None:
        _check_stats(cfg)
    if cfg.random_init and cfg.model is not None:
        logger.warning("serve.engine.model is ignored because random_init is true")
    try:
        check_num_steps(
            cfg.num_steps, cfg.max_num_steps, "serve.engine.num_steps", "serve.engine.max_num_steps"
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    too_big = [b for b in cfg.batch_buckets if b > cfg.max_batch_size]
    if too_big:
        raise ConfigError(
            f"serve.engine.batch_buckets: {too_big} exceed max_batch_size {cfg.max_batch_size}"
        )
    _check_cuda_only(cfg)
    if cfg.precision == "fp8" and cfg.ops != "native":
        # FP8 lives in the native ops' long-input path; FlagGems' prefix would run without it
        raise ConfigError(
            f"serve.engine.precision: fp8 needs native ops (serve.engine.ops is {cfg.ops!r}); "
            "use bf16, or ops: native"
        )
    if cfg.host in ("", "*"):
        raise ConfigError(f"serve.engine.host: invalid bind address {cfg.host!r}")
    _check_lerobot_grpc(cfg)
    if cfg.openpi_prompt_key in cfg.openpi_state_keys:
        raise ConfigError("serve.engine.openpi_prompt_key: also listed in openpi_state_keys")


def _check_cuda_only(cfg: ServeConfig) -> None:
    """Settings that only a CUDA device can honour, refused before anything starts."""
    if cfg.device.startswith("cuda"):
        return
    cuda_only = {
        "image_decoder": (cfg.image_decoder == "gpu", "gpu", "cpu"),
        "fused_kernels": (cfg.fused_kernels == "true", "true", "auto or false"),
        "precision": (cfg.precision == "fp8", "fp8", "bf16"),
    }
    for key, (asked, value, instead) in cuda_only.items():
        if asked:
            raise ConfigError(
                f"serve.engine.{key}: {value} needs a CUDA device (serve.engine.device is "
                f"{cfg.device!r}); use {instead}"
            )


def _check_lerobot_grpc(cfg: ServeConfig) -> None:
    grpc = cfg.lerobot_grpc
    if not grpc.enabled:
        return
    if grpc.port == cfg.port and (grpc.host or cfg.host) == cfg.host:
        raise ConfigError(
            f"serve.engine.lerobot_grpc.port: {grpc.port} is also serve.engine.port; use another"
        )
    import importlib.util

    if (
        importlib.util.find_spec("grpc") is None
        or importlib.util.find_spec("google.protobuf") is None
    ):
        raise ConfigError(
            "serve.engine.lerobot_grpc.enabled: needs grpcio and protobuf: "
            "pip install -e '.[lerobot]'"
        )
