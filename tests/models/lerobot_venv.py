"""The reference venv (lerobot 0.4.4 + openpi-patched transformers 4.53.2) for parity tests.

LeRobot's PI0 cannot live in the project venv (docs/parity.md: transformers<5, torch<2.11 declared,
a patched transformers). `reference_python()` returns an interpreter that has it:
- the one in `PI0_LEROBOT_PYTHON`, when set;
- else, under CI (`CI=true`) or with `PI0_LEROBOT_VENV=build`, a venv built once at
  `PI0_LEROBOT_VENV_DIR` (default `~/.cache/flagscale-pi0/<VENV_NAME>`) with the commands of
  docs/parity.md (about 1.5 minutes; reused while its stamp file is there);
- else None. Build failures (no network, a PyPI hiccup) give None and a reason: the tests that
  need it skip with that reason, they never fail for it.

Test files that need lerobot (they call lerobot_harness.require_lerobot() at module level, or
import it behind `importlib.util.find_spec("lerobot")` / `pytest.importorskip("lerobot")`) are found by `reference_test_files()` and run in it by
tests/models/test_reference_venv.py.
"""

import os
import re
import subprocess
import sys

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==" + torch.__version__.split("+")[0]  # the project's torch, likely in pip's cache
REQUIREMENTS = [
    TORCH,
    "transformers==4.53.2",
    "huggingface-hub>=0.34.2,<0.36",
    "draccus==0.10.0",
    "datasets>=4,<5",
    "pillow",
    "accelerate",
    "imageio",
    "diffusers",
    "pyserial",
    "deepdiff",
    "av",
    "einops",
    "grpcio",  # lerobot's async inference (RobotClient test)
    "protobuf",
    "pytest",
]
LEROBOT = "lerobot==0.4.4"
VENV_NAME = f"lerobot-0.4.4-py{sys.version_info[0]}{sys.version_info[1]}-{TORCH.replace('==', '')}"
BUILD_TIMEOUT_S = 1200
RUNNER = "test_reference_venv.py"
_NEEDS_LEROBOT = re.compile(
    r"""find_spec\(["']lerobot["']\)|importorskip\(["']lerobot["']\)|^require_lerobot\(\)""", re.M
)


def reference_test_files() -> list:
    """Test files (relative to the repo) that need lerobot, but not the runner itself."""
    return sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("test_*.py")
        if path.name != RUNNER and _NEEDS_LEROBOT.search(path.read_text(encoding="utf-8"))
    )


def reference_python() -> tuple:
    """(path of a python with lerobot, None) or (None, why not)."""
    given = os.environ.get("PI0_LEROBOT_PYTHON")
    if given:
        return (given, None) if os.access(given, os.X_OK) else (None, f"{given} not executable")
    if os.environ.get("PI0_LEROBOT_VENV") != "build" and os.environ.get("CI", "") != "true":
        return None, "no reference venv: set PI0_LEROBOT_PYTHON, or PI0_LEROBOT_VENV=build"
    default = Path.home() / ".cache" / "flagscale-pi0" / VENV_NAME
    venv = Path(os.environ.get("PI0_LEROBOT_VENV_DIR", default))
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists() and marker.read_text() == _marker_text():  # else: rebuilt (new requirements)
        return str(python), None
    error = _build(venv, python)
    return (None, error) if error else (str(python), None)


def _marker_text() -> str:
    return " ".join(REQUIREMENTS + [LEROBOT]) + "\n"


def _build(venv: Path, python: Path):
    """Build the venv as docs/parity.md does; returns None or a short reason."""
    pip = [str(python), "-m", "pip", "install", "-q", "--timeout", "60", "--retries", "2"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        pip + REQUIREMENTS,  # torch pinned in the same call: pip never swaps in another build
        pip + ["--no-deps", LEROBOT],
        [str(python), str(REPO / "tests/models/lerobot_ref/patch_transformers_openpi.py")],
    ]
    for argv in steps:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=REPO
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"building the lerobot venv failed: {' '.join(argv[:4])}: {e}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return f"building the lerobot venv failed: {' '.join(argv[:4])}: {' | '.join(tail)}"
    (venv / ".complete").write_text(_marker_text())
    return None
