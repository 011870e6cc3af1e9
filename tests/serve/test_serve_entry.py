"""flagscale/serve/run_serve_pi0.py as the launcher starts it: a subprocess on a free port."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import yaml

from serve_helpers import CLIENT, REPO, SAMPLE_IMAGES, TEST_ENGINE, free_port

ENTRY = REPO / "flagscale" / "serve" / "run_serve_pi0.py"


def resolved_config(tmp_path, **engine):
    """A config shaped like the launcher's resolved serve.yaml (experiment + serve + action)."""
    port = free_port()
    cfg = {
        "experiment": {"exp_name": "t", "exp_dir": str(tmp_path), "task": {"type": "serve"}},
        "serve": {
            "engine": {**TEST_ENGINE, "port": port, "loader": "pi0", **engine},
            "generate": {"batch_size": 2},
        },
        "action": "run",
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port


def start(cmd, tmp_path, cwd):
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc, port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server not healthy in time")


def stop(proc, sig):
    proc.send_signal(sig)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_script_path_serves_the_client_and_exits_0_on_sigterm(tmp_path):
    cfg, port = resolved_config(tmp_path, warmup=True, max_batch_size=2)
    log_dir = tmp_path / "serve_logs"
    cmd = [sys.executable, str(ENTRY), f"--config-path={cfg}", f"--log-dir={log_dir}"]
    proc = start(cmd, tmp_path, cwd=tmp_path)  # outside the repo, as a script path
    try:
        wait_healthy(proc, port)
        base, left, right = map(str, SAMPLE_IMAGES)
        client = [sys.executable, str(CLIENT), "--host", "127.0.0.1", "--port", str(port)]
        client += ["--base-img", base, "--left-wrist-img", left, "--right-wrist-img", right]
        reply = subprocess.run(
            [*client, "--num-steps", "20"], capture_output=True, text=True, timeout=60
        )
        assert reply.returncode == 0, reply.stderr
        assert "actions shape: [1, 50, 14]" in reply.stdout
    finally:
        code = stop(proc, signal.SIGTERM)
    assert code == 0
    log = (tmp_path / "server.log").read_text()
    assert "RANDOM WEIGHTS" in log
    assert "warm-up done" in log
    assert "ignored: engine.loader, generate.batch_size" in log
    effective = json.loads((log_dir / "serve_pi0_config.json").read_text())
    assert effective["port"] == port and effective["random_init"] is True


def test_module_form_exits_0_on_sigint(tmp_path):
    cfg, port = resolved_config(tmp_path)
    proc = start(
        [sys.executable, "-m", "flagscale.serve.run_serve_pi0", "--config-path", str(cfg)],
        tmp_path,
        cwd=REPO,
    )
    try:
        wait_healthy(proc, port)
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0


def test_invalid_config_exits_2_naming_the_key(tmp_path):
    cfg, _ = resolved_config(tmp_path, num_step=5)
    proc = subprocess.run(
        [sys.executable, str(ENTRY), "--config-path", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "serve.engine.num_step: unknown key; did you mean 'num_steps'?" in proc.stderr


def test_failed_model_load_exits_1(tmp_path):
    model = tmp_path / "model"  # passes the config checks, but the weights file is junk
    model.mkdir()
    (model / "config.json").write_text('{"preset": "tiny"}')
    (model / "model.safetensors").write_bytes(b"not safetensors")
    (model / "tokenizer.json").write_text("{}")
    cfg, port = resolved_config(tmp_path, random_init=False, model=str(model))
    proc = start([sys.executable, str(ENTRY), "--config-path", str(cfg)], tmp_path, cwd=REPO)
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1
    assert "loading the policy failed" in (tmp_path / "server.log").read_text()
