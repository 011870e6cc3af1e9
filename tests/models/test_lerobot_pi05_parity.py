"""Parity against the public reference: LeRobot 0.4.4's PI05 (`lerobot.policies.pi05`, a port of
openpi's `PI0Pytorch` with `pi05=True`), same random weights, same inputs, same noise, float32 on
CPU; and our Pi0.5 prompt against lerobot's `Pi05PrepareStateTokenizerProcessorStep`.

Runs only where lerobot is importable (a separate venv with openpi's transformers patch; see
docs/parity.md). Skipped otherwise. Test-harness adaptations: see lerobot_harness.py.
"""

import numpy as np
import pytest
import torch

from lerobot_harness import (
    B,
    build_models,
    check_key_layout,
    check_sample_actions,
    check_sensitive,
    close,
    inputs,
    load_into,
    require_lerobot,
    velocities_at_t1,
)

from flagscale.models.pi0 import processing as proc
from flagscale.models.pi0.weights import export_state

require_lerobot()


@pytest.fixture(scope="module")
def loaded():
    ours, ref = build_models("pi0.5")
    return ours, ref, load_into(ref, ours)


def test_strict_load_and_key_layout(loaded):
    ours, ref, result = loaded
    assert not result.missing_keys and not result.unexpected_keys
    state = export_state(ours, layout="openpi")
    lerobot = export_state(ours, layout="lerobot")  # lerobot/pi05_base: the same under model.
    assert {k.removeprefix("model."): v.shape for k, v in lerobot.items()} == {
        k: v.shape for k, v in state.items()
    }
    check_key_layout(ours, ref)
    expert = ref.paligemma_with_expert.gemma_expert.model
    torch.testing.assert_close(expert.norm.dense.weight, ours.expert.norm.dense.weight)


def test_velocity_at_t1_matches(loaded):
    ours, ref, _ = loaded
    close(*velocities_at_t1(ours, ref, inputs(ours.config, seed=1)), "velocity at t=1")


@pytest.mark.parametrize("num_steps", [1, 10])
def test_sample_actions_match(loaded, num_steps):
    """Also with a state given (accepted and ignored by Pi0.5) and without the KV cache."""
    ours, ref, _ = loaded
    x = inputs(ours.config, seed=2)
    r_acts = check_sample_actions(ours, ref, x, num_steps)
    images, img_masks, lang, lang_masks, _, noise = x
    state = torch.randn(B, 32)
    with_state = ours.sample_actions(
        images, img_masks, lang, lang_masks, state, noise=noise, num_steps=num_steps
    )
    uncached = ours.sample_actions_uncached(
        images, img_masks, lang, lang_masks, None, noise, num_steps
    )
    close(with_state, r_acts, f"sample_actions with a state ({num_steps} steps)")
    close(uncached, r_acts, f"sample_actions_uncached ({num_steps} steps)")


def test_comparison_is_sensitive(loaded):
    """Negative control: a small change to one adaRMS weight of the reference must break it."""
    ours, ref, _ = loaded
    dense = ref.paligemma_with_expert.gemma_expert.model.layers[1].post_attention_layernorm.dense
    check_sensitive(ours, ref, inputs(ours.config, seed=2), dense.bias)


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
