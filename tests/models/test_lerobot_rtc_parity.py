"""Parity of real-time chunking with LeRobot's RTC (`lerobot.policies.rtc.modeling_rtc`, lerobot
0.4.4) driven through LeRobot's PI0 and PI05 `sample_actions(..., inference_delay=,
prev_chunk_left_over=, execution_horizon=)`: the weights and inputs of test_lerobot_parity.py
(Pi0) and test_lerobot_pi05_parity.py (Pi0.5), the same noise, leftover and delay, every prefix
schedule, float32 on CPU. Runs where lerobot is importable (see docs/parity.md); skipped otherwise.
"""

import pytest
import torch

from lerobot_harness import (
    ATOL,
    RTC_CASES,
    RTOL,
    B,
    build_models,
    close,
    inputs,
    lerobot_with_rtc,
    load_into,
    ours_with_rtc,
    require_lerobot,
    rtc_leftover,
)

from flagscale.models.pi0.rtc import RTCConfig

require_lerobot()  # skips without lerobot (in CI: run in the reference venv)


@pytest.fixture(scope="module", params=["pi0", "pi0.5"])
def loaded(request):
    ours, ref = build_models(request.param)
    return ours, ref, load_into(ref, ours)


def _run(ours, ref, config, left, delay, horizon, steps):
    x = inputs(ours.config, seed=2)
    got = ours_with_rtc(ours, x.ours(), x.noise, config, left, delay, horizon, steps)
    want = lerobot_with_rtc(ref, x.lerobot(), x.noise, config, left, delay, horizon, steps)
    plain = ours.sample_actions(*x.ours(), x.noise, steps)
    return got, want, plain


@pytest.mark.parametrize("schedule, rows, cols, delay, horizon, steps", RTC_CASES)
def test_guided_sample_actions_match_lerobot(loaded, schedule, rows, cols, delay, horizon, steps):
    ours, ref, _ = loaded
    config = RTCConfig(prefix_attention_schedule=schedule, max_guidance_weight=5.0)
    left = rtc_leftover(B, rows, cols)
    got, want, plain = _run(ours, ref, config, left, delay, horizon, steps)
    assert (got - plain).abs().max() > 1e-2  # the guidance does something
    what = f"{ours.config.variant} RTC {schedule} {rows}x{cols} d={delay} h={horizon} {steps} steps"
    close(got, want, what)


def test_rtc_comparison_is_sensitive(loaded):
    """Negative controls: another delay, or the full expert VJP (lerobot 0.4.4 evaluates v_t before
    x_t requires grad, so its correction is the weighted error itself), must not match."""
    ours, ref, _ = loaded
    left = rtc_leftover(B, 20, 10)
    _, want, _ = _run(ours, ref, RTCConfig(), left, 3, None, 10)
    for config, delay in ((RTCConfig(), 4), (RTCConfig(gradient="vjp"), 3)):
        got, _, _ = _run(ours, ref, config, left, delay, None, 10)
        assert not torch.allclose(got, want, atol=ATOL, rtol=RTOL)
