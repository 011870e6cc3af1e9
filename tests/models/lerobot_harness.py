"""Shared set-up of the lerobot parity tests (Pi0 and Pi0.5): import lerobot where it is installed
(a separate venv, see docs/parity.md), and build its models at test dimensions.

Test-harness adaptations (dimensions only, no code path of lerobot's model is replaced):
- lerobot hard-codes the So400m vision tower (4304 MLP, 27 layers, 1152 width), a 2048-wide
  projector and the gemma_2b / gemma_300m tower sizes; we shrink them by wrapping
  `get_gemma_config` and the `PaliGemmaForConditionalGeneration` constructor it calls.
- lerobot.datasets imports torchvision at import time; the PyPI torchvision wheel cannot load its
  ops against a CPU-only torch build, so an inert stub is used when torchvision does not import.
  The model code never uses torchvision.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():  # a class (lerobot subclasses torchvision's Transform)
            obj = type(name, (), {"__init__": lambda self, *a, **k: None})
        else:
            obj = _Stub(f"{self.__name__}.{name}")
            obj.__spec__ = importlib.machinery.ModuleSpec(obj.__name__, None)
            sys.modules[obj.__name__] = obj
        setattr(self, name, obj)
        return obj


_TV_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.v2",
    "torchvision.transforms.functional",
)


def _ensure_torchvision():
    try:
        importlib.import_module("torchvision")
    except Exception:
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        for name in _TV_MODULES:
            stub = _Stub(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            stub.__path__ = []
            sys.modules[name] = stub
            if "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(sys.modules[parent], child, stub)


def require_lerobot():
    """Skip the calling test module unless lerobot and openpi's transformers patch import."""
    if importlib.util.find_spec("lerobot") is None:
        pytest.skip("lerobot not installed (see docs/parity.md)", allow_module_level=True)
    _ensure_torchvision()
    pytest.importorskip("lerobot")
    try:
        importlib.import_module("transformers.models.siglip.check")
    except ImportError:
        pytest.skip(
            "lerobot's PI0 / PI05 need openpi's transformers_replace patch "
            "(tests/models/lerobot_ref/patch_transformers_openpi.py)",
            allow_module_level=True,
        )


def build_small(module, cfg, build):
    """Call `build()` (which constructs a lerobot model from `module`, lerobot's modeling_pi0 or
    modeling_pi05) with the towers shrunk to our config `cfg`'s dimensions."""

    def gemma(dims):
        return module.GemmaConfig(
            dims.width, dims.depth, dims.mlp, dims.heads, dims.kv_heads, dims.head_dim
        )

    sizes = {"gemma_2b": gemma(cfg.llm), "gemma_300m": gemma(cfg.expert)}
    real_paligemma, real_expert = module.PaliGemmaForConditionalGeneration, module.GemmaForCausalLM

    def small_paligemma(config):
        v = config.vision_config
        v.hidden_size, v.intermediate_size = cfg.vision.width, cfg.vision.mlp
        v.num_hidden_layers, v.num_attention_heads = cfg.vision.depth, cfg.vision.heads
        v.patch_size = cfg.vision.patch
        v.projection_dim = config.projection_dim = cfg.llm.width
        config.hidden_size = cfg.llm.width
        config.text_config.vocab_size = cfg.vocab_size  # lerobot hard-codes 257152
        return real_paligemma(config=config)

    def small_expert(config):
        config.vocab_size = cfg.vocab_size  # its lm_head is unused; the shape must load
        return real_expert(config=config)

    mp = pytest.MonkeyPatch()
    mp.setattr(module, "get_gemma_config", sizes.__getitem__)
    mp.setattr(module, "PaliGemmaForConditionalGeneration", small_paligemma)
    mp.setattr(module, "GemmaForCausalLM", small_expert)
    try:
        return build()
    finally:
        mp.undo()


# ---- real-time chunking (lerobot.policies.rtc) ----------------------------------------------

# schedule, leftover rows x cols, delay, horizon (None: the config's 10), steps
RTC_CASES = [
    ("LINEAR", 20, 10, 3, None, 10),
    ("EXP", 20, 10, 3, None, 10),
    ("ONES", 20, 10, 3, None, 10),
    ("ZEROS", 20, 10, 3, None, 10),
    ("LINEAR", 8, 32, 2, 15, 5),  # horizon cut to the leftover's 8 rows
    ("EXP", 50, 32, 6, 30, 3),  # a full-size leftover (no padding)
]


def rtc_leftover(batch, rows, cols, seed=5):
    import torch

    return torch.randn(batch, rows, cols, generator=torch.Generator().manual_seed(seed))


def ours_with_rtc(model, args, noise, config, left, delay, horizon, num_steps):
    """Our `sample_actions(*args, noise=...)` guided by `config` (an RTCConfig) towards `left`
    [B, n, d] (model space) with the same delay and horizon for every row."""
    from flagscale.models.pi0.rtc import Guidance

    c, b = model.config, left.shape[0]
    rows = list(left.numpy())
    guide = Guidance.build(config, rows, [delay] * b, [horizon] * b, c.chunk_size, c.max_action_dim)
    return model.sample_actions(*args, noise=noise, num_steps=num_steps, rtc=guide)


def lerobot_with_rtc(ref, args, noise, config, left, delay, horizon, num_steps):
    """lerobot's `sample_actions(*args, noise=...)` (PI0 or PI05) with its RTCProcessor enabled
    with `config`'s settings, as its `predict_action_chunk(..., inference_delay=,
    prev_chunk_left_over=, execution_horizon=)` passes them."""
    from lerobot.configs.types import RTCAttentionSchedule
    from lerobot.policies.rtc.configuration_rtc import RTCConfig
    from lerobot.policies.rtc.modeling_rtc import RTCProcessor

    lr_config = RTCConfig(
        enabled=True,
        prefix_attention_schedule=RTCAttentionSchedule(config.prefix_attention_schedule),
        max_guidance_weight=config.max_guidance_weight,
        execution_horizon=config.execution_horizon,
    )
    saved = ref.config.rtc_config, ref.rtc_processor
    ref.config.rtc_config, ref.rtc_processor = lr_config, RTCProcessor(lr_config)
    try:
        return ref.sample_actions(
            *args,
            noise=noise,
            num_steps=num_steps,
            inference_delay=delay,
            prev_chunk_left_over=left,
            execution_horizon=horizon,
        )
    finally:
        ref.config.rtc_config, ref.rtc_processor = saved
