"""The Pi0 policy's server engine: from a config to a ready policy (the CLI, run_serve_pi0.py, and
Ray Serve, runner/ray_serve.py, both start here).

`set_environment` runs before torch is imported. `Engine.load` runs in the inference thread:
`build_policy` (build or load the policy, turn on CUDA graphs), then `prepare_policy` (check its
dimensions against the config, set its RTC config, warm up, and on a GPU capture CUDA graphs for
every batch bucket and num_steps value, probe one inference), then the image decoders
(engine.image_decoder: gpu makes the GPU decoder here).
"""

import dataclasses
import os
import random
import time

from pathlib import Path
from typing import Any, Callable

import numpy as np

from flagscale.logger import get_logger
from flagscale.serve.codec import Codecs, GpuJpegDecoder, set_decode_threads
from flagscale.serve.config import ConfigError, ServeConfig, demo_preset

logger = get_logger("flagscale.serve.engine")

RANDOM_BANNER = """
############################################################################
#  engine.random_init=true: the policy has RANDOM WEIGHTS.                 #
#  Its actions are MEANINGLESS. Never send them to a real robot.           #
############################################################################"""


def set_environment(cfg: ServeConfig) -> None:
    """Env vars that must be set before torch / flag_gems are imported."""
    if cfg.flaggems_cache_dir:
        os.environ["FLAGGEMS_CACHE_DIR"] = str(Path(cfg.flaggems_cache_dir).expanduser())
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def set_determinism(cfg: ServeConfig) -> None:
    import numpy as np
    import torch

    if cfg.seed is not None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def build_policy(cfg: ServeConfig):
    """Runs in the inference thread: build or load the policy, then turn on CUDA graphs."""
    policy = _construct_policy(cfg)
    if cfg.cuda_graphs and cfg.device.startswith("cuda"):
        buckets = batch_buckets(cfg)
        policy.enable_cuda_graphs(buckets, compile=cfg.compile, max_graphs=cfg.max_graphs)
        warm = len(buckets) * len(warmup_steps(cfg)) if cfg.warmup else 0
        if warm > cfg.max_graphs:
            logger.warning(
                "engine.max_graphs=%d is below the %d graphs warm-up captures (batch buckets x "
                "num_steps values): the rest run eagerly",
                cfg.max_graphs,
                warm,
            )
    elif cfg.cuda_graphs:
        logger.info("engine.cuda_graphs ignored on device %s", cfg.device)
    return policy


def _construct_policy(cfg: ServeConfig):
    from flagscale.models.pi0 import PI0Policy
    from flagscale.ops import build_ops

    ops = build_ops(cfg.ops, cache_dir=cfg.flaggems_cache_dir) if cfg.ops == "flaggems" else cfg.ops

    set_determinism(cfg)
    common = dict(
        tokenizer_path=cfg.tokenizer,
        stat_path=cfg.stat_path,
        device=cfg.device,
        dtype=cfg.torch_dtype,
        ops=ops,
        pad_mode=cfg.image_pad,
        fused_kernels=cfg.fused_kernels,
        persistent_layers=cfg.persistent_layers,
        precision=cfg.precision,
        normalization_mapping=dict(cfg.normalization_mapping),  # a PI0Config field
    )
    if cfg.random_init:
        logger.warning(RANDOM_BANNER)
        return PI0Policy.random(preset=demo_preset(cfg), seed=cfg.seed or 0, **common)
    return PI0Policy.from_pretrained(
        cfg.model, preset=cfg.preset, variant=cfg.model_variant, **common
    )


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


def load_fixed_noise(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    noise = np.load(path, allow_pickle=False).astype(np.float32)
    if not np.isfinite(noise).all():
        raise ConfigError(f"serve.engine.fixed_noise: {path} contains NaN or infinite values")
    noise.setflags(write=False)
    return noise


@dataclasses.dataclass
class Loaded:
    """What `load()` hands the worker: the policy, checked and warmed up, and the step a batch's
    observations take in this thread before the model call (the GPU JPEG decoder), if any."""

    policy: Any
    prepare_batch: Callable[[list], list] | None = None


class Engine:
    """One app's start-up. Now: the fixed noise and the decode threads. In the inference thread,
    `load()`: build the policy (from the config, or `build()`, or take the one given), check and
    warm it up, make the image decoders (`codecs`), and hand the worker a `Loaded`."""

    def __init__(self, cfg: ServeConfig, policy=None, build=None):
        self.cfg = cfg
        self.fixed_noise = load_fixed_noise(cfg.fixed_noise)
        if cfg.decode_threads is not None:
            set_decode_threads(cfg.decode_threads)
        self.codecs = Codecs()
        self._policy = policy
        self._build = build if build is not None else (lambda: build_policy(cfg))

    def load(self) -> Loaded:
        policy = self._policy if self._policy is not None else self._build()
        prepare_policy(policy, self.cfg, self.fixed_noise)
        self.codecs.prompts = getattr(policy, "warm_prompts", None)
        if self.cfg.image_decoder == "gpu":  # in the inference thread: a failure fails start-up
            gpu = GpuJpegDecoder(self.cfg.device)
            self.codecs.images, self.codecs.frames = gpu, gpu.decode_frames
        return Loaded(policy, prepare_batch=self.codecs.frames)
