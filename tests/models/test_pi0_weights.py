"""Checkpoint save -> load round trips and strict loading errors."""

import json
import os

import numpy as np
import pytest
import torch

from safetensors.torch import load_file, save_file

from flagscale.models.pi0 import PI0Policy
from flagscale.models.pi0.weights import CheckpointError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from flagscale.models.pi0.tokenizer import build_test_tokenizer

    return build_test_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def source(tokenizer_dir):
    return PI0Policy.random(
        "tiny", device="cpu", dtype="float32", seed=42, tokenizer_path=tokenizer_dir
    )


def actions(policy, seed=0):
    return policy.infer(policy.example_observation(seed=seed), num_steps=3, seed=seed)["actions"]


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
def test_round_trip_gives_identical_actions(tmp_path, source, tokenizer_dir, layout):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path), layout=layout)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    if layout == "lerobot":
        assert (
            "model.paligemma_with_expert.paligemma.language_model.model.embed_tokens.weight" in keys
        )
        assert "model.state_proj.weight" in keys
    else:  # token embedding stored only as lm_head
        assert "paligemma_with_expert.paligemma.lm_head.weight" in keys
        assert not any(k.endswith("embed_tokens.weight") for k in keys)
    loaded = PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)
    assert np.array_equal(actions(source), actions(loaded))


def test_loaded_weights_own_aligned_storage(tmp_path, source, tokenizer_dir):
    """Weights are copied out of the memory-mapped file into allocator-aligned storage: CPU
    matmul kernels pick their code path by operand alignment, so weights left at their
    (unaligned) file offsets gave actions differing in the last bits on some CPUs (AMD EPYC)."""
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))
    loaded = PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)
    want = dict(source.model.named_parameters())
    for name, param in loaded.model.named_parameters():
        assert torch.equal(param, want[name]), name
        assert param.data_ptr() % 64 == 0, name
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), name


def test_sharded_checkpoint_loads(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path), max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    loaded = PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)
    assert np.array_equal(actions(source, 1), actions(loaded, 1))


def test_bf16_load_keeps_norms_fp32(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))
    loaded = PI0Policy.from_pretrained(
        str(tmp_path), tokenizer_dir, device="cpu", dtype="bfloat16", progress=False
    )
    params = dict(loaded.model.named_parameters())
    assert params["llm.layers.0.qkv_proj.weight"].dtype == torch.bfloat16
    assert params["llm.layers.0.input_norm.weight"].dtype == torch.float32
    assert params["vision.patch_embed"].dtype == torch.float32
    out = actions(loaded)
    assert np.isfinite(out).all()
    ref = actions(source)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()  # bf16 noise, not garbage


def _rewrite(tmp_path, edit):
    path = str(tmp_path / "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_tensor_is_named(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))
    key = "model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.k_proj.weight"
    _rewrite(tmp_path, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing.*layers.1.self_attn.k_proj"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)


def test_misshaped_tensor_is_named(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))
    key = "model.action_out_proj.weight"
    _rewrite(tmp_path, lambda s: s.__setitem__(key, torch.zeros(31, 32)))
    with pytest.raises(CheckpointError, match=r"action_out_proj.weight.*\[31, 32\].*\[32, 32\]"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)


def test_unexpected_tensor_is_an_error_but_expert_lm_head_is_skipped(
    tmp_path, source, tokenizer_dir
):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))  # includes the unused expert lm_head
    assert "model.paligemma_with_expert.gemma_expert.lm_head.weight" in load_file(
        str(tmp_path / "model.safetensors")
    )
    _rewrite(tmp_path, lambda s: s.__setitem__("model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected.*extra_head"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)


def test_config_json_both_spellings(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.config import PI0Config
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["num_steps"] == 10 and raw["pi0_dims"]["preset"] == "tiny"
    raw.pop("num_steps")
    raw["num_inference_steps"] = 7
    cfg = PI0Config.from_json_dict(raw)
    assert cfg.num_steps == 7 and cfg.llm.width == 64
    g3 = PI0Config.from_json_dict(
        {
            "paligemma_variant": "dummy",
            "action_expert_variant": "dummy",
            "chunk_size": 10,
            "n_action_steps": 10,
        }
    )
    assert g3.expert.width == 64 and g3.llm.depth == 4 and g3.chunk_size == 10
    with pytest.raises(ValueError, match="share depth"):
        PI0Config.from_json_dict(
            {"paligemma_variant": "gemma_2b", "action_expert_variant": "dummy"}
        )
    with pytest.raises(ValueError, match="preset"):
        PI0Config.from_preset("tinny")


def test_missing_directory_errors_are_clear(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu")


def test_lerobot_g1_stats_buffers_are_used(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))
    mean, std = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 2.0])

    def add(state):
        state["model.normalize_inputs.buffer_observation_state.mean"] = mean
        state["model.normalize_inputs.buffer_observation_state.std"] = std
        state["model.unnormalize_outputs.buffer_action.mean"] = torch.tensor([10.0, 20.0])
        state["model.unnormalize_outputs.buffer_action.std"] = torch.tensor([1.0, 0.5])
        state["model.normalize_targets.buffer_action.mean"] = torch.tensor([10.0, 20.0])
        state["model.normalize_targets.buffer_action.std"] = torch.tensor([1.0, 0.5])

    _rewrite(tmp_path, add)
    policy = PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)
    assert policy.metadata["has_stats"] and policy.action_dim == 2
    np.testing.assert_allclose(policy.normalizer.normalize_state(np.array([3.0, 4.0, 5.0])), 1.0)
    obs = dict(source.example_observation(), state=np.zeros(3, np.float32))
    assert policy.infer(obs, seed=0)["actions"].shape == (50, 2)


def test_lerobot_g3_processor_stats_files(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path), layout="openpi")
    save_file(
        {"observation.state.mean": torch.zeros(4), "observation.state.std": torch.ones(4)},
        str(tmp_path / "policy_preprocessor_step_5_normalizer_processor.safetensors"),
    )
    save_file(
        {"action.mean": torch.full((6,), 5.0), "action.std": torch.full((6,), 2.0)},
        str(tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"),
    )
    policy = PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)
    assert policy.normalizer.state_dim == 4 and policy.action_dim == 6
    raw = policy.model.sample_actions(
        **policy.preprocess([dict(source.example_observation(), state=np.zeros(4))]),
        noise=torch.zeros(1, 50, 32),
        num_steps=2,
    )
    out = policy.infer(
        dict(source.example_observation(), state=np.zeros(4)), noise=np.zeros((50, 32)), num_steps=2
    )["actions"]
    np.testing.assert_allclose(out, raw[0, :, :6].numpy() * 2.0 + 5.0, rtol=1e-5, atol=1e-5)


def test_tokenizer_json_only_directory(tmp_path, tokenizer_dir):
    import shutil

    from flagscale.models.pi0.processing import load_tokenizer, tokenize_prompts

    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    bare = load_tokenizer(str(tmp_path))
    full = load_tokenizer(tokenizer_dir)
    a, _ = tokenize_prompts(bare, ["pick up the cube"], 48)
    b, _ = tokenize_prompts(full, ["pick up the cube"], 48)
    assert torch.equal(a, b) and a[0, 0] == 2


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    else:  # a header length far beyond the file
        path.write_bytes((10**12).to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize("how", ["truncated", "header"])
def test_damaged_file_is_named(tmp_path, source, tokenizer_dir, how):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path))
    _damage(tmp_path / "model.safetensors", how)
    with pytest.raises(CheckpointError) as err:
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)
    text = str(err.value)
    assert str(tmp_path / "model.safetensors") in text and "damaged or truncated" in text
    assert "shard" not in text


def test_damaged_shard_is_named(tmp_path, source, tokenizer_dir):
    from flagscale.models.pi0.weights import save_pretrained

    save_pretrained(source.model, str(tmp_path), max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    _damage(shards[1], "truncated")
    with pytest.raises(CheckpointError) as err:
        PI0Policy.from_pretrained(str(tmp_path), tokenizer_dir, device="cpu", progress=False)
    assert f"{shards[1]} (shard 2 of {len(shards)}) is damaged or truncated" in str(err.value)


def test_saved_files_follow_the_umask(tmp_path, source):
    """Not safetensors' private 0600: a server running as another user must read them."""
    from flagscale.models.pi0.weights import save_pretrained

    old = os.umask(0o022)
    try:
        save_pretrained(source.model, str(tmp_path / "one"))
        save_pretrained(source.model, str(tmp_path / "shards"), max_shard_bytes=200_000)
    finally:
        os.umask(old)
    files = list(tmp_path.glob("*/*.safetensors")) + list(tmp_path.glob("*/*.json"))
    assert len(files) > 4
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o644, path
