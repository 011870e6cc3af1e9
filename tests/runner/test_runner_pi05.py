"""The Pi0.5 demo through the real launcher, server and client (tiny random Pi0.5 on CPU):
run.py action=run -> examples/pi0/client_pi0.py -> /info -> action=stop, and action=test."""

import json
import urllib.request

import pytest

from runner_helpers import free_port, output, run_cli
from test_runner_e2e import client

pytestmark = pytest.mark.slow
PI05_CONF = "./examples/pi0_5/conf"


def test_pi05_demo_run_client_info_stop(exp_dir):
    port = free_port()
    args = [f"experiment.exp_dir={exp_dir}", f"serve.engine.port={port}"]
    result = run_cli(*args, "action=run", conf_dir=PI05_CONF)
    assert result.returncode == 0, output(result)
    try:
        answer = client(port)
        assert answer.returncode == 0, output(answer)
        assert "actions shape: [1, 50, 14]" in answer.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=30) as r:
            info = json.load(r)
        assert info["model_variant"] == "pi0.5"
        meta = info["metadata"]
        assert meta["preset"] == "pi05_tiny" and meta["tokenizer_max_length"] == 200
        assert meta["reference_choices"]["state_bins_padded"] is True
    finally:
        stopped = run_cli(*args, "action=stop", conf_dir=PI05_CONF)
    assert stopped.returncode == 0, output(stopped)


def test_pi05_demo_action_test(exp_dir):
    port = free_port()
    args = [f"experiment.exp_dir={exp_dir}", f"serve.engine.port={port}", "action=test"]
    result = run_cli(*args, conf_dir=PI05_CONF)
    assert result.returncode == 0, output(result)
    assert "test /infer: HTTP 200" in output(result) and "actions shape [1, 50, 14]" in output(
        result
    )


def test_pi05_variant_mismatch_is_a_startup_error(exp_dir):
    port = free_port()
    args = [f"experiment.exp_dir={exp_dir}", f"serve.engine.port={port}"]
    result = run_cli(*args, "serve.engine.model_variant=pi0", "action=run", conf_dir=PI05_CONF)
    assert result.returncode != 0
    assert "serve.engine.model_variant: pi0 does not match preset 'pi05_tiny'" in output(result)
