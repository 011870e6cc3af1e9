"""The full user path with the real server and the tiny random demo policy (CPU, seconds):
run.py action=run → /health → examples/pi0/client_pi0.py → run.py action=stop."""

import signal
import subprocess
import sys

import psutil
import pytest

from runner_helpers import (
    REPO_ROOT,
    SAMPLE_IMAGES,
    free_port,
    get_health,
    gone,
    healthy,
    output,
    run_cli,
    start_foreground,
    wait_until,
)

pytestmark = pytest.mark.slow


def client(port):
    argv = [sys.executable, "examples/pi0/client_pi0.py", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num-steps", "10"]
    for flag, image in zip(("--base-img", "--left-wrist-img", "--right-wrist-img"), SAMPLE_IMAGES):
        argv += [flag, str(image)]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_demo_run_client_stop(exp_dir):
    port = free_port()
    args = [f"experiment.exp_dir={exp_dir}", f"serve.engine.port={port}"]
    result = run_cli(*args, "action=run")
    assert result.returncode == 0, output(result)
    assert get_health(port)[1]["status"] == "healthy"
    assert get_health(port, "/info")[1]["log_dir"] == str(exp_dir / "serve_logs")

    pid = int((exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").read_text())
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]

    answer = client(port)
    assert answer.returncode == 0, output(answer)
    assert "actions shape: [1, 50, 14]" in answer.stdout

    stopped = run_cli(*args, "action=stop")
    assert stopped.returncode == 0, output(stopped)
    assert f"stopped the server for exp_dir {exp_dir}: pid {pid}" in output(stopped)
    assert wait_until(lambda: all(gone(p) for p in tree), 10), [p for p in tree if not gone(p)]
    assert not (exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").exists()
    log = (exp_dir / "serve_logs" / "host_0_localhost.output").read_text()
    assert "RANDOM WEIGHTS" in log  # the server's own output landed in the log file


def test_demo_action_test(exp_dir):
    port = free_port()
    result = run_cli(f"experiment.exp_dir={exp_dir}", f"serve.engine.port={port}", "action=test")
    assert result.returncode == 0, output(result)
    text = output(result)
    assert "test /infer: HTTP 200" in text and "actions shape [1, 50, 14]" in text
    assert f"stopped the server for exp_dir {exp_dir}" in text
    assert not (exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").exists()


def test_demo_foreground_sigterm(exp_dir, tmp_path):
    port, stdout = free_port(), tmp_path / "stdout.txt"
    proc = start_foreground(stdout, f"experiment.exp_dir={exp_dir}", f"serve.engine.port={port}")
    try:
        assert wait_until(lambda: healthy(port) or proc.poll() is not None, 300, 0.5)
        assert proc.poll() is None, stdout.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0  # graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "RANDOM WEIGHTS" in stdout.read_text()  # logs go to stdout in foreground mode
    assert not healthy(port)
