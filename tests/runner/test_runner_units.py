"""Pure helpers of the launcher: env export, hook parsing, probes, pid records, smoke request."""

import base64
import os
import socket
import subprocess
import sys

import numpy as np
import psutil
import pytest

from runner_helpers import wait_until

from flagscale.runner.launch import build_env, parse_cmds
from flagscale.runner.probe import base_url, check_port_free, is_ready
from flagscale.runner.process import (
    PidRecord,
    exit_status,
    live_process,
    read_pid_record,
    remove_pid_record,
    tail,
    write_pid_record,
)
from flagscale.runner.runner_base import RunnerError
from flagscale.runner.smoke import check_infer_response, sample_request


def test_build_env_stringifies_like_flagscale(tmp_path):
    base = {"KEEP": "1", "DROP": "x", "PYTHONPATH": "/old"}
    envs = {"B": True, "F": False, "N": 0, "X": 1.5, "E": "", "DROP": None, "S": "a b"}
    env = build_env(envs, base, tmp_path)
    assert (env["B"], env["F"], env["N"], env["X"], env["E"], env["S"]) == (
        "true",
        "false",
        "0",
        "1.5",
        "",
        "a b",
    )
    assert "DROP" not in env and env["KEEP"] == "1"
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path), "/old"])


def test_build_env_refuses_structures(tmp_path):
    with pytest.raises(RunnerError, match="experiment.envs.L: expected a string"):
        build_env({"L": [1, 2]}, {}, tmp_path)


def test_parse_cmds_forms():
    assert parse_cmds(None, "x") == []
    assert parse_cmds("echo 'a b'", "x") == [["echo", "a b"]]
    assert parse_cmds(["echo hi", ["touch", "/tmp/a b", 3]], "x") == [
        ["echo", "hi"],
        ["touch", "/tmp/a b", "3"],
    ]
    # an explicit argv list is taken literally: no shell will interpret "$" there
    assert parse_cmds([["echo", "$HOME"]], "x") == [["echo", "$HOME"]]


@pytest.mark.parametrize(
    "value, message",
    [
        ("a | b", "shell syntax"),
        ("a; b", "shell syntax"),
        ("a > out", "shell syntax"),
        ("echo `id`", "shell syntax"),
        ("export A=1", "shell builtin"),
        ([["cd", "/"]], "shell builtin"),
        ([""], "empty command"),
        ([{"a": 1}], "expected a string or a list of strings"),
        (5, "expected a list of commands"),
    ],
)
def test_parse_cmds_refusals(value, message):
    with pytest.raises(RunnerError, match=message):
        parse_cmds(value, "before_start")


def test_port_in_use_detected():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(RunnerError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(RunnerError, match="already in use"):
            check_port_free("0.0.0.0", port)
    check_port_free("127.0.0.1", port)  # closed again: free


def test_port_check_bad_host():
    with pytest.raises(RunnerError, match="cannot"):
        check_port_free("203.0.113.7", 9010)  # TEST-NET address: not on this machine


def test_base_url_maps_wildcards_to_loopback():
    assert base_url("0.0.0.0", 9010) == "http://127.0.0.1:9010"
    assert base_url("::", 1) == "http://[::1]:1"
    assert base_url("localhost", 2) == "http://localhost:2"


def test_is_ready():
    assert is_ready(200, {"status": "healthy", "model_loaded": True})
    assert is_ready(200, "ok")
    assert not is_ready(200, {"model_loaded": False})
    assert not is_ready(503, {"status": "loading"})
    assert not is_ready(None, "connection refused")


def test_pid_record_round_trip(tmp_path):
    pid_file = tmp_path / "pids" / "p.pid"
    assert read_pid_record(pid_file) is None
    record = write_pid_record(pid_file, os.getpid())
    assert pid_file.read_text() == f"{os.getpid()}\n"  # FlagScale layout: the pid alone
    assert read_pid_record(pid_file) == record
    assert live_process(record).pid == os.getpid()
    assert live_process(PidRecord(record.pid, record.create_time - 10)) is None
    assert live_process(PidRecord(record.pid, -1.0)) is None
    remove_pid_record(pid_file)
    assert list(pid_file.parent.iterdir()) == []


def test_tail(tmp_path):
    log = tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "\n\n")
    assert tail(log, 2) == ["line 98", "line 99"]
    assert tail(tmp_path / "missing") == []


def test_sample_request_is_v1_shaped(tmp_path):
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.jpg")
        images[-1].write_bytes(bytes([i]) * 4)
    cams = ["cam_high", "cam_left_wrist", "cam_right_wrist"]
    body = sample_request(images, cams, 14, "pick")
    assert body["instruction"] == "pick"
    assert np.asarray(body["eef_pose"]).shape == (1, 14) and body["qpos"] == body["eef_pose"]
    assert list(body["images"][0]) == cams
    assert base64.b64decode(body["images"][0]["cam_left_wrist"]) == b"\x01" * 4


def test_check_infer_response():
    assert check_infer_response(200, {"success": True, "qpos": [[[1.0, 2.0]]]}).shape == (1, 1, 2)
    assert check_infer_response(200, {"actions": [[0.5]], "qpos": [[9.0]]})[0, 0] == 0.5
    for status, body in [
        (400, {"success": False, "error": "x"}),
        (200, {"success": False}),
        (200, {"success": True, "qpos": []}),
        (200, {"success": True, "qpos": [[float("nan")]]}),
        (200, {"success": True, "qpos": "abc"}),
    ]:
        with pytest.raises(RunnerError):
            check_infer_response(status, body)


def test_exit_status_does_not_reap():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(4)"])
    assert wait_until(lambda: exit_status(proc) is not None, 10)
    assert exit_status(proc) == 4
    assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE  # pid still reserved
    assert proc.wait() == 4 and exit_status(proc) == 4
