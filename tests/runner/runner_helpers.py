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


def run_argv(*overrides, config="serve_demo", conf_dir=CONF_DIR) -> list:
    """``python run.py --config-path <conf_dir> --config-name <config> <overrides>``."""
    return [
        sys.executable,
        "run.py",
        "--config-path",
        conf_dir,
        "--config-name",
        config,
        *overrides,
    ]


def run_cli(*overrides, config="serve_demo", timeout=600, conf_dir=CONF_DIR, env=None):
    """Run `run_argv(...)` from the repo root; its CompletedProcess (text output captured)."""
    return subprocess.run(
        run_argv(*overrides, config=config, conf_dir=conf_dir),
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


def healthy(port: int) -> bool:
    """True if GET /health on 127.0.0.1:port answers HTTP 200."""
    try:
        return get_health(port)[0] == 200
    except OSError:
        return False


def start_foreground(stdout_path: Path, *overrides) -> subprocess.Popen:
    """``run.py ... experiment.runner.foreground=true action=run`` (the server execs in place),
    stdout and stderr to `stdout_path`."""
    argv = run_argv(*overrides, "experiment.runner.foreground=true", "action=run")
    with open(stdout_path, "wb") as out:
        return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
