"""Parity against the public reference: LeRobot's PI0 (`lerobot.policies.pi0`, the G2 "openpi port",
PyPI lerobot 0.4.x), same random weights, same inputs, same noise, float32 on CPU.

Runs only where lerobot is importable (a separate venv; see docs/parity.md for the exact set-up,
including the openpi `transformers_replace` patch lerobot's PI0 needs). Skipped otherwise.

Test-harness adaptations: see lerobot_harness.py (dimensions only).
"""

import importlib.metadata
import os

import golden_cases  # tests/models/ (on sys.path under pytest)
import numpy as np
import pytest
import torch

from lerobot_harness import (
    build_models,
    check_key_layout,
    check_sample_actions,
    check_sensitive,
    close,
    inputs,
    load_into,
    ref_images,
    require_lerobot,
    small_lerobot,
    velocities_at_t1,
)

require_lerobot()

_SOURCE = (
    f"lerobot {importlib.metadata.version('lerobot')} PI0Pytorch, float32, CPU, "
    f"torch {torch.__version__}, tests/models/test_lerobot_parity.py::test_golden_actions_are_lerobots"
)


@pytest.fixture(scope="module")
def models():
    return build_models("pi0")


@pytest.fixture(scope="module")
def loaded(models):
    ours, ref = models
    return ours, ref, load_into(ref, ours)


def test_key_layout_matches_lerobot(models):
    ours, ref = models
    check_key_layout(ours, ref)
    pg = ref.paligemma_with_expert.paligemma
    assert pg.model.language_model.embed_tokens.weight is pg.lm_head.weight  # tied in lerobot


def test_strict_load_and_tied_embedding(loaded):
    ours, ref, result = loaded
    assert not result.missing_keys and not result.unexpected_keys
    pg = ref.paligemma_with_expert.paligemma
    # openpi layout stores the token embedding only as paligemma.lm_head.weight (tied)
    torch.testing.assert_close(pg.model.language_model.embed_tokens.weight, ours.llm.embed)


@torch.no_grad()
def test_prefix_embeddings_match(loaded):
    ours, ref, _ = loaded
    x = inputs(ours.config)
    embs, pad = ours.embed_prefix(*x.ours()[:4])
    r_embs, r_pad, r_att = ref.embed_prefix(*x.lerobot()[:4])
    assert torch.equal(pad, r_pad) and not r_att.any()
    close(embs, r_embs, "prefix embeddings")


def test_velocity_at_t1_matches(loaded):
    ours, ref, _ = loaded
    close(*velocities_at_t1(ours, ref, inputs(ours.config, seed=1)), "velocity at t=1")


@pytest.mark.parametrize("num_steps", [1, 10])
def test_sample_actions_match(loaded, num_steps):
    ours, ref, _ = loaded
    check_sample_actions(ours, ref, inputs(ours.config, seed=2), num_steps)


def test_comparison_is_sensitive(loaded):
    """Negative control: a small change to one reference weight must break the comparison."""
    ours, ref, _ = loaded
    norm = ref.paligemma_with_expert.gemma_expert.model.norm.weight
    check_sensitive(ours, ref, inputs(ours.config, seed=2), norm)


@pytest.mark.parametrize("case", sorted(golden_cases.CASES))
@torch.no_grad()
def test_golden_actions_are_lerobots(case):
    """The golden actions CI checks our model against (tests/models/test_pi0_golden.py) are
    LeRobot's: recomputed here from the same portable weights and inputs and compared with the
    committed arrays; `PI0_WRITE_GOLDEN=1` rewrites them from LeRobot's output."""
    ours = golden_cases.model(case)
    torch.manual_seed(0)
    ref = small_lerobot(ours.config)
    result = load_into(ref, ours)
    assert not result.missing_keys and not result.unexpected_keys
    x = golden_cases.inputs(case)
    images, img_masks = ref_images(x["images"], x["img_masks"])
    args = (images, img_masks, x["lang_tokens"], x["lang_masks"], x["state"])
    ref_actions = {
        f"actions_{n}": ref.sample_actions(*args, noise=x["noise"].clone(), num_steps=n).numpy()
        for n in golden_cases.STEPS
    }
    for name, value in ref_actions.items():  # and ours agrees with the reference
        ours_actions = ours.sample_actions(**x, num_steps=int(name.split("_")[1]))
        close(ours_actions, torch.from_numpy(value), f"{case} {name} vs lerobot")
    path = golden_cases.golden_path(case)
    if os.environ.get("PI0_WRITE_GOLDEN") == "1":
        os.makedirs(golden_cases.GOLDEN_DIR, exist_ok=True)
        np.savez_compressed(path, **ref_actions, source=np.array(_SOURCE))
    golden = np.load(path)
    for name, value in ref_actions.items():
        diff = np.abs(value - golden[name]).max()
        print(f"{case} {name}: lerobot now vs committed golden max abs {diff:.3e}")
        assert diff <= golden_cases.tolerance(golden[name]), (case, name, diff)
