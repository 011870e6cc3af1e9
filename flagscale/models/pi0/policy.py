"""PI0Policy: raw observations in, unnormalized action chunks out (Pi0 and Pi0.5: the variant
comes from the checkpoint; see config.py).

policy = PI0Policy.from_pretrained("/models/lerobot/pi0", "/models/paligemma-3b-pt-224",
                                   stat_path="/data/meta/stats.json")
out = policy.infer({"images": {"base_0_rgb": img}, "state": state, "prompt": "pick up the cube"})
out["actions"]  # float32 [chunk_size, action_dim]
"""

import dataclasses
import os
import tempfile
import time

from typing import List, Optional, Sequence

import numpy as np
import torch

from flagscale.engine.device import cuda_missing_reason
from flagscale.logger import get_logger
from flagscale.models.names import DTYPE_NAMES, MODEL_VARIANTS, TOKENIZER_FILES
from flagscale.models.pi0 import normalize as norm, processing as proc
from flagscale.models.pi0.config import PI0Config, read_config_json
from flagscale.models.pi0.modeling_pi0 import PI0Model
from flagscale.models.pi0.rtc import Guidance, RTCConfig, RTCRequest, build_guidance
from flagscale.models.pi0.tokenizer import build_test_tokenizer
from flagscale.models.pi0.weights import (
    CheckpointReader,
    detect_variant,
    init_random_weights,
    load_weights,
)
from flagscale.ops import build_ops, fp8

logger = get_logger(__name__)

DTYPES = {name: getattr(torch, value) for name, value in DTYPE_NAMES.items()}


def resolve_device(device=None) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    why = cuda_missing_reason(device.index) if device.type == "cuda" else None
    if why:
        raise RuntimeError(
            f"device {str(device)!r} requested, but {why}; or run on the CPU: device='cpu' "
            "(server: serve.engine.device=cpu)"
        )
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = str(dtype).replace("torch.", "").lower()
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use bfloat16 or float32")
    return DTYPES[name]


def _quantize(model, precision):
    if str(precision).lower() == "fp8":
        added = fp8.enable(model)
        logger.info("precision fp8: e4m3 copies of the prefix weights, %.2f GB", added / 1e9)


def check_variant(wanted: Optional[str], found: str, model_path: str):
    """A clear start-up error when the configured variant is not the checkpoint's."""
    if wanted is None:
        return
    if wanted not in MODEL_VARIANTS:
        raise ValueError(f"model variant must be one of {MODEL_VARIANTS}, got {wanted!r}")
    if wanted != found:
        raise ValueError(
            f"model variant {wanted!r} was asked for but the checkpoint {model_path!r} is a "
            f"{found} policy; set engine.model_variant: {found} (or leave it out: auto)"
        )


def _has_tokenizer(path: Optional[str]) -> bool:
    return bool(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


class PI0Policy:
    def __init__(self, model: PI0Model, tokenizer, normalizer=None, pad_mode="center", source=""):
        self.model = model.eval()
        self.config: PI0Config = model.config
        self.tokenizer = tokenizer  # sets the prompt-token cache (see the property)
        self.normalizer = normalizer or norm.Normalizer()
        self._check_stats_dims()
        self.choices = self._choices()  # fixed once built; read by every request's processing
        self.pad_mode = pad_mode
        self.source = source
        self.sampler = model.sample_actions  # the engine may replace this with a graphed runner
        self.rtc_config = RTCConfig()  # real-time chunking settings of guided requests

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_path,
        tokenizer_path=None,
        stat_path=None,
        device=None,
        dtype=None,
        ops="native",
        pad_mode="center",
        preset=None,
        progress=True,
        fused_kernels="auto",
        persistent_layers=True,
        variant=None,
        precision="bf16",
        normalization_mapping=None,
    ):
        """`variant` ("pi0" / "pi0.5", None: from the checkpoint) is checked against what the
        checkpoint holds (config.json "type", else the tensors). `normalization_mapping`
        ({"STATE" / "ACTION": mode}) overrides config.json's."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        raw = read_config_json(model_path)
        reader = CheckpointReader(model_path)
        config = PI0Config.from_json_dict(raw, preset or "pi0", detect_variant(reader))
        if normalization_mapping:
            mapping = {**config.normalization_mapping, **normalization_mapping}
            config = dataclasses.replace(config, normalization_mapping=mapping)
        check_variant(variant, config.variant, model_path)
        with torch.device("meta"):
            table = build_ops(ops, device, fused_kernels, persistent_layers, precision=precision)
            model = PI0Model(config, table)
        start = time.perf_counter()
        info = load_weights(model, model_path, device, dtype, progress=progress, reader=reader)
        _quantize(model, precision)
        logger.info("weights on %s in %.1f s", device, time.perf_counter() - start)
        tokenizer_path = tokenizer_path or (model_path if _has_tokenizer(model_path) else None)
        if tokenizer_path is None:
            raise FileNotFoundError(
                f"no tokenizer in {model_path!r}; pass tokenizer_path (google/paligemma-3b-pt-224)"
            )
        normalizer = cls._normalizer(config, stat_path, info["stats"], model_path)
        policy = cls(model, proc.load_tokenizer(tokenizer_path), normalizer, pad_mode, model_path)
        policy._log_ready()
        return policy

    @classmethod
    def random(
        cls,
        preset="tiny",
        device="cpu",
        dtype=None,
        seed=0,
        tokenizer_path=None,
        ops="native",
        pad_mode="center",
        stat_path=None,
        fused_kernels="auto",
        persistent_layers=True,
        precision="bf16",
        **config_overrides,
    ):
        """Random weights (demo, tests, benchmarks). Its actions are meaningless."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        config = PI0Config.from_preset(preset, **config_overrides)
        with torch.device("meta"):
            table = build_ops(ops, device, fused_kernels, persistent_layers, precision=precision)
            model = PI0Model(config, table)
        model = model.to_empty(device=device)
        init_random_weights(model, seed)
        model.to(dtype)
        _restore_fp32(model)
        _quantize(model, precision)
        if tokenizer_path is None:
            tokenizer_path = _shared_test_tokenizer(min(512, config.vocab_size))
        normalizer = cls._normalizer(config, stat_path) if stat_path else None
        policy = cls(
            model, proc.load_tokenizer(tokenizer_path), normalizer, pad_mode, f"random:{preset}"
        )
        policy._log_ready()
        return policy

    def _check_stats_dims(self):
        c, n = self.config, self.normalizer
        for what, dim, limit in (
            ("state", n.state_dim, c.max_state_dim),
            ("action", n.action_dim, c.max_action_dim),
        ):
            if dim is not None and dim > limit:
                raise ValueError(
                    f"normalization stats: {what} has {dim} dims, the model at most "
                    f"{limit} (max_{what}_dim)"
                )

    @staticmethod
    def _normalizer(config: PI0Config, stat_path, buffers=None, model_path=None):
        """stat_path, else lerobot G1 buffers in the weights, else lerobot G3 processor files;
        modes from config.json's normalization_mapping (default Pi0 MEAN_STD, Pi0.5 QUANTILES)."""
        if stat_path:
            raw = norm.read_stats_file(stat_path)
        else:
            raw = norm.stats_from_buffers(buffers or {}, model_path)
            raw = raw or norm.stats_from_processor_files(model_path)
            if raw is None:
                logger.warning(
                    "no normalization stats: state is used as given and actions are "
                    "returned in the model's normalized space (set stat_path)"
                )
                return None
            logger.info("normalization stats taken from the checkpoint directory %s", model_path)
        eps = config.norm_eps or raw.eps or config.default_norm_eps()
        return raw.normalizer(config.norm_mode("STATE"), config.norm_mode("ACTION"), eps)

    def _log_ready(self):
        logger.info(
            "%s policy ready: %s, preset=%s, device=%s, dtype=%s, ops: %s",
            "Pi0.5" if self.config.pi05 else "Pi0",
            self.source,
            self.config.preset,
            self.model.device,
            self.model.dtype,
            self.model.ops.describe(),
        )

    # ---- metadata --------------------------------------------------------------------------

    @property
    def image_keys(self):
        return tuple(self.config.image_keys)

    @property
    def action_dim(self) -> int:
        return self.normalizer.action_dim or self.config.max_action_dim

    @property
    def tokenizer(self):
        return self._prompts.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer):
        """A new tokenizer starts an empty prompt-token cache."""
        self._prompts = proc.PromptCache(tokenizer, self.config.tokenizer_max_length)

    def warm_prompts(self, prompts: Sequence[str]) -> None:
        """Tokenize prompts ahead of infer_batch (e.g. in a server's request threads) where the
        tokens are cached; Pi0.5 prompts with the discretized state are not (see _tokens)."""
        c, prompts = self.config, [str(p or "") for p in prompts]
        if not c.pi05:
            self._prompts.warm(prompts)
        elif not c.discrete_state_input:
            self._prompts.warm([proc.clean_task(p) for p in prompts])

    @property
    def metadata(self) -> dict:
        c = self.config
        return {
            "model": self.source,
            "model_variant": c.variant,
            "preset": c.preset,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "device": str(self.model.device),
            "op_backend": self.model.ops.backend,
            "op_routes": dict(self.model.ops.routes),
            "fused_kernels": list(self.model.ops.fused),  # Triton kernels replacing composites
            "image_keys": list(self.image_keys),
            "image_size": c.image_size,
            "chunk_size": c.chunk_size,
            "max_state_dim": c.max_state_dim,
            "max_action_dim": c.max_action_dim,
            # the policy's per-step action width (stats' action dim, else max_action_dim), before
            # the server cuts actions to [:engine.action_horizon, :engine.action_dim]
            "output_action_dim": self.action_dim,
            "num_steps": c.num_steps,
            "tokenizer_max_length": c.tokenizer_max_length,
            "has_stats": self.normalizer.action is not None,
            "normalization": self.normalizer.describe(),
            "pad_mode": self.pad_mode,
            "reference_choices": dict(self.choices),
        }

    def _choices(self) -> dict:
        """The processing choices in effect (the normalizer's eps as built)."""
        out = self.config.choices()
        eps = {n.eps for n in (self.normalizer.state, self.normalizer.action) if n is not None}
        if len(eps) == 1:
            out["norm_eps"] = eps.pop()
        return out

    # ---- inference -------------------------------------------------------------------------

    def infer(self, obs: dict, num_steps=None, noise=None, seed=None, rtc=None) -> dict:
        """`rtc`: an `RTCRequest` (real-time chunking: continue the previous chunk's leftover)."""
        return self.infer_batch([obs], num_steps, [noise], [seed], [rtc])[0]

    def infer_batch(
        self, observations: Sequence[dict], num_steps=None, noise=None, seeds=None, rtc=None
    ):
        """One model call for all observations; result i equals infer(observations[i]) with the
        same noise or seed. `rtc`: one `RTCRequest` or None per observation; a batch with any
        runs eagerly (not through CUDA graphs), rows without one unguided."""
        n = len(observations)
        noise = list(noise) if noise is not None else [None] * n
        seeds = list(seeds) if seeds is not None else [None] * n
        t0 = time.perf_counter()
        guide = self.rtc_guidance(rtc if rtc is not None else [None] * n)
        inputs = self.preprocess(observations)
        inputs["noise"] = self.make_noise(noise, seeds)
        t1 = time.perf_counter()
        num_steps = num_steps or self.config.num_steps
        if guide is None:
            actions = self.sampler(**inputs, num_steps=num_steps)
        else:
            actions = self.model.sample_actions(**inputs, num_steps=num_steps, rtc=guide)
        actions = actions.float().cpu().numpy()  # synchronises with the device
        t2 = time.perf_counter()
        outs = [self.postprocess(a) for a in actions]
        t3 = time.perf_counter()
        timing = {
            "preprocess_ms": (t1 - t0) * 1e3,
            "model_ms": (t2 - t1) * 1e3,
            "postprocess_ms": (t3 - t2) * 1e3,
            "batch_size": n,
        }
        return [{"actions": a, "timing": dict(timing)} for a in outs]

    def rtc_guidance(self, requests: Sequence[Optional[RTCRequest]]) -> Optional[Guidance]:
        """Validated RTC guidance of a batch (None when no request asks for it): leftovers
        mapped back into the model's action space and padded (ValueError on bad input)."""
        return build_guidance(
            self.rtc_config,
            requests,
            self._leftover_to_model,
            self.config.chunk_size,
            self.config.max_action_dim,
        )

    def _leftover_to_model(self, actions: np.ndarray) -> np.ndarray:
        """The inverse of `postprocess`: actions [n, d] as returned (d <= action_dim: a server may
        cut columns; the missing ones are guided towards 0 in model space, like lerobot's
        padding) -> model space."""
        low = 14 if self.config.adapt_to_pi_aloha else 1
        if not low <= actions.shape[1] <= self.action_dim:
            raise ValueError(
                f"prev_chunk_left_over must have {low}..{self.action_dim} columns (action_dim), "
                f"got {actions.shape[1]}"
            )
        if self.config.adapt_to_pi_aloha:
            actions = proc.aloha_actions_to_pi(actions)
        return self.normalizer.normalize_actions(actions)

    def preprocess(self, observations: Sequence[dict]) -> dict:
        c, device = self.config, self.model.device
        frames = [o.get("images") or {} for o in observations]
        # Slots missing from every observation are dropped rather than masked: same result (masked
        # cameras neither attend nor advance positions), 256 fewer tokens each.
        keys = [k for k in self.image_keys if any(f.get(k) is not None for f in frames)]
        if not all(any(f.get(k) is not None for k in keys) for f in frames):
            raise ValueError("every observation needs at least one camera image")
        pad_value = self.choices["image_pad_value"]
        images, masks = proc.prepare_images(
            frames, keys, c.image_size, self.pad_mode, device, pad_value
        )
        states = [self._state(o.get("state")) for o in observations]
        prompts = [str(o.get("prompt") or "") for o in observations]
        tokens, lang_masks = self._tokens(prompts, states)
        padded = [proc.pad_vector(s, c.max_state_dim) for s in states]
        # torch.tensor copies into allocator-aligned storage: numpy's buffers are only 16-byte
        # aligned and CPU GEMMs pick their kernels by operand alignment (bits vary per request)
        state = torch.tensor(np.stack(padded))  # Pi0.5: not used by the model
        # no host sync on the way in: small pageable copies are staged by CUDA before returning
        return {
            "images": images,
            "img_masks": masks,
            "lang_tokens": tokens.to(device, non_blocking=True),
            "lang_masks": lang_masks.to(device, non_blocking=True),
            "state": state.to(device, non_blocking=True),
        }

    def _tokens(self, prompts: List[str], states: List[np.ndarray]):
        """Pi0: the cached prompt tokens. Pi0.5: the state as text in the prompt (or, with
        discrete_state_input off, openpi's cleaned task + "\\n")."""
        c = self.config
        if not c.pi05:
            return self._prompts(prompts)
        if not c.discrete_state_input:
            return self._prompts([proc.clean_task(p) for p in prompts])
        padded = self.choices["state_bins_padded"]
        texts = [proc.pi05_prompt(p, s, c.max_state_dim, padded) for p, s in zip(prompts, states)]
        return self._prompts.uncached(texts)

    def _state(self, state) -> np.ndarray:
        """The normalized (unpadded) state."""
        if self.config.pi05 and not self.config.discrete_state_input:
            return np.zeros(0, np.float32)  # the model never sees the state
        if state is None and self.config.pi05:
            raise ValueError("state is required: Pi0.5 writes the state into its prompt")
        state = np.zeros(0, np.float32) if state is None else np.asarray(state, np.float32)
        if state.ndim > 1:  # a [B, n] batch would otherwise be flattened into one long state
            raise ValueError(f"state must be a 1-D vector, got shape {list(state.shape)}")
        state = state.reshape(-1)
        if not np.isfinite(state).all():
            raise ValueError("state contains NaN or infinite values")
        if self.config.adapt_to_pi_aloha:
            state = proc.aloha_state_to_pi(state)
        if state.shape[0] > self.config.max_state_dim:
            raise ValueError(
                f"state of length {state.shape[0]} exceeds the model's maximum "
                f"{self.config.max_state_dim} (max_state_dim)"
            )
        return self.normalizer.normalize_state(state)

    def make_noise(self, noise, seeds) -> torch.Tensor:
        c = self.config
        shape = (c.chunk_size, c.max_action_dim)
        rows = []
        for given, seed in zip(noise, seeds):
            if given is not None:
                arr = torch.as_tensor(np.asarray(given, dtype=np.float32))
                if tuple(arr.shape) != shape:
                    raise ValueError(f"noise must have shape {list(shape)}, got {list(arr.shape)}")
                rows.append(arr.clone())
            else:
                gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
                rows.append(torch.randn(shape, generator=gen, dtype=torch.float32))
        return torch.stack(rows).to(self.model.device, non_blocking=True)

    def postprocess(self, actions: np.ndarray) -> np.ndarray:
        actions = self.normalizer.unnormalize_actions(actions)
        if self.config.adapt_to_pi_aloha:
            actions = proc.pi_actions_to_aloha(actions)
        return np.ascontiguousarray(actions[..., : self.action_dim], dtype=np.float32)

    def example_observation(self, n_cameras=None, height=480, width=640, seed=0) -> dict:
        """A random observation with the policy's camera slots (warm-up, tests, benchmarks)."""
        rng = np.random.default_rng(seed)
        keys = self.image_keys[: n_cameras or len(self.image_keys)]
        images = {k: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for k in keys}
        state_dim = self.normalizer.state_dim or min(14, self.config.max_state_dim)
        return {
            "images": images,
            "state": rng.standard_normal(state_dim).astype(np.float32),
            "prompt": "pick up the cube",
        }

    def enable_cuda_graphs(self, batch_buckets=(1, 2, 4, 8), compile=False, max_graphs=64):
        """Replay whole-request CUDA graphs instead of eager kernels (GPU only): one per (batch
        bucket, cameras, num_steps), at most `max_graphs` (further shapes run eagerly). With
        `compile`, the passes are first torch.compile'd (native ops only; during warm-up)."""
        from flagscale.engine.cuda_graph import CudaGraphSampler

        if compile:
            if self.model.ops.backend != "native":
                raise ValueError("compile=True needs the native op backend (FlagGems: graphs only)")
            # with the fused kernels (opaque to torch.compile) only the prefix is compiled
            self.model.compile_passes(("prefix",) if self.model.ops.fused else None)
        self.sampler = CudaGraphSampler(self.model, batch_buckets, max_graphs=max_graphs)
        return self.sampler

    def warmup(self, batch_sizes: List[int] = (1,), num_steps_list: List[int] = (None,)):
        for b in batch_sizes:
            for steps in num_steps_list:
                self.infer_batch([self.example_observation()] * b, num_steps=steps)


def _shared_test_tokenizer(vocab_size: int) -> str:
    """The generated test tokenizer in the temp dir, built once; atomic against parallel builds."""
    import shutil

    target = os.path.join(tempfile.gettempdir(), f"flagscale-pi0-test-tokenizer-{vocab_size}")
    if not _has_tokenizer(target):
        staging = tempfile.mkdtemp(prefix="flagscale-pi0-tok-")
        build_test_tokenizer(staging, vocab_size=vocab_size)
        try:
            os.rename(staging, target)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _restore_fp32(model):
    from flagscale.models.pi0.weights import keeps_fp32

    for name, param in model.named_parameters():
        if keeps_fp32(name):
            param.data = param.data.float()
