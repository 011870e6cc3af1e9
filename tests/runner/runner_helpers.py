"""Helpers for launcher tests: run ``run.py`` as users do, free ports, process checks."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = "./examples/pi0/conf"
SAMPLE_IMAGES = [REPO_ROOT / "examples" / "pi0" / f"orbbec_{i}_latest.jpg" for i in range(3)]


def run_cli(*overrides, config="serve_demo", timeout=600, conf_dir=CONF_DIR, env=None):
    """``python run.py --config-path <conf_dir> --config-name <config> <overrides>``."""
    argv = [sys.executable, "run.py", "--config-path", conf_dir, "--config-name", config]
    return subprocess.run(
        argv + list(overrides),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def output(result) -> str:
    return result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie waiting for its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local server: no proxy


def get_health(port: int, path: str = "/health"):
    """(status, parsed JSON) of GET /health on 127.0.0.1:port; raises OSError if nothing answers."""
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, json.loads(response.read())
