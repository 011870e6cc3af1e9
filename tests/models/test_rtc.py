"""Real-time chunking guidance (flagscale.models.pi0.rtc) on the tiny preset, CPU float32."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flagscale.models.pi0.rtc import (
    Guidance,
    RTCConfig,
    RTCRequest,
    guidance_weight,
    prefix_weights,
)

CHUNK, WIDTH, STEPS = 50, 32, 4


def _lin(n):
    return [1 - (i + 1) / (n + 1) for i in range(n)]


@pytest.mark.parametrize(
    "schedule, start, end, expected",
    [
        ("ZEROS", 2, 6, [1, 1] + [0] * 8),
        ("ONES", 2, 6, [1] * 6 + [0] * 4),
        ("LINEAR", 2, 6, [1, 1] + _lin(4) + [0] * 4),
        ("EXP", 2, 6, [1, 1] + [w * math.expm1(w) / (math.e - 1) for w in _lin(4)] + [0] * 4),
        ("LINEAR", 7, 6, [1] * 6 + [0] * 4),  # the delay is cut to the horizon
        ("LINEAR", 0, 10, _lin(10)),
        ("LINEAR", 3, 3, [1, 1, 1] + [0] * 7),
    ],
)
def test_prefix_weights(schedule, start, end, expected):
    got = prefix_weights(schedule, start, end, 10)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_guidance_weight_is_clipped():
    # tau = 1 - t; c = (1 - tau) / tau; inv_r2 = ((1 - tau)^2 + tau^2) / (1 - tau)^2
    assert guidance_weight(1.0, 10.0).item() == 10.0  # tau = 0: c = inf -> the max
    assert guidance_weight(0.5, 10.0).item() == pytest.approx(2.0)
    assert guidance_weight(0.75, 10.0).item() == pytest.approx(3.0 * (0.5625 + 0.0625) / 0.5625)
    assert guidance_weight(0.75, 2.0).item() == 2.0
    assert guidance_weight(0.0, 10.0).item() == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prefix_attention_schedule="CUBIC"), "prefix_attention_schedule"),
        (dict(max_guidance_weight=0), "max_guidance_weight"),
        (dict(execution_horizon=0), "execution_horizon"),
        (dict(gradient="exact"), "gradient"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RTCConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_pi05():
    from flagscale.models.pi0 import PI0Policy

    return PI0Policy.random("pi05_tiny", device="cpu", dtype="float32", seed=7)


@pytest.fixture(params=["pi0", "pi0.5"])
def variant_policy(request, tiny_policy, tiny_pi05):
    return tiny_pi05 if request.param == "pi0.5" else tiny_policy


def _inputs(policy, seed=0, batch=1):
    obs = [policy.example_observation(seed=seed + i) for i in range(batch)]
    inputs = policy.preprocess(obs)
    inputs["noise"] = policy.make_noise([None] * batch, list(range(seed, seed + batch)))
    return inputs


def _guidance(config, leftover, delay, batch=1, horizon=None):
    return Guidance.build(config, [leftover] * batch, [delay] * batch, [horizon] * batch, 50, 32)


def test_no_rtc_path_is_todays_loop_bit_for_bit(tiny_policy):
    """rtc=None runs the plain Euler loop: same ops in the same order as before RTC existed."""
    model = tiny_policy.model
    inputs = _inputs(tiny_policy, seed=1, batch=2)
    got = model.sample_actions(**inputs, num_steps=STEPS)
    embs, pad = model.embed_prefix(
        inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"]
    )
    ck, cv = model.new_cache(2, embs.shape[1])
    model.fill_prefix_cache(embs, pad, ck, cv)
    s, dt, noise = model.suffix_inputs(pad, CHUNK), -1.0 / STEPS, inputs["noise"]
    embs_t = model.time_embedding(
        torch.tensor([1.0 + i * dt for i in range(STEPS)]).repeat_interleave(2)
    )
    embs_t = embs_t.view(STEPS, 2, -1)
    x = noise + dt * model.first_step(inputs["state"], noise, embs_t[0], s, ck, cv)
    for i in range(1, STEPS):
        x = x + dt * model.denoise_step(x, embs_t[i], s.cos, s.sin, s.mask, ck, cv)
    assert torch.equal(got, x)


def test_rows_without_rtc_are_unchanged_in_a_guided_batch(tiny_policy):
    model = tiny_policy.model
    inputs = _inputs(tiny_policy, seed=2, batch=2)
    plain = model.sample_actions(**inputs, num_steps=STEPS)
    left = np.ones((20, 14), np.float32)
    for gradient in ("lerobot", "vjp"):
        guide = Guidance.build(
            RTCConfig(gradient=gradient), [left, None], [4, None], [None] * 2, 50, 32
        )
        mixed = model.sample_actions(**inputs, num_steps=STEPS, rtc=guide)
        assert torch.equal(mixed[1], plain[1])
        assert not torch.allclose(mixed[0], plain[0], atol=1e-3)


def test_velocity_autograd_equals_denoise_step(variant_policy):
    model = variant_policy.model
    inputs = _inputs(variant_policy, seed=3, batch=2)
    embs, pad = model.embed_prefix(
        inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"]
    )
    ck, cv = model.new_cache(2, embs.shape[1])
    model.fill_prefix_cache(embs, pad, ck, cv)
    s = model.suffix_inputs(pad, CHUNK)
    temb = model.step_conditions(torch.full((1, 2), 0.6))[0]
    model.first_step(inputs.get("state"), inputs["noise"], temb, s, ck, cv)  # Pi0: state K/V
    x = torch.randn(2, CHUNK, WIDTH)
    keep = (ck.clone(), cv.clone())
    v = model.velocity_autograd(x, temb, s, ck, cv)
    assert torch.equal(ck, keep[0]) and torch.equal(cv, keep[1])  # nothing written
    torch.testing.assert_close(v, model.denoise_step(x, temb, s.cos, s.sin, s.mask, ck, cv))


def _non_inplace_residual(x, weight, residual, inplace=False):
    return residual + F.linear(x, weight)


def _non_inplace_gated_residual(x, weight, residual, gate, inplace=False):
    return residual + F.linear(x, weight) * gate


def _paper_weight(t, top):
    tau = 1 - t
    if tau == 0:
        return top
    return min(top, (1 - tau) / tau * ((1 - tau) ** 2 + tau**2) / (1 - tau) ** 2)


def _reference(model, inputs, config, target, weights):
    """Straightforward guided Euler: every step runs both towers over the whole sequence (no
    cache) under autograd; the VJP by torch.autograd.grad (gradient "vjp") or err itself."""
    embs, pad = model.embed_prefix(
        inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"]
    )
    dt, x = -1.0 / STEPS, inputs["noise"].clone()
    for i in range(STEPS):
        t = 1.0 + i * dt
        tt = torch.full((x.shape[0],), t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(config.gradient == "vjp")
            v = model._joint_velocity(embs, pad, inputs.get("state"), xg, tt)
            x1 = xg - t * v
            err = (target - x1.detach()) * weights
            corr = torch.autograd.grad(x1, xg, err)[0] if xg.requires_grad else err
        w = _paper_weight(t, config.max_guidance_weight)
        x = x + dt * (v.detach() - w * corr)
    return x


@pytest.mark.parametrize("schedule, gradient", [("LINEAR", "vjp"), ("EXP", "lerobot")])
def test_guided_sampling_matches_uncached_autograd_reference(
    variant_policy, monkeypatch, gradient, schedule
):
    model = variant_policy.model
    inputs = _inputs(variant_policy, seed=4, batch=2)
    config = RTCConfig(prefix_attention_schedule=schedule, gradient=gradient, execution_horizon=12)
    left = torch.randn(2, 30, 10, generator=torch.Generator().manual_seed(0))
    guide = Guidance.build(config, list(left.numpy()), [3, 6], [None, 20], 50, 32)
    got = model.sample_actions(**inputs, num_steps=STEPS, rtc=guide)
    monkeypatch.setattr(model.ops, "linear_residual", _non_inplace_residual)
    monkeypatch.setattr(model.ops, "linear_gated_residual", _non_inplace_gated_residual)
    ref = _reference(model, inputs, config, guide.target, guide.weights)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if gradient == "vjp":  # the Jacobian term is not negligible on these weights
        lerobot = model.sample_actions(
            **inputs,
            num_steps=STEPS,
            rtc=Guidance(
                RTCConfig(schedule, gradient="lerobot", execution_horizon=12),
                guide.target,
                guide.weights,
            ),
        )
        assert (lerobot - got).abs().max() > 1e-3


# ---- policy ------------------------------------------------------------------------------


def _mad(a, b):
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("schedule", ["LINEAR", "ZEROS"])
def test_policy_guidance_pulls_the_delayed_actions_to_the_leftover(variant_policy, schedule):
    policy, delay, executed = variant_policy, 4, 10
    obs = policy.example_observation(seed=11)
    prev = policy.infer(obs, seed=1, num_steps=5)["actions"]
    left = prev[executed:]
    nxt = policy.example_observation(seed=12)
    plain = policy.infer(nxt, seed=2, num_steps=5)["actions"]
    saved = policy.rtc_config
    policy.rtc_config = RTCConfig(prefix_attention_schedule=schedule)
    try:
        guided = policy.infer(nxt, seed=2, num_steps=5, rtc=RTCRequest(left, delay))["actions"]
    finally:
        policy.rtc_config = saved
    before, after = _mad(plain[:delay], left[:delay]), _mad(guided[:delay], left[:delay])
    print(
        f"{schedule}: first {delay} actions vs leftover, mean abs diff {before:.3f} -> {after:.3f}"
    )
    assert after <= 0.5 * before
    assert _mad(guided[30:], plain[30:]) < _mad(guided[:delay], plain[:delay])  # prefix moved most


@pytest.mark.parametrize("mode", ["MEAN_STD", "QUANTILES"])
def test_policy_normalizes_the_leftover_with_the_action_stats(tiny_policy, mode):
    from flagscale.models.pi0 import PI0Policy, normalize as norm

    rng = np.random.default_rng(0)
    lo, hi = rng.standard_normal(7).astype(np.float32), rng.uniform(0.5, 2, 7).astype(np.float32)
    if mode == "QUANTILES":
        hi = lo + hi
    stats = norm.Normalizer(action=norm.FeatureNorm(mode, lo, hi))
    policy = PI0Policy(tiny_policy.model, tiny_policy.tokenizer, stats)
    left = rng.standard_normal((5, 7)).astype(np.float32)
    guide = policy.rtc_guidance([RTCRequest(left, 2, execution_horizon=4)])
    expected = np.zeros((50, 32), np.float32)
    if mode == "MEAN_STD":
        expected[:5, :7] = (left - lo) / (hi + 1e-8)
    else:
        expected[:5, :7] = 2 * (left - lo) / (hi - lo) - 1
    np.testing.assert_allclose(guide.target[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    weights = prefix_weights("LINEAR", 2, 4, 50)
    assert torch.equal(guide.weights[0, :, 0], weights)
    # a returned chunk, given back, lands where the model produced it
    out = policy.infer(policy.example_observation(seed=3), seed=3, num_steps=2)["actions"]
    back = policy.rtc_guidance([RTCRequest(out, 0)]).target[0, :, :7].numpy()
    np.testing.assert_allclose(stats.unnormalize_actions(back), out, rtol=1e-5, atol=1e-5)
    # fewer columns than the stats (a server cutting actions): the first stats apply
    cut = policy.rtc_guidance([RTCRequest(left[:, :3], 0)]).target[0, :5, :4].numpy()
    np.testing.assert_allclose(cut[:, :3], expected[:5, :3], rtol=1e-5, atol=1e-5)
    assert not cut[:, 3].any()


@pytest.mark.parametrize(
    "request_kwargs, match",
    [
        (dict(prev_chunk_left_over=np.zeros(32)), "shape"),
        (dict(prev_chunk_left_over=np.zeros((0, 32))), "shape"),
        (dict(prev_chunk_left_over=np.zeros((51, 32))), "shape"),
        (dict(prev_chunk_left_over=np.zeros((5, 33))), "columns"),
        (dict(prev_chunk_left_over=[[0.0] * 32, [1.0]]), "prev_chunk_left_over"),
        (dict(prev_chunk_left_over=np.full((5, 32), np.nan)), "NaN"),
        (dict(prev_chunk_left_over="abc"), "prev_chunk_left_over"),
        (dict(inference_delay=-1), "inference_delay"),
        (dict(inference_delay=51), "inference_delay"),
        (dict(inference_delay=2.5), "inference_delay"),
        (dict(inference_delay=True), "inference_delay"),
        (dict(execution_horizon=0), "execution_horizon"),
        (dict(execution_horizon=60), "execution_horizon"),
    ],
)
def test_policy_rejects_bad_rtc_requests(tiny_policy, request_kwargs, match):
    kwargs = dict(prev_chunk_left_over=np.zeros((5, 32)), inference_delay=2)
    kwargs.update(request_kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_policy.infer(tiny_policy.example_observation(), rtc=RTCRequest(**kwargs))


def test_serve_config_mirrors_the_model_settings():
    """flagscale.serve.config stays torch-free, so it repeats the names and defaults."""
    import dataclasses

    from flagscale.models.pi0 import rtc
    from flagscale.serve.config import RTC_DEFAULTS, RTC_GRADIENTS, RTC_SCHEDULES

    assert RTC_SCHEDULES == rtc.SCHEDULES and RTC_GRADIENTS == rtc.GRADIENTS
    defaults = dataclasses.asdict(RTCConfig())
    assert {k: v for k, v in RTC_DEFAULTS.items() if k != "enabled"} == defaults
