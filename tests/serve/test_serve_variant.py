"""engine.model_variant: parsing, the demo preset it picks, and pre-flight mismatch errors."""

import json

import pytest

from serve_helpers import serve_cfg

from flagscale.serve.config import PRESET_VARIANTS, ConfigError, demo_preset, load_serve_config


def test_preset_variants_match_the_model_presets():
    from flagscale.models.pi0.config import PRESETS, PI0Config

    assert set(PRESET_VARIANTS) == set(PRESETS)
    for name, variant in PRESET_VARIANTS.items():
        assert PI0Config.from_preset(name).variant == variant


def test_variant_values_and_demo_preset():
    assert serve_cfg(model_variant="pi0.5", preset=None).model_variant == "pi0.5"
    assert demo_preset(serve_cfg(model_variant="pi0.5", preset=None)) == "pi05_tiny"
    assert demo_preset(serve_cfg(preset=None)) == "tiny"
    with pytest.raises(ConfigError, match="serve.engine.model_variant: must be one of pi0, pi0.5"):
        serve_cfg(model_variant="pi1")
    with pytest.raises(ConfigError, match="pi0.5 does not match preset 'tiny', a pi0 policy"):
        serve_cfg(model_variant="pi0.5", preset="tiny")


def checkpoint(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    return str(tmp_path)


def test_checkpoint_type_mismatch_is_a_preflight_error(tmp_path):
    engine = {"random_init": False, "model": checkpoint(tmp_path, type="pi05"), "device": "cpu"}
    assert load_serve_config({"engine": dict(engine, model_variant="pi0.5")}, env={})
    with pytest.raises(ConfigError, match=r"pi0 does not match .*config.json \(type: pi05\)"):
        load_serve_config({"engine": dict(engine, model_variant="pi0")}, env={})


def test_checkpoint_without_type_is_checked_at_load(tmp_path):
    engine = {"random_init": False, "model": checkpoint(tmp_path, action_horizon=50)}
    cfg = load_serve_config({"engine": dict(engine, model_variant="pi0", device="cpu")}, env={})
    assert cfg.model_variant == "pi0"  # openpi conversion: the tensors decide when loading
