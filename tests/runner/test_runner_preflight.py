"""What a new user trips over first: pre-flight errors that name the cause and the override."""

import os
import subprocess
import sys

import pytest
import torch

from runner_helpers import REPO_ROOT, free_port, output, run_cli

needs_cpu_torch = pytest.mark.skipif(
    torch.version.cuda is not None, reason="checks the message of a CPU-only torch build"
)


@needs_cpu_torch
def test_cuda_device_with_cpu_only_torch_is_refused_before_start(exp_dir):
    result = run_cli(
        f"experiment.exp_dir={exp_dir}",
        "serve.engine.device=cuda",
        f"serve.engine.port={free_port()}",
        "action=run",
    )
    text = output(result)
    assert result.returncode != 0
    assert f"serve.engine.device=cuda: this torch ({torch.__version__}) is a CPU-only build" in text
    assert "install a CUDA build of torch (README.md" in text
    assert "serve.engine.device=cpu" in text and "Traceback" not in text
    assert not (exp_dir / "serve_logs" / "host_0_localhost.output").exists()  # nothing started


def test_flaggems_on_cpu_is_refused_before_start(exp_dir):
    result = run_cli(
        f"experiment.exp_dir={exp_dir}", "experiment.envs.USE_FLAGGEMS=true", "action=run"
    )
    assert result.returncode != 0
    text = output(result)
    assert "FlagGems ops (serve.engine.ops=flaggems or USE_FLAGGEMS=1) need a CUDA GPU" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("shell", ["1", "true"])
def test_use_flaggems_from_the_shell_conflicting_with_the_config_stops(exp_dir, shell):
    env = dict(os.environ, USE_FLAGGEMS=shell)
    result = run_cli(f"experiment.exp_dir={exp_dir}", "action=run", env=env)
    assert result.returncode != 0
    text = output(result)
    assert f"USE_FLAGGEMS={shell} in the environment" in text
    assert "experiment.envs.USE_FLAGGEMS=false" in text
    assert f"pass experiment.envs.USE_FLAGGEMS={shell} on the command line" in text


def test_cuda_visible_devices_hiding_every_gpu_is_named(exp_dir):
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch is refused before CUDA_VISIBLE_DEVICES matters")
    result = run_cli(f"experiment.exp_dir={exp_dir}", "serve.engine.device=cuda", "action=run")
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in output(result)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--config-name", "serve_demo", "--help"]])
def test_help_prints_usage(args):
    result = subprocess.run(
        [sys.executable, "run.py", *args], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, output(result)
    assert "usage: python run.py --config-path ./examples/pi0/conf" in result.stdout
    assert "action=run|test|stop" in result.stdout and "serve.engine.device=cpu" in result.stdout
    assert "Traceback" not in output(result)


FAILING_SERVER = """
import sys, time
print("loading step one", flush=True)
print('{"path": "/health", "status": 503}', flush=True)  # an access-log line of a probe
time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]) if "--sleep" in sys.argv else 0)
print("error: %s", flush=True)
sys.exit(1)
"""


def test_failure_output_shows_only_this_start(exp_dir, tmp_path):
    """The server log is appended across starts: a failed run shows only its own lines."""
    for attempt in ("first-failure", "second-failure"):
        entry = tmp_path / f"{attempt}.py"
        entry.write_text(FAILING_SERVER % attempt)
        result = run_cli(
            f"experiment.exp_dir={exp_dir}",
            f"experiment.task.entrypoint={entry}",
            f"serve.engine.port={free_port()}",
            "action=run",
        )
        assert result.returncode != 0
    text = output(result)
    assert "error: second-failure" in text and "loading step one" in text
    assert "first-failure" not in text
    assert '"path": "/health"' not in text  # our own probes are not the server's news
    log = (exp_dir / "serve_logs" / "host_0_localhost.output").read_text()
    assert "error: first-failure" in log  # still kept in the file


INFO_SERVER = """
import argparse, http.server, json, yaml
parser = argparse.ArgumentParser()
parser.add_argument("--config-path")
parser.add_argument("--log-dir")
args = parser.parse_args()
engine = yaml.safe_load(open(args.config_path))["serve"]["engine"]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "healthy", "model_loaded": True, "log_dir": args.log_dir})
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass

http.server.HTTPServer((engine["host"], engine["port"]), Handler).serve_forever()
"""


def test_stop_with_another_exp_dir_names_the_running_server(tmp_path):
    entry, port = tmp_path / "info_server.py", free_port()
    entry.write_text(INFO_SERVER)
    started, other = tmp_path / "started", tmp_path / "other"
    args = [f"experiment.task.entrypoint={entry}", f"serve.engine.port={port}"]
    assert run_cli(f"experiment.exp_dir={started}", *args, "action=run").returncode == 0
    try:
        wrong = run_cli(f"experiment.exp_dir={other}", *args, "action=stop")
        text = output(wrong)
        assert wrong.returncode == 1, text
        assert f"no server running for exp_dir {other}" in text
        assert f"but a server answers on http://127.0.0.1:{port}" in text
        assert f"started for exp_dir {started}" in text
        assert f"experiment.exp_dir={started}" in text
    finally:
        right = run_cli(f"experiment.exp_dir={started}", *args, "action=stop")
    assert right.returncode == 0, output(right)


@pytest.mark.slow
def test_generated_checkpoint_serves_through_the_real_config(exp_dir, tmp_path):
    """README's CPU path for the real-checkpoint config: make_random_checkpoint, then action=test
    with the `serve` config pointed at it (model, tokenizer, stats.json)."""
    ckpt = tmp_path / "pi0_tiny"
    made = subprocess.run(
        [sys.executable, "-m", "flagscale.tools.make_random_checkpoint", str(ckpt)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, output(made)
    result = run_cli(
        f"experiment.exp_dir={exp_dir}",
        f"serve.engine.model={ckpt}",
        f"serve.engine.tokenizer={ckpt / 'tokenizer'}",
        f"serve.engine.stat_path={ckpt / 'stats.json'}",
        "serve.engine.device=cpu",
        "serve.engine.torch_dtype=float32",
        f"serve.engine.port={free_port()}",
        "action=test",
        config="serve",
    )
    assert result.returncode == 0, output(result)
    assert "test /infer: HTTP 200" in output(result)
    assert "serve config: accepted for FlagScale v1 compatibility" not in output(result)
