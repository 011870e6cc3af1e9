"""Pre/post-processing: resize-with-pad, normalization, tokenization, padding."""

import json

import numpy as np
import pytest
import torch

from stats_helpers import load_stats

from flagscale.models.pi0 import processing as proc


def test_resize_with_pad_center_keeps_aspect_ratio():
    img = torch.ones(1, 3, 60, 120)  # wide white image
    out = proc.resize_with_pad(img, 56, "center")
    assert out.shape == (1, 3, 56, 56)
    rows = out[0, 0, :, 28]
    # 120x60 -> 56x28, padded 14 rows top and bottom, black
    assert torch.all(rows[:14] == 0) and torch.all(rows[14:42] == 1) and torch.all(rows[42:] == 0)


def test_resize_with_pad_top_left_and_odd_padding():
    img = torch.ones(1, 3, 101, 50)  # tall image, odd sizes
    out = proc.resize_with_pad(img, 56, "top_left")
    new_w = int(50 / (101 / 56))
    cols = out[0, 0, 28]
    assert torch.all(cols[: 56 - new_w] == 0) and torch.all(cols[56 - new_w :] == 1)
    centered = proc.resize_with_pad(img, 56, "center")[0, 0, 28]
    left = (56 - new_w) // 2
    assert torch.all(centered[:left] == 0) and torch.all(centered[left : left + new_w] == 1)
    assert torch.all(centered[left + new_w :] == 0)
    with pytest.raises(ValueError):
        proc.resize_with_pad(img, 56, "bottom")


def test_prepare_images_scales_and_masks_missing_cameras():
    img = np.full((30, 40, 3), 255, np.uint8)
    images, masks = proc.prepare_images([{"a": img}, {"b": img}], ["a", "b"], 56)
    assert images.shape == (2, 2, 3, 56, 56)
    assert masks.tolist() == [[True, False], [False, True]]
    assert images[0, 1].eq(-1).all()  # missing camera -> black in [-1, 1]
    assert images[0, 0].max() == 1.0 and images[0, 0].min() == -1.0  # white content, black pad


def test_normalization_round_trip(tmp_path):
    stats = {
        "observation.state": {"mean": [1.0, -2.0, 0.5], "std": [2.0, 0.5, 1.0]},
        "action": {"mean": [0.1, 0.2], "std": [3.0, 4.0]},
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    norm = load_stats(str(path))
    x = np.array([3.0, -1.0, 0.5], np.float32)
    np.testing.assert_allclose(norm.normalize_state(x), [1.0, 2.0, 0.0], rtol=1e-6)
    a = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    un = norm.unnormalize_actions(a)
    assert un.shape == (50, 2)
    back = (un - np.array([0.1, 0.2])) / (np.array([3.0, 4.0]) + 1e-8)
    np.testing.assert_allclose(back, a[:, :2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stats expect 3"):
        norm.normalize_state(np.zeros(4, np.float32))


def test_openpi_norm_stats_format(tmp_path):
    raw = {
        "norm_stats": {
            "state": {"mean": [0.0], "std": [1.0]},
            "actions": {"mean": [1.0], "std": [2.0]},
        }
    }
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps(raw))
    norm = load_stats(str(path))
    np.testing.assert_allclose(
        norm.unnormalize_actions(np.ones((2, 32), np.float32)), 1 * (2 + 1e-6) + 1
    )


def test_stats_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_stats(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"observation.state": {"mean": [0], "std": [1]}}))
    with pytest.raises(ValueError, match="action"):
        load_stats(str(bad))


def test_pad_vector():
    np.testing.assert_array_equal(proc.pad_vector([1, 2], 4), [1, 2, 0, 0])
    with pytest.raises(ValueError, match="exceeds"):
        proc.pad_vector(np.zeros(33), 32)


def test_prompt_tokenization_bos_newline_right_pad(tiny_policy):
    tok = tiny_policy.tokenizer
    ids, mask = proc.tokenize_prompts(tok, ["pick up the cube", "x" * 500], 48)
    assert ids.shape == (2, 48) and mask.dtype == torch.bool
    n = int(mask[0].sum())
    assert ids[0, 0] == 2  # BOS
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert ids[0, n - len(newline) : n].tolist() == newline  # prompt ends with "\n"
    assert torch.all(ids[0, n:] == 0) and not mask[0, n:].any()  # right padding with 0
    assert mask[1].all()  # long prompt truncated to 48


def test_aloha_adaptation_flips_joints():
    state = np.zeros(14, np.float32)
    state[1], state[8] = 0.3, -0.2
    state[6] = state[13] = 0.03
    out = proc.aloha_state_to_pi(state)
    assert out[1] == pytest.approx(-0.3) and out[8] == pytest.approx(0.2)
    assert np.isfinite(out).all() and out[6] == out[13]
    actions = proc.pi_actions_to_aloha(np.ones((50, 14), np.float32))
    assert actions[0, 1] == -1 and actions[0, 0] == 1


def test_resize_with_pad_very_thin_image_keeps_one_pixel():
    # regression: a 1 x 4000 image resized to 0 rows and F.interpolate raised (HTTP 500)
    for h, w in ((1, 4000), (4000, 1)):
        out = proc.resize_with_pad(torch.ones(1, 3, h, w), 56, "center")
        assert out.shape == (1, 3, 56, 56) and out.max() == 1.0


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32), np.uint8),  # grayscale
        np.zeros((32, 32, 4), np.uint8),  # RGBA
        np.zeros((3, 32, 32), np.uint8),  # CHW
        np.full((32, 32, 3), 60000, np.uint16),  # 16-bit: was silently divided by 255
        np.full((32, 32, 3), 0.5, np.float32),  # float: was silently read as near-black
        np.zeros((0, 32, 3), np.uint8),
    ],
    ids=["gray", "rgba", "chw", "uint16", "float", "empty"],
)
def test_prepare_images_refuses_what_it_would_misread(image):
    with pytest.raises(ValueError, match="image 'a'"):
        proc.prepare_images([{"a": image}], ["a"], 56)


def test_stats_with_mismatched_mean_and_std_are_refused(tmp_path):
    path = tmp_path / "stats.json"
    entry = {"mean": [0.0] * 14, "std": [1.0] * 7}
    path.write_text(json.dumps({"observation.state": entry, "action": entry}))
    with pytest.raises(ValueError, match="mean has 14 values but std has 7"):
        load_stats(str(path))


def test_policy_refuses_2d_and_non_finite_state(tiny_policy):
    obs = {"images": {"base_0_rgb": np.zeros((32, 32, 3), np.uint8)}, "prompt": "x"}
    with pytest.raises(ValueError, match="1-D"):  # was flattened into one 28-value state
        tiny_policy.infer({**obs, "state": np.zeros((2, 14), np.float32)}, seed=0)
    with pytest.raises(ValueError, match="NaN"):  # was NaN actions
        tiny_policy.infer({**obs, "state": np.full(14, np.nan, np.float32)}, seed=0)


def test_stats_wider_than_the_model_are_refused(tmp_path):
    from flagscale.models.pi0 import PI0Policy

    stats = {
        "observation.state": {"mean": [0.0] * 14, "std": [1.0] * 14},
        "action": {"mean": [0.0] * 40, "std": [1.0] * 40},
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="action has 40 dims.*at most 32"):
        PI0Policy.random("tiny", stat_path=str(path))


def test_prompt_cache_rows_equal_fresh_tokenization(tiny_policy):
    tok = tiny_policy.tokenizer
    cache = proc.PromptCache(tok, 16, size=2)
    prompts = ["pick up the cube", "", "fold the towel", "pick up the cube"]
    for _ in range(2):  # second round: partly cached, partly evicted (size 2)
        ids, masks = cache(prompts)
        want_ids, want_masks = proc.tokenize_prompts(tok, prompts, 16)
        assert torch.equal(ids, want_ids) and torch.equal(masks, want_masks)
    assert list(cache._rows) == ["fold the towel", "pick up the cube"]  # most recent last


def test_prepare_images_mixed_sizes_and_slots_match_one_by_one():
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    frames = [{"a": big, "b": small}, {"b": big}]
    images, masks = proc.prepare_images(frames, ["a", "b"], 16)
    assert masks.tolist() == [[True, True], [False, True]]
    for i, frame in enumerate(frames):
        for j, key in enumerate(["a", "b"]):
            if key in frame:
                one, _ = proc.prepare_images([{key: frame[key]}], [key], 16)
                assert torch.equal(images[i, j], one[0, 0])
            else:
                assert (images[i, j] == -1).all()


def test_every_observation_needs_a_camera(tiny_policy):
    obs = tiny_policy.example_observation(seed=1)
    with pytest.raises(ValueError, match="at least one camera image"):
        tiny_policy.preprocess([{**obs, "images": {}}])
    with pytest.raises(ValueError, match="at least one camera image"):  # one of two is empty
        tiny_policy.preprocess([obs, {**obs, "images": {}}])
