"""FlagScale's current Pi serving contract (2026: `run_serve_pi.py` over HTTP, `run_serve_vla.py`
over websocket) mapped onto this server's `serve.engine`.

Their task files are a list with one entry (examples/pi0/conf/serve/pi0.yaml,
examples/pi0_5/conf/serve/pi0_5.yaml upstream):

    - serve_id: vllm_model
      engine_args: {host, port, model_variant, model, tokenizer, stat_path, device, use_quantiles,
                    images_keys, images_shape, state_key, rename_map, ...}

`engine_from_list` turns that into an `engine` mapping: our own keys pass through; FlagScale's
camera / state / prompt keys (`images_keys`, `state_key`, `rename_map`, after renaming
`observation.images.<slot>`, `observation.state` and `task`) become `cameras` (HTTP) and
`openpi_images` / `openpi_state_keys` / `openpi_prompt_key` (websocket); keys that only drive
their warm-up are accepted with a warning; anything else is refused by name.
"""

import difflib

from typing import Mapping

from flagscale.logger import get_logger
from flagscale.models.names import MODEL_VARIANTS
from flagscale.serve.config import (
    DEFAULT_OPENPI_IMAGES,
    DEFAULT_OPENPI_STATE,
    ENGINE_KEYS,
    IMAGE_SLOTS,
    ConfigError,
    parse_serve_section,
)

logger = get_logger("flagscale.serve.flagscale_compat")

WHERE = "serve[0].engine_args"
IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
TASK_KEY = "task"
# FlagScale's server scripts: experiment.task.entrypoint values that start this server instead.
ENTRYPOINTS = ("flagscale/serve/run_serve_pi.py", "flagscale/serve/run_serve_vla.py")
LIST_ITEM_KEYS = ("serve_id", "engine_args")
MAPPED_KEYS = ("images_keys", "state_key", "rename_map", "model_variant", "use_quantiles")
# only shape FlagScale's warm-up / serve-side resizing; ours warms up by itself and always
# resizes with padding to the model's 224x224 (engine.image_pad)
IGNORED_KEYS = ("images_shape", "serve_preprocessor")

_warned = set()


def engine_from_list(serve) -> dict:
    """FlagScale's list-form `serve` section -> an `engine` mapping for the loader."""
    if len(serve) != 1:
        raise ConfigError(
            f"serve: {len(serve)} list entries; this server runs one model, keep one "
            "`- serve_id: ...` entry"
        )
    item = serve[0]
    if not isinstance(item, Mapping):
        raise ConfigError(
            f"serve[0]: expected a mapping with serve_id and engine_args, got {item!r}"
        )
    _check_known("serve[0]", item, LIST_ITEM_KEYS)
    args = item.get("engine_args")
    if not isinstance(args, Mapping):
        raise ConfigError(f"{WHERE}: missing or not a mapping")
    _check_known(WHERE, args, (*ENGINE_KEYS, *MAPPED_KEYS, *IGNORED_KEYS))
    _warn_ignored([k for k in IGNORED_KEYS if k in args])
    engine = {k: v for k, v in args.items() if k in ENGINE_KEYS}
    variant = _variant(args)
    engine.update(model_variant=variant.get("model_variant"))
    if engine.get("normalization_mapping") is None and "normalization_mapping" in variant:
        engine["normalization_mapping"] = variant["normalization_mapping"]
    engine.update(_observation_keys(args, engine))
    if engine.get("state_dim") is None and engine.get("action_dim") is not None:
        engine["state_dim"] = engine["action_dim"]  # theirs: the warm-up state's length
    return engine


def _check_known(where: str, data: Mapping, known) -> None:
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{where}.{key}: unknown key{suggestion}")


def _warn_ignored(keys) -> None:
    new = [k for k in keys if k not in _warned]
    if new:
        _warned.update(new)
        logger.warning(
            "serve config: %s accepted for FlagScale compatibility and ignored (warm-up and "
            "resizing are the server's own)",
            ", ".join(f"{WHERE}.{k}" for k in new),
        )


def _variant(args: Mapping) -> dict:
    """model_variant -> engine.model_variant; use_quantiles: false with pi0.5 -> mean/std for
    state and action, as FlagScale's run_serve_pi.py sets (true, or Pi0: the checkpoint's)."""
    out = {}
    variant = args.get("model_variant")
    if variant is not None:
        text = str(variant).strip().lower()
        if text not in MODEL_VARIANTS:
            raise ConfigError(
                f"{WHERE}.model_variant: must be one of {', '.join(MODEL_VARIANTS)}, got {variant!r}"
            )
        out["model_variant"] = text
    quantiles = args.get("use_quantiles")
    if quantiles is not None and not isinstance(quantiles, bool):
        raise ConfigError(f"{WHERE}.use_quantiles: expected true or false, got {quantiles!r}")
    if quantiles is False and out.get("model_variant") == "pi0.5":  # run_serve_pi.py's rule
        out["normalization_mapping"] = {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    return out


def _observation_keys(args: Mapping, engine: Mapping) -> dict:
    """images_keys / state_key / rename_map -> cameras and the websocket key maps."""
    rename = _rename_map(args.get("rename_map"))
    images = _images_keys(args.get("images_keys"))
    out = {}
    cameras = {}
    for i, key in enumerate(images):
        cameras[key] = _slot(rename.get(key, key), f"{WHERE}.images_keys[{i}]")
    websocket_images = dict(cameras)
    state_keys, prompt_key = [], None
    for source, target in rename.items():
        if target.startswith(IMAGE_PREFIX):
            slot = _slot(target, f"{WHERE}.rename_map.{source}")
            websocket_images.setdefault(source, slot)
            if not images:
                cameras.setdefault(source, slot)
        elif target == STATE_KEY:
            state_keys.append(source)
        elif target == TASK_KEY:
            prompt_key = source
        else:
            raise ConfigError(
                f"{WHERE}.rename_map.{source}: target {target!r} is not "
                f"'{IMAGE_PREFIX}<slot>', '{STATE_KEY}' or '{TASK_KEY}'"
            )
    state_key = args.get("state_key")
    if state_key is not None:
        if not isinstance(state_key, str) or not state_key:
            raise ConfigError(f"{WHERE}.state_key: expected a non-empty string, got {state_key!r}")
        state_keys.append(state_key)
    if cameras and "cameras" not in engine:
        out["cameras"] = _one_camera_per_slot(cameras)
    if websocket_images and "openpi_images" not in engine:
        out["openpi_images"] = {**DEFAULT_OPENPI_IMAGES, **websocket_images}
    if state_keys and "openpi_state_keys" not in engine:
        out["openpi_state_keys"] = list(dict.fromkeys([*DEFAULT_OPENPI_STATE, *state_keys]))
    if prompt_key and "openpi_prompt_key" not in engine:
        out["openpi_prompt_key"] = prompt_key
    return out


def _rename_map(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{WHERE}.rename_map: expected a mapping of client key -> model key")
    for source, target in value.items():
        if not isinstance(source, str) or not isinstance(target, str) or not source or not target:
            raise ConfigError(f"{WHERE}.rename_map: keys and values must be non-empty strings")
    return dict(value)


def _images_keys(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, Mapping)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{WHERE}.images_keys: expected a list of '{IMAGE_PREFIX}<camera>' keys")
    keys = list(value)
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{WHERE}.images_keys[{i}]: expected a non-empty string, got {key!r}")
    return keys


def _slot(key: str, where: str) -> str:
    slot = key.removeprefix(IMAGE_PREFIX)
    if not key.startswith(IMAGE_PREFIX) or slot not in IMAGE_SLOTS:
        names = ", ".join(IMAGE_PREFIX + s for s in IMAGE_SLOTS)
        raise ConfigError(
            f"{where}: {key!r} is not an image of this model ({names}); "
            "map the camera with rename_map"
        )
    return slot


def _one_camera_per_slot(cameras: dict) -> dict:
    seen = {}
    for key, slot in cameras.items():
        if slot in seen:
            raise ConfigError(f"{WHERE}.images_keys: {seen[slot]!r} and {key!r} both feed {slot}")
        seen[slot] = key
    return cameras


def parse_list_form(serve: list, env: Mapping[str, str]):
    """The loader's parse of the mapped section; errors name FlagScale's keys
    (serve[0].engine_args.port, not serve.engine.port)."""
    engine = engine_from_list(serve)
    try:
        return parse_serve_section({"engine": engine}, env)
    except ConfigError as e:
        raise ConfigError(str(e).replace("serve.engine.", f"{WHERE}.")) from None


def raw_engine(serve) -> Mapping:
    """The unvalidated engine mapping of either form ({} when there is none)."""
    if isinstance(serve, list) and len(serve) == 1 and isinstance(serve[0], Mapping):
        serve = {"engine": serve[0].get("engine_args")}
    engine = serve.get("engine") if isinstance(serve, Mapping) else None
    return engine if isinstance(engine, Mapping) else {}
