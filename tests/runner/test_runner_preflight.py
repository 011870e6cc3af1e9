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
