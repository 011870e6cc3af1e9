"""Whole-model behaviour on the tiny preset (CPU, float32)."""

import json

import numpy as np
import pytest
import torch

from flagscale.models.pi0 import PI0Config, PI0Model
from flagscale.models.pi0.weights import init_random_weights


def test_cached_prefix_equals_uncached(tiny_policy):
    obs = [tiny_policy.example_observation(seed=1), tiny_policy.example_observation(2, seed=2)]
    obs[1]["prompt"] = "a much longer instruction that uses more of the token budget"
    inputs = tiny_policy.preprocess(obs)
    noise = tiny_policy.make_noise([None, None], [3, 4])
    cached = tiny_policy.model.sample_actions(**inputs, noise=noise, num_steps=4)
    uncached = tiny_policy.model.sample_actions_uncached(**inputs, noise=noise, num_steps=4)
    assert cached.shape == (2, 50, 32)
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_fixed_noise_is_bit_identical_and_untouched(tiny_policy):
    inputs = tiny_policy.preprocess([tiny_policy.example_observation(seed=5)])
    noise = torch.randn(1, 50, 32)
    keep = noise.clone()
    a = tiny_policy.model.sample_actions(**inputs, noise=noise, num_steps=3)
    b = tiny_policy.model.sample_actions(**inputs, noise=noise, num_steps=3)
    assert torch.equal(a, b)
    assert torch.equal(noise, keep)
    assert not torch.equal(a, noise)


def test_list_inputs_follow_lerobot_conventions(tiny_policy):
    inputs = tiny_policy.preprocess([tiny_policy.example_observation(seed=6)])
    images = list(inputs["images"].unbind(1))
    masks = list(inputs["img_masks"].unbind(1))
    noise = torch.randn(1, 50, 32)
    stacked = tiny_policy.model.sample_actions(**inputs, noise=noise, num_steps=2)
    listed = tiny_policy.model.sample_actions(
        images, masks, inputs["lang_tokens"], inputs["lang_masks"], inputs["state"], noise, 2
    )
    assert torch.equal(stacked, listed)


def test_batch_equals_solo_runs(tiny_policy):
    obs = [tiny_policy.example_observation(seed=s) for s in (7, 8, 9)]
    obs[1]["images"].pop("right_wrist_0_rgb")  # a masked camera in the middle of a batch
    batch = tiny_policy.infer_batch(obs, num_steps=3, seeds=[1, 2, 3])
    for o, seed, out in zip(obs, (1, 2, 3), batch):
        solo = tiny_policy.infer(o, num_steps=3, seed=seed)
        np.testing.assert_allclose(out["actions"], solo["actions"], rtol=1e-5, atol=1e-5)


def test_masked_camera_is_ignored_and_dropping_it_is_equivalent(tiny_policy):
    from flagscale.models.pi0 import processing as proc

    obs = tiny_policy.example_observation(seed=10)
    two = dict(obs, images={k: v for k, v in obs["images"].items() if k != "left_wrist_0_rgb"})
    noise = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    dropped = tiny_policy.infer(two, noise=noise)["actions"]  # slot dropped: 2 cameras
    assert tiny_policy.preprocess([two])["images"].shape[1] == 2
    # all 3 slots, the left one masked and filled with garbage: must not matter
    size = tiny_policy.config.image_size
    images, masks = proc.prepare_images([two["images"]], tiny_policy.image_keys, size)
    assert masks.tolist() == [[True, False, True]]
    images[:, 1] = torch.rand_like(images[:, 1])
    inputs = tiny_policy.preprocess([two])
    inputs.update(images=images, img_masks=masks)
    masked = tiny_policy.model.sample_actions(**inputs, noise=torch.as_tensor(noise)[None])
    np.testing.assert_allclose(
        dropped, masked[0, :, : dropped.shape[1]].numpy(), rtol=1e-5, atol=1e-5
    )


def test_num_steps_changes_result_and_is_validated(tiny_policy):
    obs = tiny_policy.example_observation(seed=11)
    a = tiny_policy.infer(obs, num_steps=2, seed=0)["actions"]
    b = tiny_policy.infer(obs, num_steps=5, seed=0)["actions"]
    assert not np.allclose(a, b)
    inputs = tiny_policy.preprocess([obs])
    with pytest.raises(ValueError, match="num_steps"):
        tiny_policy.model.sample_actions(**inputs, num_steps=0)


def test_state_token_cache_matches_recomputation(tiny_policy):
    """The first step writes the state token's K/V (computed with the chunk, behind its own mask
    row); they equal a separate pass over the state token alone, and later steps never rewrite
    the prefix or the state slot."""
    from flagscale.models.pi0.modeling_pi0 import _stack_cameras, additive_mask, rope_cos_sin

    model = tiny_policy.model
    inputs = tiny_policy.preprocess([tiny_policy.example_observation(seed=12)])
    images, masks = _stack_cameras(inputs["images"], inputs["img_masks"])
    embs, pad = model.embed_prefix(images, masks, inputs["lang_tokens"], inputs["lang_masks"])
    p = embs.shape[1]
    noise = torch.randn(1, 50, 32)
    k1, v1 = model.new_cache(1, p)
    model.fill_prefix_cache(embs, pad, k1, v1)
    model.euler(noise, 1, pad, inputs["state"], k1, v1)
    snapshot = k1[:, :, : p + 1].clone(), v1[:, :, : p + 1].clone()
    model.euler(noise, 3, pad, inputs["state"], k1, v1)
    assert torch.equal(k1[:, :, : p + 1], snapshot[0])
    assert torch.equal(v1[:, :, : p + 1], snapshot[1])
    # the state token alone: position = number of valid prefix tokens, keys = valid prefix + itself
    k2, v2 = model.new_cache(1, p)
    model.fill_prefix_cache(embs, pad, k2, v2)
    x = model.state_proj(inputs["state"].to(model.dtype))[:, None]
    cos, sin = rope_cos_sin(
        pad.sum(1, keepdim=True), model.config.expert.head_dim, model.config.rope_theta
    )
    mask = additive_mask(torch.cat([pad, torch.ones_like(pad[:, :1])], 1)[:, None], x.dtype)
    model._expert_pass(x, p, cos, sin, mask, k2, v2)
    torch.testing.assert_close(k1[:, :, p], k2[:, :, p], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v1[:, :, p], v2[:, :, p], rtol=1e-5, atol=1e-5)


def test_full_size_parameter_table_on_meta():
    config = PI0Config.from_preset("pi0")
    with torch.device("meta"):
        model = PI0Model(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == 3_238_048_528  # unique Pi0 parameters (pi0-model.md section 1.5)
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert shapes["llm.layers.0.qkv_proj.weight"] == (2048 + 2 * 256, 2048)
    assert shapes["expert.layers.17.qkv_proj.weight"] == (2048 + 2 * 256, 1024)
    assert shapes["expert.layers.0.o_proj.weight"] == (1024, 2048)
    assert shapes["vision.layers.26.fc1.weight"] == (4304, 1152)
    assert shapes["llm.embed"] == (257152, 2048)


def test_tiny_model_is_deterministic_from_seed():
    def build():
        with torch.device("meta"):
            m = PI0Model(PI0Config.from_preset("tiny"))
        m = m.to_empty(device="cpu")
        init_random_weights(m, seed=3)
        return m

    a, b = build(), build()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_compiled_passes_match_eager():
    """torch.compile of the prefix / first-step / denoise passes (the engine's `compile` option) computes
    the same actions as the eager passes (CPU inductor here; GPU in benchmarks)."""
    from flagscale.models.pi0 import PI0Policy

    policy = PI0Policy.random("tiny", device="cpu", dtype="float32", seed=4)
    obs = policy.example_observation(seed=4)
    eager = policy.infer(obs, num_steps=3, seed=1)["actions"]
    policy.model.compile_passes()
    compiled = policy.infer(obs, num_steps=3, seed=1)["actions"]
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-4)


def test_model_inputs_own_aligned_storage(tiny_policy):
    """preprocess hands the model tensors in allocator-aligned storage of their own (not numpy's
    16-byte aligned buffers): CPU GEMM kernels are chosen by operand alignment."""
    inputs = tiny_policy.preprocess([tiny_policy.example_observation(seed=13)])
    inputs["noise"] = tiny_policy.make_noise([np.zeros((50, 32), np.float32)], [None])
    for name, tensor in inputs.items():
        assert tensor.data_ptr() % 64 == 0, name


@pytest.mark.parametrize("source", ["preset", "config.json"])
def test_time_embedding_through_the_models_config(source):
    """The model's own time embedding (periods from its config) against openpi's constants:
    sin first, periods 4e-3 .. 4.0 over the expert width, computed in float64."""
    import math

    config = PI0Config.from_preset("tiny")
    if source == "config.json":  # as a lerobot checkpoint's config.json is read
        config = PI0Config.from_json_dict(json.loads(json.dumps(config.to_json_dict())))
    with torch.device("meta"):
        model = PI0Model(config)
    t = torch.tensor([1.0, 0.55, 0.1, 0.0])
    emb = model.time_embedding(t)
    half = config.expert.width // 2
    period = 4e-3 * (4.0 / 4e-3) ** torch.linspace(0, 1, half, dtype=torch.float64)
    arg = t.double()[:, None] * 2 * math.pi / period
    ref = torch.cat([arg.sin(), arg.cos()], -1).float()
    assert emb.shape == (4, config.expert.width) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)
