"""The lerobot parity tests, run in the reference venv when this interpreter has no lerobot.

In CI (`CI=true`) the venv is built on first use (tests/models/lerobot_venv.py, ~1.5 minutes);
elsewhere it runs when PI0_LEROBOT_PYTHON names one (e.g. /work/lrvenv/bin/python) or with
PI0_LEROBOT_VENV=build. Skipped, never failed, when the venv cannot be had."""

import importlib.util
import os
import subprocess

import pytest

from lerobot_venv import REPO, reference_python, reference_test_files


def test_lerobot_parity_in_reference_venv():
    if importlib.util.find_spec("lerobot") is not None:
        pytest.skip("lerobot is importable here: its parity tests run directly")
    files = reference_test_files()
    assert "tests/models/test_lerobot_parity.py" in files, files
    python, why_not = reference_python()
    if python is None:
        pytest.skip(why_not)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    argv = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1:] or [""]
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in summary[0] and "skipped" not in summary[0], done.stdout[-3000:]
