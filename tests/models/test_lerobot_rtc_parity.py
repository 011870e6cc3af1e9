"""Parity of real-time chunking with LeRobot's RTC (`lerobot.policies.rtc.modeling_rtc`, lerobot
0.4.4) driven through LeRobot's PI0 `sample_actions(..., inference_delay=, prev_chunk_left_over=,
execution_horizon=)`: same random weights, inputs, noise, leftover and delay, every prefix
schedule, float32 on CPU. Pi0.5: test_lerobot_pi05_rtc_parity.py. Runs where lerobot is
importable (see docs/parity.md); skipped otherwise.
"""

import pytest
import torch

from lerobot_harness import (
    RTC_CASES,
    lerobot_with_rtc,
    ours_with_rtc,
    require_lerobot,
    rtc_leftover,
)

from flagscale.models.pi0.rtc import RTCConfig

require_lerobot()  # skips without lerobot (in CI: run in the reference venv)
lr_parity = pytest.importorskip("test_lerobot_parity")
models, loaded = lr_parity.models, lr_parity.loaded  # its module fixtures: the same weights


def _run(ours, ref, config, left, delay, horizon, steps):
    images, img_masks, lang, lang_masks, state, noise = lr_parity._inputs(ours.config, seed=2)
    ref_args = (*lr_parity._ref_args(images, img_masks), lang, lang_masks, state)
    got = ours_with_rtc(
        ours,
        (images, img_masks, lang, lang_masks, state),
        noise,
        config,
        left,
        delay,
        horizon,
        steps,
    )
    want = lerobot_with_rtc(ref, ref_args, noise, config, left, delay, horizon, steps)
    plain = ours.sample_actions(images, img_masks, lang, lang_masks, state, noise, steps)
    return got, want, plain


@pytest.mark.parametrize("schedule, rows, cols, delay, horizon, steps", RTC_CASES)
def test_guided_sample_actions_match_lerobot(loaded, schedule, rows, cols, delay, horizon, steps):
    ours, ref, _ = loaded
    config = RTCConfig(prefix_attention_schedule=schedule, max_guidance_weight=5.0)
    left = rtc_leftover(lr_parity.B, rows, cols)
    got, want, plain = _run(ours, ref, config, left, delay, horizon, steps)
    assert (got - plain).abs().max() > 1e-2  # the guidance does something
    lr_parity._close(got, want, f"RTC {schedule} {rows}x{cols} d={delay} h={horizon} {steps} steps")


def test_rtc_comparison_is_sensitive(loaded):
    """Negative controls: another delay, or the full expert VJP (lerobot 0.4.4 evaluates v_t before
    x_t requires grad, so its correction is the weighted error itself), must not match."""
    ours, ref, _ = loaded
    left = rtc_leftover(lr_parity.B, 20, 10)
    _, want, _ = _run(ours, ref, RTCConfig(), left, 3, None, 10)
    for config, delay in ((RTCConfig(), 4), (RTCConfig(gradient="vjp"), 3)):
        got, _, _ = _run(ours, ref, config, left, delay, None, 10)
        assert not torch.allclose(got, want, atol=lr_parity.ATOL, rtol=lr_parity.RTOL)
