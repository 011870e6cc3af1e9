"""Fixtures for launcher tests."""

import subprocess
import sys

from pathlib import Path

import psutil
import pytest


@pytest.fixture
def exp_dir(tmp_path) -> Path:
    return tmp_path / "exp"


@pytest.fixture
def spawn():
    """Start helper processes (own session, like the runner does); kill leftovers at the end."""
    started = []

    def _spawn(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        started.append(proc)
        return proc

    yield _spawn
    for proc in started:
        for child in _children(proc.pid):
            child.kill()
        proc.kill()
        proc.wait()


def _children(pid: int):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
