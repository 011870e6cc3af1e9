"""Normalization modes against hand-computed values (lerobot's and openpi's epsilon), the stats
sources, and the start-up errors."""

import json

import numpy as np
import pytest
import torch

from safetensors.torch import save_file
from stats_helpers import load_stats

from flagscale.models.pi0 import normalize as norm

STATE = {
    "mean": [1.0, -2.0],
    "std": [2.0, 0.5],
    "min": [0.0, -4.0],
    "max": [4.0, -4.0],  # zero range in the second value
    "q01": [-1.0, 0.0],
    "q99": [3.0, 0.0],
    "q10": [0.0, 1.0],
    "q90": [2.0, 5.0],
    "count": [100],
}
X = np.array([2.0, -3.0], np.float32)
# hand-computed, lerobot eps: MEAN_STD (x - mean) / (std + 1e-8); others 2 (x - lo) / range - 1
# with range 1e-8 where it is 0
LEROBOT = {
    "MEAN_STD": [0.5, -2.0],
    "MIN_MAX": [0.0, 2.0 * 1.0 / 1e-8 - 1.0],
    "QUANTILES": [0.5, 2.0 * -3.0 / 1e-8 - 1.0],
    "QUANTILE10": [1.0, 2.0 * -4.0 / 4.0 - 1.0],
    "IDENTITY": [2.0, -3.0],
}
# openpi: (x - lo) / (range + 1e-6) * 2 - 1; MEAN_STD (x - mean) / (std + 1e-6)
OPENPI = {
    "MEAN_STD": [1.0 / (2 + 1e-6), -1.0 / (0.5 + 1e-6)],
    "QUANTILES": [3.0 / (4 + 1e-6) * 2 - 1, -3.0 / 1e-6 * 2 - 1],
}


def raw_stats():
    return norm.RawStats(dict(norm._arrays(STATE)), dict(norm._arrays(STATE)), "stats.json")


@pytest.mark.parametrize("mode", list(LEROBOT))
def test_modes_lerobot_eps(mode):
    n = raw_stats().normalizer(mode, mode, "lerobot")
    np.testing.assert_allclose(n.normalize_state(X), LEROBOT[mode], rtol=1e-6)
    if mode != "IDENTITY":  # unnormalize inverts normalize (finite ranges exactly)
        a = np.array([[0.5, 0.25]], np.float32)
        back = n.action.normalize(n.unnormalize_actions(a))
        np.testing.assert_allclose(back[:, 0], a[:, 0], rtol=1e-6)
    else:
        assert n.state is None and n.action is None


def test_unnormalize_hand_computed():
    a = np.array([[0.5, -1.0]], np.float32)
    n = raw_stats().normalizer("QUANTILES", "QUANTILES", "lerobot")
    # (a + 1) * (q99 - q01) / 2 + q01; zero range -> 1e-8
    np.testing.assert_allclose(n.unnormalize_actions(a), [[1.5 * 4 / 2 - 1, 0.0]], atol=1e-7)
    n = raw_stats().normalizer("MEAN_STD", "MEAN_STD", "lerobot")  # a * std + mean, no eps
    np.testing.assert_allclose(n.unnormalize_actions(a), [[2.0, -2.5]])
    n = raw_stats().normalizer("MIN_MAX", "MIN_MAX", "lerobot")  # (a + 1) / 2 * range + min
    np.testing.assert_allclose(n.unnormalize_actions(a), [[3.0, -4.0]])
    n = raw_stats().normalizer("QUANTILES", "QUANTILES", "openpi")  # range + 1e-6
    np.testing.assert_allclose(
        n.unnormalize_actions(a), [[1.5 / 2 * (4 + 1e-6) - 1, 0.0]], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("mode", list(OPENPI))
def test_modes_openpi_eps(mode):
    n = raw_stats().normalizer(mode, mode, "openpi")
    np.testing.assert_allclose(n.normalize_state(X), OPENPI[mode], rtol=1e-5)


def test_actions_wider_than_stats_are_cut():
    n = raw_stats().normalizer("QUANTILES", "QUANTILES")
    assert n.unnormalize_actions(np.zeros((50, 32), np.float32)).shape == (50, 2)


def test_missing_stats_error_names_source_and_keys(tmp_path):
    path = tmp_path / "stats.json"
    entry = {"mean": [0.0], "std": [1.0]}
    path.write_text(json.dumps({"observation.state": entry, "action": entry}))
    with pytest.raises(ValueError, match=r"stats.json: QUANTILES normalization of the state .*"):
        load_stats(str(path), state_mode="QUANTILES")
    with pytest.raises(ValueError, match=r"QUANTILE10 .* action .* missing \['q10', 'q90'\]"):
        load_stats(str(path), action_mode="QUANTILE10")
    with pytest.raises(ValueError, match="unknown normalization mode 'BOGUS'"):
        load_stats(str(path), state_mode="bogus")


def test_openpi_norm_stats_quantiles_default_to_openpi_eps(tmp_path):
    path = tmp_path / "norm_stats.json"
    q = {"mean": [0.0], "std": [1.0], "q01": [-2.0], "q99": [2.0]}
    path.write_text(json.dumps({"norm_stats": {"state": q, "actions": q}}))
    n = load_stats(str(path), state_mode="QUANTILES", action_mode="QUANTILES")
    assert n.state.eps == "openpi"
    np.testing.assert_allclose(n.normalize_state(np.array([1.0])), [3.0 / (4 + 1e-6) * 2 - 1])


def test_g3_processor_files_carry_quantiles(tmp_path):
    save_file(
        {"observation.state.q01": torch.zeros(2), "observation.state.q99": torch.ones(2)},
        str(tmp_path / "policy_preprocessor_step_2_normalizer_processor.safetensors"),
    )
    save_file(
        {"action.q01": torch.zeros(3), "action.q99": torch.full((3,), 4.0)},
        str(tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"),
    )
    raw = norm.stats_from_processor_files(str(tmp_path))
    n = raw.normalizer("QUANTILES", "QUANTILES")
    np.testing.assert_allclose(n.normalize_state(np.array([0.25, 1.0])), [-0.5, 1.0])
    assert n.action_dim == 3
    with pytest.raises(ValueError, match=r"normalizer_processor.safetensors: MEAN_STD .*"):
        raw.normalizer("MEAN_STD", "QUANTILES")


def test_pi0_honours_normalization_mapping(tmp_path, tiny_policy):
    """A Pi0 checkpoint whose config.json asks for MIN_MAX gets MIN_MAX (not MEAN_STD)."""
    from flagscale.models.pi0 import PI0Policy
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(tiny_policy.model, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["normalization_mapping"] = {"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"observation.state": STATE, "action": STATE}))
    tok = tiny_policy.tokenizer.name_or_path
    policy = PI0Policy.from_pretrained(str(tmp_path), tok, str(stats), progress=False)
    assert policy.metadata["normalization"]["state"]["mode"] == "MIN_MAX"
    np.testing.assert_allclose(policy.normalizer.normalize_state(X), LEROBOT["MIN_MAX"], rtol=1e-6)
