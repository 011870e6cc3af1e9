"""Launcher hardening (issue 19): timeouts, the exp_dir lock, the start token, secrets on disk."""

import pytest

from omegaconf import OmegaConf

from flagscale.runner.runner_base import RunnerError
from flagscale.runner.runner_serve import ServeRunner


def runner(tmp_path, runner_cfg=None, engine=None) -> ServeRunner:
    cfg = OmegaConf.create(
        {
            "experiment": {
                "exp_dir": str(tmp_path / "exp"),
                "task": {"type": "serve"},
                "runner": runner_cfg or {},
            },
            "serve": {"engine": engine or {}},
            "action": "run",
        }
    )
    return ServeRunner(cfg, tmp_path)


@pytest.mark.parametrize(
    "key, value",
    [("stop_timeout", -1), ("ready_timeout", -5), ("ready_timeout", "abc"), ("stop_timeout", True)],
)
def test_bad_timeouts_are_refused_naming_the_key(tmp_path, key, value):
    with pytest.raises(RunnerError, match=f"experiment.runner.{key}: expected a number of seconds"):
        runner(tmp_path, {key: value})


def test_stop_timeout_covers_the_drain_by_default(tmp_path):
    assert runner(tmp_path).stop_timeout == 10 + 10  # drain_timeout_s default + margin
    assert runner(tmp_path, engine={"drain_timeout_s": 45}).stop_timeout == 55
    assert runner(tmp_path, {"stop_timeout": 3, "ready_timeout": "7"}).stop_timeout == 3
    assert runner(tmp_path, {"ready_timeout": "7"}).ready_timeout == 7.0


def test_an_action_in_progress_holds_the_exp_dir_lock(tmp_path, monkeypatch):
    from flagscale.runner import lock

    first = runner(tmp_path)
    monkeypatch.setattr(lock, "LOCK_WAIT_S", 0.3)
    with first._lock():
        with pytest.raises(RunnerError, match="another run.py action for exp_dir"):
            runner(tmp_path).run()
        with pytest.raises(RunnerError, match="another run.py action for exp_dir"):
            runner(tmp_path).stop()


def test_two_concurrent_runs_start_one_server(tmp_path):
    import concurrent.futures

    from runner_helpers import free_port, output, run_cli

    args = [f"experiment.exp_dir={tmp_path / 'exp'}", f"serve.engine.port={free_port()}"]
    args += ["serve.engine.warmup=false"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_cli(*args, "action=run", timeout=300), range(2)))
    stopped = run_cli(*args, "action=stop", timeout=120)
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 1], [output(r)[-1500:] for r in runs]
    loser = output(next(r for r in runs if r.returncode == 1))
    assert "is still running (pid" in loser, loser[-1500:]
    assert stopped.returncode == 0 and "stopped the server" in output(stopped), output(stopped)


def test_a_server_that_is_not_our_child_is_not_reported_ready(tmp_path):
    import http.server
    import json
    import subprocess
    import sys
    import threading

    class Foreign(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "healthy", "start_token": "someone-else"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    foreign = http.server.HTTPServer(("127.0.0.1", 0), Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        url = f"http://127.0.0.1:{foreign.server_address[1]}"
        with pytest.raises(RunnerError, match="is not the one this command started"):
            runner(tmp_path)._wait_ready(child, url)
    finally:
        child.kill()
        child.wait()
        foreign.shutdown()


def test_unwritable_exp_dir_is_one_clear_error(tmp_path):
    from runner_helpers import output, run_cli

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli(f"experiment.exp_dir={blocker / 'exp'}", "action=run", timeout=120)
    text = output(result)
    assert result.returncode == 1
    assert "experiment.exp_dir: cannot create" in text and "Traceback" not in text, text


def test_api_keys_are_never_written_in_clear(tmp_path):
    import stat

    import httpx

    from runner_helpers import free_port, output, run_cli

    exp, port = tmp_path / "exp", free_port()
    args = [f"experiment.exp_dir={exp}", f"serve.engine.port={port}", "serve.engine.warmup=false"]
    args += ["serve.engine.api_keys=[cfg-secret-key-1]", "+experiment.envs.PI0_API_KEYS=env-key-22"]
    started = run_cli(*args, "action=run", timeout=300)
    try:
        assert started.returncode == 0, output(started)[-2000:]
        url = f"http://127.0.0.1:{port}/info"
        assert httpx.get(url, timeout=10).status_code == 401
        for key in ("cfg-secret-key-1", "env-key-22"):  # the server has both keys
            auth = {"Authorization": f"Bearer {key}"}
            assert httpx.get(url, headers=auth, timeout=10).status_code == 200
    finally:
        stopped = run_cli(*args, "action=stop", timeout=120)
    assert stopped.returncode == 0, output(stopped)
    written = [p for p in exp.rglob("*") if p.is_file()]
    assert any(p.match("*/.hydra/overrides.yaml") for p in written), written
    for path in written:
        text = path.read_text(errors="replace")
        assert "cfg-secret-key-1" not in text and "env-key-22" not in text, path
        if path.suffix in (".yaml", ".json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_non_ascii_api_key_is_refused_at_start(tmp_path):
    from runner_helpers import free_port, output, run_cli

    args = [f"experiment.exp_dir={tmp_path / 'exp'}", f"serve.engine.port={free_port()}"]
    result = run_cli(*args, "serve.engine.api_keys=['clé-secrète-1']", "action=run", timeout=120)
    assert result.returncode == 1
    assert "serve.engine.api_keys[0]: an API key needs at least 8 printable ASCII" in output(result)
    assert "server started" not in output(result)


def test_stop_with_flagscales_list_form_and_nothing_running(tmp_path):
    """FlagScale's list-form `serve` (serve[0].engine_args) and no pid file: stop looks for a
    server on engine_args' port, finds none, and exits 0 (it raised AttributeError before)."""
    from runner_helpers import free_port

    cfg = OmegaConf.create(
        {
            "experiment": {"exp_dir": str(tmp_path / "exp"), "task": {"type": "serve"}},
            "serve": [{"serve_id": "vllm_model", "engine_args": {"port": free_port()}}],
            "action": "stop",
        }
    )
    assert ServeRunner(cfg, tmp_path).stop() == 0
