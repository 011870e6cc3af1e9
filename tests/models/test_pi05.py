"""Pi0.5 on the tiny preset (CPU, float32): model paths, the prompt with the discretized state,
checkpoints in both layouts, variant detection. Parity with lerobot's PI05: test_lerobot_pi05_parity.py.
"""

import json

import numpy as np
import pytest
import torch

from safetensors.torch import load_file, save_file

from flagscale.models.pi0 import PI0Policy, processing as proc
from flagscale.models.pi0.weights import CheckpointError, save_pretrained

STATS = {
    "observation.state": {
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "q01": [-1.0, 0.0, 10.0],
        "q99": [1.0, 4.0, 10.0],  # the third: q99 == q01
    },
    "action": {"mean": [0.0] * 4, "std": [1.0] * 4, "q01": [0.0] * 4, "q99": [2.0, 4.0, 6.0, 8.0]},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from flagscale.models.pi0.tokenizer import build_test_tokenizer

    return build_test_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.json"
    path.write_text(json.dumps(STATS))
    return str(path)


@pytest.fixture(scope="module")
def pi05(tokenizer_dir, stats_path):
    return PI0Policy.random(
        "pi05_tiny", dtype="float32", seed=7, tokenizer_path=tokenizer_dir, stat_path=stats_path
    )


def obs(seed=0, state=(0.5, 1.0, 10.0)):
    rng = np.random.default_rng(seed)
    images = {k: rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for k in ("base_0_rgb",)}
    return {"images": images, "state": np.array(state, np.float32), "prompt": "pick_up the cube"}


def test_cached_equals_uncached_and_state_is_ignored(pi05):
    inputs = pi05.preprocess([obs(1), obs(2, state=(-3.0, 0.0, 10.0))])
    noise = pi05.make_noise([None, None], [3, 4])
    cached = pi05.model.sample_actions(**inputs, noise=noise, num_steps=4)
    uncached = pi05.model.sample_actions_uncached(
        inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"],
        None, noise, 4,
    )  # fmt: skip
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
    other = dict(inputs, state=torch.randn_like(inputs["state"]))
    assert torch.equal(pi05.model.sample_actions(**other, noise=noise, num_steps=4), cached)
    no_state = dict(inputs, state=None)
    assert torch.equal(pi05.model.sample_actions(**no_state, noise=noise, num_steps=4), cached)
    assert pi05.model.new_cache(1, 10)[0].shape[2] == 10 + 50  # no state slot


def test_discretization_hand_computed():
    # bin edges -1 + k/128; below -1: -1; 0 starts bin 128; 1 and above: 255
    s = np.array([-1.5, -1.0, -0.99, 0.0, 0.0039, 0.0079, 0.999, 1.0, 2.0], np.float32)
    assert proc.discretize_state(s).tolist() == [-1, 0, 1, 128, 128, 129, 255, 255, 255]


def test_prompt_text_lerobot_and_openpi():
    s = np.array([-1.0, 0.5], np.float32)
    padded = proc.pi05_prompt(" open_the\ndrawer ", s, 4, padded=True)
    assert padded == "Task: open the drawer, State: 0 192 128 128;\nAction: "
    assert proc.pi05_prompt("x", s, 4, padded=False) == "Task: x, State: 0 192;\nAction: "


def test_policy_prompt_normalization_and_unnormalization(pi05):
    """QUANTILES (lerobot eps) by hand: state (0.5, 1, 10) with q01 (-1, 0, 10), q99 (1, 4, 10)
    -> 2 * (x - q01) / (q99 - q01) - 1 = (0.5, -0.5, -1) (the zero range uses 1e-8) -> bins
    (192, 64, 0) + 29 x 128; actions (a + 1) * (q99 - q01) / 2 + q01."""
    o = obs(3)
    inputs = pi05.preprocess([o])
    want = "Task: pick up the cube, State: 192 64 0 " + " ".join(["128"] * 29) + ";\nAction: "
    ids, mask = proc.tokenize_prompts(pi05.tokenizer, [want], 200, newline=False)
    assert torch.equal(inputs["lang_tokens"], ids) and torch.equal(inputs["lang_masks"], mask)
    assert ids[0, 0] == 2 and inputs["lang_tokens"].shape == (1, 200)
    noise = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    raw = pi05.model.sample_actions(**inputs, noise=torch.from_numpy(noise)[None], num_steps=3)
    out = pi05.infer(o, noise=noise, num_steps=3)["actions"]
    q99 = np.array([2.0, 4.0, 6.0, 8.0], np.float32)
    np.testing.assert_allclose(out, (raw[0, :, :4].numpy() + 1) * q99 / 2, rtol=1e-6, atol=1e-6)


def test_state_is_required_and_too_long_state_is_refused(pi05):
    with pytest.raises(ValueError, match="state is required"):
        pi05.infer(dict(obs(), state=None), seed=0)
    with pytest.raises(ValueError, match="state has 4 values, stats expect 3"):
        pi05.infer(obs(state=(1.0, 2.0, 3.0, 4.0)), seed=0)


def test_lerobot_image_padding_is_minus_three(pi05):
    images, _ = proc.prepare_images([obs()["images"]], ["base_0_rgb"], 56, "center", "cpu", -3.0)
    assert images[0, 0, :, 0].eq(-3.0).all() and images[0, 0, :, -1].eq(-3.0).all()  # 40 -> 56 rows
    assert images[0, 0, :, 8:48].ge(-1.0).all()
    assert pi05.metadata["reference_choices"]["image_pad_value"] == -3.0


def test_metadata_shows_variant_and_choices(pi05):
    meta = pi05.metadata
    assert meta["model_variant"] == "pi0.5" and meta["tokenizer_max_length"] == 200
    assert meta["reference_choices"] == {
        "variant": "pi0.5",
        "reference": "lerobot",
        "norm_eps": "lerobot",
        "discrete_state_input": True,
        "state_bins_padded": True,
        "image_pad_value": -3.0,
    }
    assert meta["normalization"]["state"] == {"mode": "QUANTILES", "dim": 3, "eps": "lerobot"}


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
def test_round_trip_both_layouts(tmp_path, pi05, tokenizer_dir, stats_path, layout):
    save_pretrained(pi05.model, str(tmp_path), layout=layout)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    prefix = "model." if layout == "lerobot" else ""
    expert = f"{prefix}paligemma_with_expert.gemma_expert.model"
    assert f"{expert}.layers.0.input_layernorm.dense.weight" in keys
    assert f"{expert}.norm.dense.bias" in keys and f"{prefix}time_mlp_in.weight" in keys
    assert not any("state_proj" in k or "action_time_mlp" in k for k in keys)
    assert not any(k.startswith(expert) and k.endswith("norm.weight") for k in keys)
    # lerobot/pi05_base: G3 names (= openpi's) under `model.`, the token embedding as lm_head
    assert f"{prefix}paligemma_with_expert.paligemma.lm_head.weight" in keys
    assert not any(k.endswith("embed_tokens.weight") or ".language_model.model." in k for k in keys)
    loaded = PI0Policy.from_pretrained(
        str(tmp_path), tokenizer_dir, stats_path, device="cpu", progress=False
    )
    assert loaded.config.variant == "pi0.5"  # openpi: no "type" in config.json, from the tensors
    want = "lerobot" if layout == "lerobot" else "openpi"
    assert loaded.choices["reference"] == loaded.choices["norm_eps"] == want
    assert loaded.choices["state_bins_padded"] is (layout == "lerobot")
    for a, b in zip(pi05.model.parameters(), loaded.model.parameters()):
        assert torch.equal(a, b)
    if layout == "lerobot":  # same choices: same actions end to end
        o = obs(4)
        assert np.array_equal(pi05.infer(o, seed=1)["actions"], loaded.infer(o, seed=1)["actions"])


def test_variant_mismatches_are_clear_errors(tmp_path, pi05, tokenizer_dir):
    save_pretrained(pi05.model, str(tmp_path))
    with pytest.raises(ValueError, match="'pi0' was asked for but .* is a pi0.5 policy"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, variant="pi0", progress=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, type="pi0")))
    with pytest.raises(CheckpointError, match="describes a pi0 policy but the weights are pi0.5"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, progress=False)


def test_missing_and_misshaped_adarms_tensors_are_named(tmp_path, pi05, tokenizer_dir):
    save_pretrained(pi05.model, str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    key = "model.paligemma_with_expert.gemma_expert.model.layers.1.post_attention_layernorm"
    state = load_file(path)
    state[f"{key}.dense.weight"] = state[f"{key}.dense.weight"][:, :-1].contiguous()
    save_file(state, path)
    with pytest.raises(CheckpointError, match=f"{key}.dense.weight.*expected"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, progress=False)
    del state[f"{key}.dense.weight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match=f"missing tensor.*{key}.dense.weight"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, progress=False)


def test_missing_quantile_stats_is_a_startup_error(tmp_path, tokenizer_dir):
    path = tmp_path / "stats.json"
    entry = {"mean": [0.0] * 3, "std": [1.0] * 3}
    path.write_text(json.dumps({"observation.state": entry, "action": entry}))
    with pytest.raises(ValueError, match=r"stats.json: QUANTILES .* missing \['q01', 'q99'\]"):
        PI0Policy.random("pi05_tiny", tokenizer_path=tokenizer_dir, stat_path=str(path))


def test_no_discrete_state_input_uses_the_plain_prompt(tokenizer_dir, stats_path):
    policy = PI0Policy.random(
        "pi05_tiny", tokenizer_path=tokenizer_dir, stat_path=stats_path, discrete_state_input=False
    )
    ids = policy.preprocess([obs()])["lang_tokens"]
    want, _ = proc.tokenize_prompts(policy.tokenizer, ["pick up the cube"], 200)
    assert torch.equal(ids, want)
    assert policy.infer(dict(obs(), state=None), seed=0)["actions"].shape == (50, 4)


def test_bf16_keeps_the_modulation_path_fp32(pi05, tokenizer_dir, stats_path):
    """As lerobot / openpi: the adaRMS dense layers (and the time MLP feeding them) stay fp32."""
    bf16 = PI0Policy.random(
        "pi05_tiny", dtype="bfloat16", seed=7, tokenizer_path=tokenizer_dir, stat_path=stats_path
    )
    params = dict(bf16.model.named_parameters())
    assert params["expert.layers.0.qkv_proj.weight"].dtype == torch.bfloat16
    for name in ("expert.layers.0.input_norm.dense.weight", "expert.norm.dense.bias"):
        assert params[name].dtype == torch.float32
    assert params["time_mlp_in.weight"].dtype == torch.float32
    out, ref = (p.infer(obs(5), seed=2, num_steps=3)["actions"] for p in (bf16, pi05))
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
