"""The one real request ``action=test`` sends: FlagScale v1 body built from sample JPEGs."""

import base64

from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from flagscale.runner.runner_base import RunnerError


def sample_request(
    images: Sequence[Path], cameras: Sequence[str], state_dim: int, instruction: str
) -> Dict[str, Any]:
    """v1 body (as ``client_pi0.py`` sends it): one image per camera, a fixed state ramp."""
    encoded = {
        name: base64.b64encode(Path(path).read_bytes()).decode()
        for name, path in zip(cameras, images)
    }
    state = np.linspace(-0.5, 0.5, state_dim).round(4).tolist()
    return {"instruction": instruction, "qpos": [state], "eef_pose": [state], "images": [encoded]}


def check_infer_response(status: int, body: Any) -> np.ndarray:
    """The actions array from a successful /infer answer (v1 ``qpos`` or v2 ``actions``)."""
    if status != 200 or not isinstance(body, dict) or body.get("success") is False:
        raise RunnerError(f"/infer answered HTTP {status}: {str(body)[:500]}")
    actions = body.get("actions", body.get("qpos"))
    try:
        array = np.asarray(actions, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RunnerError(f"/infer returned actions that are not a numeric array: {err}") from err
    if array.size == 0 or not np.isfinite(array).all():
        raise RunnerError(f"/infer returned empty or non-finite actions, shape {array.shape}")
    return array
