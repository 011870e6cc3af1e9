"""Pid-file safety: ``stop`` signals only a live process tree whose create time we recorded."""

import json

import psutil

from runner_helpers import gone, output, run_cli, wait_until

from flagscale.runner.process import meta_path, write_pid_record

SLEEPER = "import time; time.sleep(120)"
TREE = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "time.sleep(120)\n"
)
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)\n"


def pid_file(exp_dir):
    return exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid"


def stop(exp_dir, *extra):
    return run_cli(f"experiment.exp_dir={exp_dir}", "action=stop", *extra)


def test_dead_pid_is_reported_and_cleaned(exp_dir, spawn):
    proc = spawn("pass")
    write_pid_record(pid_file(exp_dir), proc.pid)
    proc.wait()
    result = stop(exp_dir)
    assert result.returncode == 0, output(result)
    assert f"no server running for exp_dir {exp_dir}" in output(result)
    assert "is not running" in output(result)
    assert not pid_file(exp_dir).exists() and not meta_path(pid_file(exp_dir)).exists()


def test_unrelated_process_without_record_is_not_killed(exp_dir, spawn):
    victim = spawn(SLEEPER)
    pid_file(exp_dir).parent.mkdir(parents=True)
    pid_file(exp_dir).write_text(f"{victim.pid}\n")  # e.g. left by another tool
    result = stop(exp_dir)
    assert result.returncode == 0, output(result)
    assert "not known to be ours" in output(result)
    assert victim.poll() is None
    assert not pid_file(exp_dir).exists()


def test_recycled_pid_with_other_create_time_is_not_killed(exp_dir, spawn):
    victim = spawn(SLEEPER)
    write_pid_record(pid_file(exp_dir), victim.pid)
    meta = meta_path(pid_file(exp_dir))
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({"pid": victim.pid, "create_time": record["create_time"] - 3600}))
    result = stop(exp_dir)
    assert result.returncode == 0, output(result)
    assert "no server running" in output(result)
    assert victim.poll() is None


def test_garbage_pid_file(exp_dir):
    pid_file(exp_dir).parent.mkdir(parents=True)
    pid_file(exp_dir).write_text("not a pid\n")
    result = stop(exp_dir)
    assert result.returncode == 0, output(result)
    assert "does not hold a pid" in output(result)


def test_recorded_tree_is_stopped(exp_dir, spawn):
    leader = spawn(TREE)
    assert wait_until(lambda: len(_children(leader.pid)) == 1, 10)
    child = _children(leader.pid)[0]
    write_pid_record(pid_file(exp_dir), leader.pid)
    result = stop(exp_dir)
    assert result.returncode == 0, output(result)
    assert f"pid {leader.pid} and 1 other process(es) [{child.pid}]" in output(result)
    assert wait_until(lambda: gone(leader.pid) and gone(child.pid), 5)
    assert not pid_file(exp_dir).exists()


def test_sigterm_ignored_gets_sigkill(exp_dir, spawn):
    stubborn = spawn(STUBBORN)
    write_pid_record(pid_file(exp_dir), stubborn.pid)
    result = stop(exp_dir, "experiment.runner.stop_timeout=1")
    assert result.returncode == 0, output(result)
    assert "sending SIGKILL" in output(result)
    assert stubborn.wait(5) == -9


def test_run_refuses_while_recorded_process_lives(exp_dir, spawn):
    server = spawn(SLEEPER)
    write_pid_record(pid_file(exp_dir), server.pid)
    result = run_cli(f"experiment.exp_dir={exp_dir}", "action=run")
    assert result.returncode != 0
    assert f"is still running (pid {server.pid})" in output(result)
    assert server.poll() is None
    assert pid_file(exp_dir).exists()


def _children(pid):
    return psutil.Process(pid).children(recursive=True)


ORPHANING = (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
)  # the leader exits at once, its child stays in the leader's session


def test_processes_left_by_a_dead_leader_are_stopped(exp_dir, spawn):
    leader = spawn(ORPHANING)
    write_pid_record(pid_file(exp_dir), leader.pid)
    sid = leader.pid
    assert wait_until(lambda: any(_in_session(p, sid) for p in psutil.process_iter()), 10)
    orphan = next(p for p in psutil.process_iter() if _in_session(p, sid))
    leader.wait()
    result = stop(exp_dir)
    assert result.returncode == 0, output(result)
    assert "left in the server's session" in output(result)
    assert wait_until(lambda: gone(orphan.pid), 10)
    assert not pid_file(exp_dir).exists()


def _in_session(proc, sid):
    import os

    try:
        return proc.pid != sid and os.getsid(proc.pid) == sid
    except OSError:
        return False
