"""Parity against the public reference: LeRobot's PI0 (`lerobot.policies.pi0`, the G2 "openpi port",
PyPI lerobot 0.4.x), same random weights, same inputs, same noise, float32 on CPU.

Runs only where lerobot is importable (a separate venv; see docs/parity.md for the exact set-up,
including the openpi `transformers_replace` patch lerobot's PI0 needs). Skipped otherwise.

Test-harness adaptations: see lerobot_harness.py (dimensions only).
"""

import importlib.metadata
import os
import types

import golden_cases  # tests/models/ (on sys.path under pytest)
import numpy as np
import pytest
import torch

from lerobot_harness import build_small, require_lerobot

from flagscale.models.pi0 import PI0Config, PI0Model
from flagscale.models.pi0.config import TowerDims, VisionDims
from flagscale.models.pi0.weights import export_state, init_random_weights

require_lerobot()
from lerobot.policies.pi0 import modeling_pi0 as lr_pi0  # noqa: E402
from lerobot.policies.pi0.configuration_pi0 import PI0Config as LrPI0Config  # noqa: E402

VISION = VisionDims(width=32, depth=2, heads=2, mlp=64, patch=14, image_size=56)  # 16 tokens
LLM = TowerDims(width=64, depth=4, mlp=128, heads=8, kv_heads=1, head_dim=16)  # openpi "dummy"
EXPERT = TowerDims(width=32, depth=4, mlp=64, heads=8, kv_heads=1, head_dim=16)  # != llm width
VOCAB = 257152  # hard-coded by lerobot
CAMS, LANG, B = 3, 48, 2
# LeRobot's own parity tests: forward 1e-4, sample_actions rtol 1e-2 / atol 5e-3 (lerobot #3610).
ATOL, RTOL = 1e-4, 1e-4
R = "paligemma_with_expert.paligemma"
_SOURCE = (
    f"lerobot {importlib.metadata.version('lerobot')} PI0Pytorch, float32, CPU, "
    f"torch {torch.__version__}, tests/models/test_lerobot_parity.py::test_golden_actions_are_lerobots"
)
EMBED_KEY = f"{R}.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = f"{R}.lm_head.weight"


def _small_lerobot(cfg: PI0Config) -> "lr_pi0.PI0Pytorch":
    lr_cfg = LrPI0Config(
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
    return build_small(lr_pi0, cfg, lambda: lr_pi0.PI0Pytorch(lr_cfg).eval())


@pytest.fixture(scope="module")
def models():
    cfg = PI0Config(preset="custom", vision=VISION, llm=LLM, expert=EXPERT, vocab_size=VOCAB)
    with torch.device("meta"):
        ours = PI0Model(cfg)
    ours = ours.to_empty(device="cpu")
    init_random_weights(ours, seed=3)
    ours.eval()
    torch.manual_seed(0)
    ref = _small_lerobot(cfg)
    return ours, ref


def _load_into(ref, ours):
    """lerobot's own loader path: _fix_pytorch_state_dict_keys (a PI0Policy method that only
    reads `self.model` for adaRMS keys), then load_state_dict(strict=True)."""
    state = export_state(ours, layout="openpi")
    policy_like = types.SimpleNamespace(model=ref)
    fixed = lr_pi0.PI0Policy._fix_pytorch_state_dict_keys(policy_like, state, ref.config)
    fixed.setdefault(EMBED_KEY, fixed[LM_HEAD_KEY])  # tied: one tensor, two names
    return ref.load_state_dict(fixed, strict=True)


@pytest.fixture(scope="module")
def loaded(models):
    ours, ref = models
    return ours, ref, _load_into(ref, ours)


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    images = torch.rand(B, CAMS, 3, s, s, generator=g) * 2 - 1
    img_masks = torch.tensor([[True, True, False], [True, False, True]])
    lang = torch.randint(0, VOCAB, (B, LANG), generator=g)
    lang_masks = torch.zeros(B, LANG, dtype=torch.bool)
    lang_masks[0, :11] = True
    lang_masks[1, :30] = True
    lang = lang * lang_masks  # pad id 0 on padding, like the tokenizer
    state = torch.randn(B, cfg.max_state_dim, generator=g)
    noise = torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=g)
    return images, img_masks, lang, lang_masks, state, noise


def _ref_args(images, img_masks):
    return list(images.unbind(1)), list(img_masks.unbind(1))


def _close(a, b, what):
    diff = (a - b).abs()
    rel = diff / b.abs().clamp_min(1e-6)
    print(f"{what}: max abs {diff.max().item():.3e}, max rel {rel.max().item():.3e}")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_key_layout_matches_lerobot(models):
    """Our openpi-layout export has every lerobot key except the token embedding, which the openpi
    layout stores only once, as the tied paligemma.lm_head.weight (openpi #669, lerobot #2307)."""
    ours, ref = models
    state = export_state(ours, layout="openpi")
    ref_state = ref.state_dict()
    assert set(state) - set(ref_state) == set(), sorted(set(state) - set(ref_state))
    assert set(ref_state) - set(state) == {EMBED_KEY}, sorted(set(ref_state) - set(state))
    pg = ref.paligemma_with_expert.paligemma
    assert pg.model.language_model.embed_tokens.weight is pg.lm_head.weight  # tied in lerobot
    bad = {k: (tuple(v.shape), tuple(ref_state[k].shape)) for k, v in state.items()}
    bad = {k: s for k, s in bad.items() if s[0] != s[1]}
    assert not bad, f"shape mismatches (ours, lerobot): {bad}"


def test_strict_load_and_tied_embedding(loaded):
    ours, ref, result = loaded
    assert not result.missing_keys and not result.unexpected_keys
    pg = ref.paligemma_with_expert.paligemma
    # openpi layout stores the token embedding only as paligemma.lm_head.weight (tied)
    torch.testing.assert_close(pg.model.language_model.embed_tokens.weight, ours.llm.embed)


@torch.no_grad()
def test_prefix_embeddings_match(loaded):
    ours, ref, _ = loaded
    images, img_masks, lang, lang_masks, *_ = _inputs(ours.config)
    embs, pad = ours.embed_prefix(images, img_masks, lang, lang_masks)
    r_embs, r_pad, r_att = ref.embed_prefix(*_ref_args(images, img_masks), lang, lang_masks)
    assert torch.equal(pad, r_pad) and not r_att.any()
    _close(embs, r_embs, "prefix embeddings")


@torch.no_grad()
def test_velocity_at_t1_matches(loaded):
    ours, ref, _ = loaded
    images, img_masks, lang, lang_masks, state, noise = _inputs(ours.config, seed=1)
    t = torch.ones(B)
    # ours
    embs, pad = ours.embed_prefix(images, img_masks, lang, lang_masks)
    ck, cv = ours.new_cache(B, embs.shape[1])
    ours.fill_prefix_cache(embs, pad, ck, cv)
    suffix = ours.suffix_inputs(pad, noise.shape[1])
    v = ours.first_step(state, noise, ours.time_embedding(t), suffix, ck, cv)
    # lerobot: prefix pass with its own masks/positions, then one denoise_step
    r_embs, r_pad, r_att = ref.embed_prefix(*_ref_args(images, img_masks), lang, lang_masks)
    mask4d = ref._prepare_attention_masks_4d(lr_pi0.make_att_2d_masks(r_pad, r_att))
    ref.paligemma_with_expert.paligemma.language_model.config._attn_implementation = "eager"
    _, kv = ref.paligemma_with_expert.forward(
        attention_mask=mask4d,
        position_ids=torch.cumsum(r_pad, dim=1) - 1,
        past_key_values=None,
        inputs_embeds=[r_embs, None],
        use_cache=True,
    )
    r_v = ref.denoise_step(state, r_pad, kv, noise, t)
    _close(v, r_v, "velocity at t=1")


@pytest.mark.parametrize("num_steps", [1, 10])
def test_sample_actions_match(loaded, num_steps):
    ours, ref, _ = loaded
    images, img_masks, lang, lang_masks, state, noise = _inputs(ours.config, seed=2)
    noise_copy = noise.clone()
    acts = ours.sample_actions(
        images, img_masks, lang, lang_masks, state, noise=noise, num_steps=num_steps
    )
    r_acts = ref.sample_actions(
        *_ref_args(images, img_masks), lang, lang_masks, state, noise=noise, num_steps=num_steps
    )
    assert torch.equal(noise, noise_copy)
    assert acts.shape == r_acts.shape == (B, ours.config.chunk_size, ours.config.max_action_dim)
    assert (acts - noise).abs().max() > 1e-2  # the velocity is not trivially zero
    _close(acts, r_acts, f"sample_actions ({num_steps} steps)")


@torch.no_grad()
def test_comparison_is_sensitive(loaded):
    """Negative control: a small change to one reference weight must break the comparison."""
    ours, ref, _ = loaded
    images, img_masks, lang, lang_masks, state, noise = _inputs(ours.config, seed=2)
    norm = ref.paligemma_with_expert.gemma_expert.model.norm.weight
    saved = norm.clone()
    try:
        norm.add_(0.01)
        r_acts = ref.sample_actions(
            *_ref_args(images, img_masks), lang, lang_masks, state, noise=noise, num_steps=10
        )
    finally:
        norm.copy_(saved)
    acts = ours.sample_actions(images, img_masks, lang, lang_masks, state, noise=noise)
    assert not torch.allclose(acts, r_acts, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", sorted(golden_cases.CASES))
@torch.no_grad()
def test_golden_actions_are_lerobots(case):
    """The golden actions CI checks our model against (tests/models/test_pi0_golden.py) are
    LeRobot's: recomputed here from the same portable weights and inputs and compared with the
    committed arrays; `PI0_WRITE_GOLDEN=1` rewrites them from LeRobot's output."""
    ours = golden_cases.model(case)
    torch.manual_seed(0)
    ref = _small_lerobot(ours.config)
    result = _load_into(ref, ours)
    assert not result.missing_keys and not result.unexpected_keys
    x = golden_cases.inputs(case)
    images, img_masks = _ref_args(x["images"], x["img_masks"])
    args = (images, img_masks, x["lang_tokens"], x["lang_masks"], x["state"])
    ref_actions = {
        f"actions_{n}": ref.sample_actions(*args, noise=x["noise"].clone(), num_steps=n).numpy()
        for n in golden_cases.STEPS
    }
    for name, value in ref_actions.items():  # and ours agrees with the reference
        ours_actions = ours.sample_actions(**x, num_steps=int(name.split("_")[1]))
        _close(ours_actions, torch.from_numpy(value), f"{case} {name} vs lerobot")
    path = golden_cases.golden_path(case)
    if os.environ.get("PI0_WRITE_GOLDEN") == "1":
        os.makedirs(golden_cases.GOLDEN_DIR, exist_ok=True)
        np.savez_compressed(path, **ref_actions, source=np.array(_SOURCE))
    golden = np.load(path)
    for name, value in ref_actions.items():
        diff = np.abs(value - golden[name]).max()
        print(f"{case} {name}: lerobot now vs committed golden max abs {diff:.3e}")
        assert diff <= golden_cases.tolerance(golden[name]), (case, name, diff)
