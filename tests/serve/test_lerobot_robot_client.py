"""lerobot's own RobotClient (lerobot 0.4.x, unchanged) driving two stand-in robots (one process
each) from this server over gRPC. Needs a Python with lerobot and grpcio, given as
LEROBOT_PYTHON, else the parity tests' reference venv (tests/models/lerobot_venv.py: built in
CI, PI0_LEROBOT_PYTHON elsewhere); skipped without either, e.g.

    LEROBOT_PYTHON=/path/to/lerobot-venv/bin/python \\
        python -m pytest -q tests/serve/test_lerobot_robot_client.py

The robots run in that Python (tests/serve/lerobot_robots.py); the server runs here, so its
actions can be compared with policy.infer on each robot's observation."""

import importlib.util
import json
import os
import subprocess

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grpc")
wire = pytest.importorskip("lerobot_wire")
robots = pytest.importorskip("lerobot_robots")


def _lerobot_python():
    """LEROBOT_PYTHON, else the reference venv the lerobot parity tests use (None: neither)."""
    if os.environ.get("LEROBOT_PYTHON"):
        return os.environ["LEROBOT_PYTHON"]
    spec = importlib.util.spec_from_file_location(
        "lerobot_venv", Path(__file__).parents[1] / "models" / "lerobot_venv.py"
    )
    venv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(venv)
    return venv.reference_python()[0]


@pytest.fixture(scope="module")
def lerobot_python():
    python = _lerobot_python()
    if not python:
        pytest.skip("no Python with lerobot 0.4.x and grpcio (LEROBOT_PYTHON / PI0_LEROBOT_PYTHON)")
    return python


SCRIPT = Path(__file__).with_name("lerobot_robots.py")
SLOTS = {"front": "base_0_rgb", "wrist": "left_wrist_0_rgb"}
CHUNK = 10


def reference(policy, index: int, cfg) -> np.ndarray:
    obs = {
        "images": {SLOTS[c]: f for c, f in robots.frames(index).items()},
        "state": np.array(list(robots.joints(index).values()), np.float32),
        "prompt": f"task {index}",
    }
    out = policy.infer(obs, num_steps=cfg.num_steps, seed=cfg.seed)["actions"]
    return np.asarray(out, np.float32)[:CHUNK, : cfg.action_dim]


@pytest.fixture(scope="module")
def pi05():
    from flagscale.models.pi0 import PI0Policy

    return PI0Policy.random(preset="pi05_tiny", device="cpu", dtype="float32", seed=0)


@pytest.mark.parametrize("policy_type", ["pi0", "pi05"])
def test_stock_robot_clients_get_policy_actions(
    lerobot_python, policy, pi05, tmp_path, policy_type
):
    """Two robots, one process each (as deployed): every chunk each receives is the policy's
    actions on that robot's own observation, and the two share model calls."""
    if policy_type == "pi05":
        policy = pi05
        server = wire.start_server(pi05, SLOTS, max_wait_ms=200, preset="pi05_tiny")
    else:
        server = wire.start_server(policy, SLOTS, max_wait_ms=200)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        procs = []
        for index, fps in enumerate((30, 25)):
            argv = [lerobot_python, str(SCRIPT), "--address", server.address, "--index", str(index)]
            argv += ["--fps", str(fps), "--seconds", "8", "--actions-per-chunk", str(CHUNK)]
            argv += ["--policy-type", policy_type]
            argv += ["--out", str(tmp_path / f"robot{index}.json")]
            procs.append(
                subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
            )
        for proc in procs:
            stderr = proc.communicate(timeout=300)[1]
            assert proc.returncode == 0, stderr[-4000:]
        cfg = server.app.state.cfg
        for index in range(2):
            robot = json.loads((tmp_path / f"robot{index}.json").read_text())
            assert len(robot["received"]) >= 2 and robot["executed"] > 0, robot
            want = reference(policy, index, cfg)
            for chunk in robot["received"]:
                steps = [step for step, _ in chunk]
                assert steps == list(range(steps[0], steps[0] + CHUNK))
                # alone or batched with the other robot: equal up to float32 rounding
                np.testing.assert_allclose([a for _, a in chunk], want, atol=1e-5)
        assert 2 in server.recording.batches  # the two robots shared model calls
    finally:
        server.__exit__(None, None, None)
