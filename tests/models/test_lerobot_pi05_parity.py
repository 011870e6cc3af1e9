"""Parity against the public reference: LeRobot 0.4.4's PI05 (`lerobot.policies.pi05`, a port of
openpi's `PI0Pytorch` with `pi05=True`), same random weights, same inputs, same noise, float32 on
CPU; and our Pi0.5 prompt against lerobot's `Pi05PrepareStateTokenizerProcessorStep`.

Runs only where lerobot is importable (a separate venv with openpi's transformers patch; see
docs/parity.md). Skipped otherwise. Test-harness adaptations: see lerobot_harness.py.
"""

import types

import numpy as np
import pytest
import torch

from lerobot_harness import build_small, require_lerobot

from flagscale.models.pi0 import PI0Config, PI0Model, processing as proc
from flagscale.models.pi0.config import TowerDims, VisionDims
from flagscale.models.pi0.weights import export_state, init_random_weights

require_lerobot()
from lerobot.policies.pi05 import modeling_pi05 as lr_pi05  # noqa: E402
from lerobot.policies.pi05.configuration_pi05 import PI05Config  # noqa: E402

VISION = VisionDims(width=32, depth=2, heads=2, mlp=64, patch=14, image_size=56)  # 16 tokens
LLM = TowerDims(width=64, depth=4, mlp=128, heads=8, kv_heads=1, head_dim=16)
EXPERT = TowerDims(width=32, depth=4, mlp=64, heads=8, kv_heads=1, head_dim=16)  # != llm width
VOCAB = 257152  # hard-coded by lerobot
CAMS, LANG, B = 3, 200, 2
ATOL, RTOL = 1e-4, 1e-4
R = "paligemma_with_expert.paligemma"
EMBED_KEY = f"{R}.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = f"{R}.lm_head.weight"


def _small_lerobot(cfg: PI0Config) -> "lr_pi05.PI05Pytorch":
    lr_cfg = PI05Config(
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
    return build_small(lr_pi05, cfg, lambda: lr_pi05.PI05Pytorch(lr_cfg).eval())


@pytest.fixture(scope="module")
def loaded():
    cfg = PI0Config(
        preset="custom", variant="pi0.5", vision=VISION, llm=LLM, expert=EXPERT, vocab_size=VOCAB
    )
    with torch.device("meta"):
        ours = PI0Model(cfg)
    ours = ours.to_empty(device="cpu")
    init_random_weights(ours, seed=5)
    ours.eval()
    torch.manual_seed(0)
    ref = _small_lerobot(cfg)
    state = export_state(ours, layout="openpi")
    # lerobot's own loader path: _fix_pytorch_state_dict_keys, then load_state_dict(strict=True)
    policy_like = types.SimpleNamespace(model=ref)
    fixed = lr_pi05.PI05Policy._fix_pytorch_state_dict_keys(policy_like, state, ref.config)
    fixed.setdefault(EMBED_KEY, fixed[LM_HEAD_KEY])  # tied: one tensor, two names
    result = ref.load_state_dict(fixed, strict=True)
    return ours, ref, result


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    images = torch.rand(B, CAMS, 3, s, s, generator=g) * 2 - 1
    img_masks = torch.tensor([[True, True, False], [True, False, True]])
    lang = torch.randint(0, VOCAB, (B, LANG), generator=g)
    lang_masks = torch.zeros(B, LANG, dtype=torch.bool)
    lang_masks[0, :57] = True
    lang_masks[1, :131] = True
    lang = lang * lang_masks  # pad id 0 on padding, like the tokenizer
    noise = torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=g)
    return images, img_masks, lang, lang_masks, noise


def _ref_args(images, img_masks):
    return list(images.unbind(1)), list(img_masks.unbind(1))


def _close(a, b, what):
    diff = (a - b).abs()
    print(f"{what}: max abs {diff.max().item():.3e}, rel L2 {(diff.norm() / b.norm()).item():.3e}")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_strict_load_and_key_layout(loaded):
    ours, ref, result = loaded
    assert not result.missing_keys and not result.unexpected_keys
    state = export_state(ours, layout="openpi")
    lerobot = export_state(ours, layout="lerobot")  # lerobot/pi05_base: the same under model.
    assert {k.removeprefix("model."): v.shape for k, v in lerobot.items()} == {
        k: v.shape for k, v in state.items()
    }
    ref_state = ref.state_dict()
    assert set(state) - set(ref_state) == set(), sorted(set(state) - set(ref_state))
    assert set(ref_state) - set(state) == {EMBED_KEY}, sorted(set(ref_state) - set(state))
    bad = {k: (tuple(v.shape), tuple(ref_state[k].shape)) for k, v in state.items()}
    assert not {k: s for k, s in bad.items() if s[0] != s[1]}
    expert = ref.paligemma_with_expert.gemma_expert.model
    torch.testing.assert_close(expert.norm.dense.weight, ours.expert.norm.dense.weight)


@torch.no_grad()
def test_velocity_at_t1_matches(loaded):
    ours, ref, _ = loaded
    images, img_masks, lang, lang_masks, noise = _inputs(ours.config, seed=1)
    t = torch.ones(B)
    embs, pad = ours.embed_prefix(images, img_masks, lang, lang_masks)
    ck, cv = ours.new_cache(B, embs.shape[1])
    ours.fill_prefix_cache(embs, pad, ck, cv)
    suffix = ours.suffix_inputs(pad, noise.shape[1])
    v = ours.first_step(None, noise, ours.modulation(t), suffix, ck, cv)
    r_embs, r_pad, r_att = ref.embed_prefix(*_ref_args(images, img_masks), lang, lang_masks)
    mask4d = ref._prepare_attention_masks_4d(lr_pi05.make_att_2d_masks(r_pad, r_att))
    ref.paligemma_with_expert.paligemma.language_model.config._attn_implementation = "eager"
    _, kv = ref.paligemma_with_expert.forward(
        attention_mask=mask4d,
        position_ids=torch.cumsum(r_pad, dim=1) - 1,
        past_key_values=None,
        inputs_embeds=[r_embs, None],
        use_cache=True,
    )
    r_v = ref.denoise_step(r_pad, kv, noise, t)
    _close(v, r_v, "velocity at t=1")


@pytest.mark.parametrize("num_steps", [1, 10])
def test_sample_actions_match(loaded, num_steps):
    ours, ref, _ = loaded
    images, img_masks, lang, lang_masks, noise = _inputs(ours.config, seed=2)
    noise_copy = noise.clone()
    state = torch.randn(B, 32)  # accepted and ignored by Pi0.5
    acts = ours.sample_actions(
        images, img_masks, lang, lang_masks, state, noise=noise, num_steps=num_steps
    )
    uncached = ours.sample_actions_uncached(
        images, img_masks, lang, lang_masks, None, noise, num_steps
    )
    r_acts = ref.sample_actions(
        *_ref_args(images, img_masks), lang, lang_masks, noise=noise, num_steps=num_steps
    )
    assert torch.equal(noise, noise_copy)
    assert acts.shape == r_acts.shape == (B, ours.config.chunk_size, ours.config.max_action_dim)
    assert (acts - noise).abs().max() > 1e-2  # the velocity is not trivially zero
    _close(acts, r_acts, f"sample_actions ({num_steps} steps)")
    _close(uncached, r_acts, f"sample_actions_uncached ({num_steps} steps)")


@torch.no_grad()
def test_comparison_is_sensitive(loaded):
    """Negative control: a small change to one adaRMS weight of the reference must break it."""
    ours, ref, _ = loaded
    images, img_masks, lang, lang_masks, noise = _inputs(ours.config, seed=2)
    dense = ref.paligemma_with_expert.gemma_expert.model.layers[1].post_attention_layernorm.dense
    saved = dense.bias.clone()
    try:
        dense.bias.add_(0.01)
        r_acts = ref.sample_actions(
            *_ref_args(images, img_masks), lang, lang_masks, noise=noise, num_steps=10
        )
    finally:
        dense.bias.copy_(saved)
    acts = ours.sample_actions(images, img_masks, lang, lang_masks, noise=noise)
    assert not torch.allclose(acts, r_acts, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("padded", [True, False])
def test_prompt_matches_lerobot_processor(padded):
    """Our prompt text vs lerobot's Pi05PrepareStateTokenizerProcessorStep (after its
    normalizer: the state given here is already normalized). lerobot pads before binning;
    without padding the expected text is openpi's (unpadded state, same format)."""
    from lerobot.policies.pi05.processor_pi05 import Pi05PrepareStateTokenizerProcessorStep
    from lerobot.processor.core import TransitionKey

    state = torch.tensor([[-1.5, -1.0, -0.99, 0.0, 0.0039, 0.5, 0.999, 1.0, 2.0]])
    task = "  pick_up the\nred cube "
    step = Pi05PrepareStateTokenizerProcessorStep(max_state_dim=32 if padded else 9)
    out = step(
        {
            TransitionKey.OBSERVATION: {"observation.state": state},
            TransitionKey.COMPLEMENTARY_DATA: {"task": [task]},
        }
    )
    ours = proc.pi05_prompt(task, state[0].numpy(), 32, padded=padded)
    assert ours == out[TransitionKey.COMPLEMENTARY_DATA]["task"][0]
    assert np.asarray(proc.discretize_state(state[0].numpy())).min() == -1  # below -1: bin -1
