"""run → health → stop through run.py with stand-in server entry points (no model needed).

The stand-ins take the real server's arguments (--config-path <resolved yaml> --log-dir <dir>),
so these tests pin the launcher contract: env export, log file, pid record, readiness wait,
failure reporting, process-tree stop and foreground exec.
"""

import os
import signal
import textwrap

import pytest

from runner_helpers import (
    REPO_ROOT,
    free_port,
    get_health,
    gone,
    healthy,
    output,
    run_cli,
    start_foreground,
    wait_until,
)

FAKE_SERVER = textwrap.dedent("""
    import argparse, http.server, json, os, signal, subprocess, sys, yaml
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-path")
    parser.add_argument("--log-dir")
    args = parser.parse_args()
    engine = yaml.safe_load(open(args.config_path))["serve"]["engine"]
    if os.environ.get("IGNORE_TERM") == "true":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    names = ("USE_FLAGGEMS", "CUDA_VISIBLE_DEVICES", "FOO", "PYTHONPATH")
    info = {"pid": os.getpid(), "child": child.pid, "log_dir": args.log_dir, "cwd": os.getcwd(),
            "env": {n: os.environ.get(n) for n in names}}
    print("fake server up", json.dumps(info), flush=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(dict(info, status="healthy", model_loaded=True)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.HTTPServer((engine["host"], engine["port"]), Handler).serve_forever()
    """)


@pytest.fixture
def fake(tmp_path):
    def _write(source: str):
        path = tmp_path / "fake_server.py"
        path.write_text(source)
        return path

    return _write


def common(exp_dir, entry, port):
    return [
        f"experiment.exp_dir={exp_dir}",
        f"experiment.task.entrypoint={entry}",
        f"serve.engine.port={port}",
    ]


def test_run_then_stop_kills_the_whole_tree(exp_dir, fake):
    port, entry = free_port(), fake(FAKE_SERVER)
    args = common(exp_dir, entry, port) + ["+experiment.envs.FOO=bar"]
    result = run_cli(*args, "action=run", timeout=120)
    assert result.returncode == 0, output(result)
    assert "server ready at http://127.0.0.1:" in output(result)
    info = get_health(port)[1]
    pid_text = (exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").read_text()
    assert int(pid_text) == info["pid"]
    assert info["env"]["USE_FLAGGEMS"] == "false" and info["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert info["env"]["FOO"] == "bar"
    assert info["env"]["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
    assert info["cwd"] == str(REPO_ROOT) and info["log_dir"] == str(exp_dir / "serve_logs")
    log = (exp_dir / "serve_logs" / "host_0_localhost.output").read_text()
    assert "fake server up" in log and "--config-path" in log

    again = run_cli(*args, "action=run", timeout=120)
    assert again.returncode != 0 and "is still running" in output(again)

    stopped = run_cli(*args, "action=stop", timeout=120)
    assert stopped.returncode == 0, output(stopped)
    assert f"pid {info['pid']} and 1 other process(es) [{info['child']}]" in output(stopped)
    assert wait_until(lambda: gone(info["pid"]) and gone(info["child"]), 5)
    assert not (exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").exists()


def test_stubborn_server_is_killed_after_stop_timeout(exp_dir, fake):
    port, entry = free_port(), fake(FAKE_SERVER)
    args = common(exp_dir, entry, port) + ["+experiment.envs.IGNORE_TERM=true"]
    assert run_cli(*args, "action=run", timeout=120).returncode == 0
    info = get_health(port)[1]
    stopped = run_cli(*args, "experiment.runner.stop_timeout=1", "action=stop", timeout=120)
    assert stopped.returncode == 0, output(stopped)
    assert "sending SIGKILL" in output(stopped)
    assert wait_until(lambda: gone(info["pid"]) and gone(info["child"]), 5)


def test_server_that_exits_early_is_reported_with_its_log(exp_dir, fake, tmp_path):
    # It leaves an orphan in its session: the launcher must stop that one too.
    orphan_pid = tmp_path / "orphan.txt"
    entry = fake(
        "import subprocess, sys\n"
        "orphan = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(orphan_pid)!r}, 'w').write(str(orphan.pid))\n"
        "print('boom: weights not found', flush=True)\n"
        "sys.exit(3)\n"
    )
    result = run_cli(*common(exp_dir, entry, free_port()), "action=run", timeout=120)
    assert result.returncode != 0
    text = output(result)
    assert "the server exited with code 3 before it was ready" in text
    assert "boom: weights not found" in text
    assert wait_until(lambda: gone(int(orphan_pid.read_text())), 5)
    assert not (exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").exists()


def test_server_never_ready_times_out_and_is_stopped(exp_dir, fake, tmp_path):
    pid_out = tmp_path / "pid.txt"
    entry = fake(
        "import os, sys, time\n"
        f"open({str(pid_out)!r}, 'w').write(str(os.getpid()))\n"
        "print('still loading...', flush=True)\n"
        "time.sleep(300)\n"
    )
    args = common(exp_dir, entry, free_port()) + ["experiment.runner.ready_timeout=6"]
    result = run_cli(*args, "action=run", timeout=120)
    assert result.returncode != 0
    text = output(result)
    assert "s elapsed; log: still loading..." in text  # progress while waiting
    assert "not ready after 6s (experiment.runner.ready_timeout)" in text
    assert "still loading..." in text
    assert wait_until(lambda: gone(int(pid_out.read_text())), 5)
    assert not (exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").exists()


def test_before_start_runs_first(exp_dir, fake, tmp_path):
    marker = tmp_path / "before"
    entry = fake(f"import os, sys\nsys.exit(0 if os.path.exists({str(marker)!r}) else 7)\n")
    args = common(exp_dir, entry, free_port()) + [
        f"+experiment.cmds.before_start=[[touch,'{marker}']]"
    ]
    result = run_cli(*args, "action=run", timeout=120)
    # the stand-in exits 0 only if the hook ran before it; exiting is still "not ready"
    assert "exited with code 0 before it was ready" in output(result)
    assert marker.is_file()


def test_foreground_execs_in_place(exp_dir, fake, tmp_path):
    port, entry, stdout = free_port(), fake(FAKE_SERVER), tmp_path / "stdout.txt"
    proc = start_foreground(stdout, *common(exp_dir, entry, port))
    try:
        assert wait_until(lambda: healthy(port) or proc.poll() is not None, 60, 0.2)
        info = get_health(port)[1]
        assert info["pid"] == proc.pid  # exec'd in place: same process
        pid_file = exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid"
        assert int(pid_file.read_text()) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    os.kill(info["child"], signal.SIGKILL)  # the stand-in leaves its child behind; we know its pid
    assert "fake server up" in stdout.read_text()  # logs on stdout, not in the log file
    assert not (exp_dir / "serve_logs" / "host_0_localhost.output").exists()
