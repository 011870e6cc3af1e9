"""Our Pi0 against LeRobot's actions, without LeRobot: golden arrays written by the lerobot parity
run (tests/models/golden_cases.py, docs/parity.md). This is what pins the model's conventions in
CI: time embedding, action/time order, embedding scales, masks, positions, the Euler loop."""

import golden_cases
import numpy as np
import pytest
import torch


@pytest.mark.parametrize("case", sorted(golden_cases.CASES))
@torch.no_grad()
def test_actions_match_lerobot_golden(case):
    golden = np.load(golden_cases.golden_path(case))
    assert "lerobot" in str(golden["source"])  # written from the reference, not from us
    model = golden_cases.model(case)
    x = golden_cases.inputs(case)
    for steps in golden_cases.STEPS:
        want = golden[f"actions_{steps}"]
        got = model.sample_actions(**x, num_steps=steps).numpy()
        assert got.shape == want.shape
        diff = np.abs(got - want).max()
        assert diff <= golden_cases.tolerance(want), f"{case}, {steps} steps: max abs {diff:.3e}"


def test_golden_cases_are_sensitive():
    """Negative control: one flipped camera mask (the reference saw it masked) must fail."""
    golden = np.load(golden_cases.golden_path("tiny"))["actions_1"]
    x = golden_cases.inputs("tiny")
    x["img_masks"] = torch.ones_like(x["img_masks"])
    got = golden_cases.model("tiny").sample_actions(**x, num_steps=1).numpy()
    assert np.abs(got - golden).max() > 100 * golden_cases.tolerance(golden)
