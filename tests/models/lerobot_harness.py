"""Shared set-up of the lerobot parity tests (Pi0 and Pi0.5): import lerobot where it is installed
(a separate venv, see docs/parity.md), build its models at test dimensions, load our random
weights into them through lerobot's own loader, and run and compare both on the same inputs.

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

from typing import NamedTuple, Optional

import pytest
import torch

from flagscale.models.pi0 import PI0Config, PI0Model
from flagscale.models.pi0.config import TowerDims, VisionDims
from flagscale.models.pi0.weights import export_state, init_random_weights

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


# ---- our model and lerobot's on the same random weights -------------------------------------

VISION = VisionDims(width=32, depth=2, heads=2, mlp=64, patch=14, image_size=56)  # 16 tokens
LLM = TowerDims(width=64, depth=4, mlp=128, heads=8, kv_heads=1, head_dim=16)  # openpi "dummy"
EXPERT = TowerDims(width=32, depth=4, mlp=64, heads=8, kv_heads=1, head_dim=16)  # != llm width
VOCAB = 257152  # hard-coded by lerobot
CAMS, B = 3, 2
# LeRobot's own parity tests: forward 1e-4, sample_actions rtol 1e-2 / atol 5e-3 (lerobot #3610).
ATOL, RTOL = 1e-4, 1e-4
R = "paligemma_with_expert.paligemma"
EMBED_KEY = f"{R}.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = f"{R}.lm_head.weight"
# our variant -> lerobot's package (lerobot.policies.<package>) and class-name stem
LEROBOT = {"pi0": ("pi0", "PI0"), "pi0.5": ("pi05", "PI05")}
SEEDS = {"pi0": 3, "pi0.5": 5}  # our random weights
VALID_TOKENS = {"pi0": (11, 30), "pi0.5": (57, 131)}  # of tokenizer_max_length (48 / 200)


def lerobot_module(variant: str, part: str = "modeling") -> types.ModuleType:
    """lerobot's `lerobot.policies.pi0.modeling_pi0` (part "modeling" or "configuration") for our
    `variant`, or pi05's."""
    package, _ = LEROBOT[variant]
    return importlib.import_module(f"lerobot.policies.{package}.{part}_{package}")


def lerobot_class(variant: str, suffix: str, part: str = "modeling") -> type:
    """lerobot's PI0<suffix> / PI05<suffix> class (Pytorch, Policy; Config with "configuration")."""
    return getattr(lerobot_module(variant, part), LEROBOT[variant][1] + suffix)


def our_model(variant: str) -> PI0Model:
    """Our model at the test dimensions, random weights (randomised norms), eval mode."""
    cfg = PI0Config(
        preset="custom", variant=variant, vision=VISION, llm=LLM, expert=EXPERT, vocab_size=VOCAB
    )
    with torch.device("meta"):
        ours = PI0Model(cfg)
    ours = ours.to_empty(device="cpu")
    init_random_weights(ours, seed=SEEDS[variant])
    return ours.eval()


def small_lerobot(cfg: PI0Config):
    """lerobot's PI0Pytorch / PI05Pytorch (by `cfg.variant`) at `cfg`'s dimensions, float32, CPU."""
    lr_cfg = lerobot_class(cfg.variant, "Config", "configuration")(
        dtype="float32",
        image_resolution=(cfg.image_size, cfg.image_size),
        chunk_size=cfg.chunk_size,
        n_action_steps=cfg.chunk_size,
        max_state_dim=cfg.max_state_dim,
        max_action_dim=cfg.max_action_dim,
        num_inference_steps=10,
        compile_model=False,
        device="cpu",
    )
    model_class = lerobot_class(cfg.variant, "Pytorch")
    return build_small(lerobot_module(cfg.variant), cfg, lambda: model_class(lr_cfg).eval())


def build_models(variant: str) -> tuple:
    """(ours, lerobot's): our random weights; lerobot's own (seed 0) until `load_into`."""
    ours = our_model(variant)
    torch.manual_seed(0)
    return ours, small_lerobot(ours.config)


def load_into(ref, ours):
    """lerobot's own loader path: _fix_pytorch_state_dict_keys (a PI0Policy / PI05Policy method
    that only reads `self.model` for adaRMS keys), then load_state_dict(strict=True)."""
    state = export_state(ours, layout="openpi")
    policy_like = types.SimpleNamespace(model=ref)
    policy = lerobot_class(ours.config.variant, "Policy")
    fixed = policy._fix_pytorch_state_dict_keys(policy_like, state, ref.config)
    fixed.setdefault(EMBED_KEY, fixed[LM_HEAD_KEY])  # tied: one tensor, two names
    return ref.load_state_dict(fixed, strict=True)


def check_key_layout(ours, ref):
    """Our openpi-layout export has every lerobot key, with lerobot's shapes, except the token
    embedding, which the openpi layout stores only once, as the tied paligemma.lm_head.weight
    (openpi #669, lerobot #2307)."""
    state = export_state(ours, layout="openpi")
    ref_state = ref.state_dict()
    assert set(state) - set(ref_state) == set(), sorted(set(state) - set(ref_state))
    assert set(ref_state) - set(state) == {EMBED_KEY}, sorted(set(ref_state) - set(state))
    bad = {k: (tuple(v.shape), tuple(ref_state[k].shape)) for k, v in state.items()}
    bad = {k: s for k, s in bad.items() if s[0] != s[1]}
    assert not bad, f"shape mismatches (ours, lerobot): {bad}"


def ref_images(images, img_masks) -> tuple:
    """lerobot's image arguments: a list of [B, 3, S, S] images and one of [B] masks."""
    return list(images.unbind(1)), list(img_masks.unbind(1))


class Inputs(NamedTuple):
    images: torch.Tensor
    img_masks: torch.Tensor
    lang: torch.Tensor
    lang_masks: torch.Tensor
    state: Optional[torch.Tensor]  # None for Pi0.5 (the state is in the prompt)
    noise: torch.Tensor

    def ours(self) -> tuple:
        """Our `sample_actions` arguments before the noise."""
        return self.images, self.img_masks, self.lang, self.lang_masks, self.state

    def lerobot(self) -> tuple:
        """lerobot's `sample_actions` arguments before the noise (PI05 takes no state)."""
        args = (*ref_images(self.images, self.img_masks), self.lang, self.lang_masks)
        return args if self.state is None else (*args, self.state)


def inputs(cfg: PI0Config, seed: int = 0) -> Inputs:
    """3 cameras, one masked per sample; padded prompts (pad id 0, like the tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    s, n = cfg.image_size, cfg.tokenizer_max_length
    images = torch.rand(B, CAMS, 3, s, s, generator=g) * 2 - 1
    img_masks = torch.tensor([[True, True, False], [True, False, True]])
    lang = torch.randint(0, VOCAB, (B, n), generator=g)
    lang_masks = torch.arange(n)[None] < torch.tensor(VALID_TOKENS[cfg.variant])[:, None]
    state = None if cfg.pi05 else torch.randn(B, cfg.max_state_dim, generator=g)
    noise = torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=g)
    return Inputs(images, img_masks, lang * lang_masks, lang_masks, state, noise)


def close(a, b, what):
    """assert_close at ATOL / RTOL; prints the max abs, max rel (element-wise |a-b| / max(|b|,
    1e-6)) and relative L2 differences."""
    diff = (a - b).abs()
    rel = (diff / b.abs().clamp_min(1e-6)).max().item()
    l2 = (diff.norm() / b.norm()).item()
    print(f"{what}: max abs {diff.max().item():.3e}, max rel {rel:.3e}, rel L2 {l2:.3e}")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@torch.no_grad()
def velocities_at_t1(ours, ref, x: Inputs) -> tuple:
    """(ours, lerobot's) velocity at t = 1: the prefix into the KV cache, then one expert step."""
    t = torch.ones(B)
    embs, pad = ours.embed_prefix(*x.ours()[:4])
    ck, cv = ours.new_cache(B, embs.shape[1])
    ours.fill_prefix_cache(embs, pad, ck, cv)
    suffix = ours.suffix_inputs(pad, x.noise.shape[1])
    v = ours.first_step(x.state, x.noise, ours.step_conditions(t[None])[0], suffix, ck, cv)
    # lerobot: prefix pass with its own masks/positions, then one denoise_step
    r_embs, r_pad, r_att = ref.embed_prefix(*x.lerobot()[:4])
    att_2d = lerobot_module(ours.config.variant).make_att_2d_masks(r_pad, r_att)
    ref.paligemma_with_expert.paligemma.language_model.config._attn_implementation = "eager"
    _, kv = ref.paligemma_with_expert.forward(
        attention_mask=ref._prepare_attention_masks_4d(att_2d),
        position_ids=torch.cumsum(r_pad, dim=1) - 1,
        past_key_values=None,
        inputs_embeds=[r_embs, None],
        use_cache=True,
    )
    state = () if x.state is None else (x.state,)  # PI0's denoise_step takes it first
    return v, ref.denoise_step(*state, r_pad, kv, x.noise, t)


def check_sample_actions(ours, ref, x: Inputs, num_steps: int):
    """Both `sample_actions` on `x`: the noise is not modified, the actions move away from it,
    and agree; returns lerobot's."""
    noise_copy = x.noise.clone()
    acts = ours.sample_actions(*x.ours(), noise=x.noise, num_steps=num_steps)
    r_acts = ref.sample_actions(*x.lerobot(), noise=x.noise, num_steps=num_steps)
    assert torch.equal(x.noise, noise_copy)
    assert acts.shape == r_acts.shape == (B, ours.config.chunk_size, ours.config.max_action_dim)
    assert (acts - x.noise).abs().max() > 1e-2  # the velocity is not trivially zero
    close(acts, r_acts, f"sample_actions ({num_steps} steps)")
    return r_acts


@torch.no_grad()
def check_sensitive(ours, ref, x: Inputs, param):
    """Negative control: +0.01 on `param`, one weight of the reference, must break the
    comparison (10 steps)."""
    saved = param.clone()
    try:
        param.add_(0.01)
        r_acts = ref.sample_actions(*x.lerobot(), noise=x.noise, num_steps=10)
    finally:
        param.copy_(saved)
    acts = ours.sample_actions(*x.ours(), noise=x.noise)
    assert not torch.allclose(acts, r_acts, atol=ATOL, rtol=RTOL)


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
