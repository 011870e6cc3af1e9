"""The real examples/pi0/client_pi0.py, run as a subprocess against the shared live server."""

import json
import socket
import subprocess
import sys

import numpy as np

from serve_helpers import CLIENT, SAMPLE_IMAGES


def run_client(*args, timeout=60):
    cmd = [sys.executable, str(CLIENT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def port_of(live) -> int:
    return int(live.url.rsplit(":", 1)[1])


def image_args():
    base, left, right = SAMPLE_IMAGES
    return ["--base-img", base, "--left-wrist-img", left, "--right-wrist-img", right]


def test_readme_command_works_and_saves_actions(live, tmp_path):
    out = tmp_path / "actions.npy"
    args = ["--host", "127.0.0.1", "--port", port_of(live), *image_args(), "--num-steps", 20]
    proc = run_client(*args, "--seed", 3, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "actions shape: [1, 50, 14]" in proc.stdout
    assert "server timing (ms): queue_ms=" in proc.stdout
    assert "round trip:" in proc.stdout
    assert "num_steps: 20  seed: 3" in proc.stdout
    actions = np.load(out)
    assert actions.shape == (1, 50, 14) and actions.dtype == np.float32

    # same seed, v1 leftover flags, JSON output: same actions
    reply_path = tmp_path / "reply.json"
    leftovers = ["--temperature", 0.5, "--top-p", 0.9, "--max-new-tokens", 8, "--do-sample"]
    leftovers += ["--high-level-instruction", "x", "--fine-grained-instruction", "y"]
    proc = run_client(
        "--port",
        port_of(live),
        *image_args(),
        "--num-steps",
        20,
        "--seed",
        3,
        *leftovers,
        "--output",
        reply_path,
    )
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(reply_path.read_text())
    np.testing.assert_allclose(np.asarray(reply["qpos"], np.float32), actions, atol=1e-6)


def test_missing_image_file_is_an_error_unless_masked_explicitly(live):
    args = ["--port", port_of(live), "--left-wrist-img", SAMPLE_IMAGES[1], "--num-steps", 1]
    proc = run_client(*args, "--base-img", "nope.jpg")
    assert proc.returncode == 2
    assert "--base-img: file not found: nope.jpg (to send cam_high masked: --mask cam_high)" in (
        proc.stderr
    )
    proc = run_client(*args, "--mask", "cam_high", "--mask", "cam_right_wrist")
    assert proc.returncode == 0, proc.stderr
    assert "actions shape: [1, 50, 14]" in proc.stdout


def test_v1_leftover_options_have_help():
    text = run_client("--help").stdout
    for option in ("--temperature", "--top-p", "--max-new-tokens", "--do-sample", "--mask"):
        assert option in text
    assert text.count("ignores it") >= 6  # FlagScale v1 field, ... the Pi0 server ignores it


def test_server_error_is_reported_with_exit_1(live):
    proc = run_client("--port", port_of(live), *image_args(), "--state", "1,2,3")
    assert proc.returncode == 1
    assert "server answered 400" in proc.stderr
    assert "expected 14 values per observation" in proc.stderr


def test_no_image_at_all_is_a_usage_error(live):
    proc = run_client("--port", port_of(live))
    assert proc.returncode == 2
    assert "--base-img" in proc.stderr


def test_server_down_exits_3():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        proc = run_client("--port", port, *image_args())
    assert proc.returncode == 3
    assert "cannot reach the server" in proc.stderr


def test_timeout_exits_4():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # accepts the connection, never answers
        proc = run_client("--port", sock.getsockname()[1], *image_args(), "--timeout", 0.5)
    assert proc.returncode == 4
    assert "within 0.5 s" in proc.stderr


def test_client_needs_neither_torch_nor_pil(live):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['client', '--port', '{port_of(live)}', '--health']\n"
        "try:\n"
        f"    runpy.run_path({str(CLIENT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'PIL', 'flagscale', 'requests') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"status": "healthy"' in proc.stdout
