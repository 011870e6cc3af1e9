"""use_fs_serve=true: the launcher deploys 2 replicas of the tiny model on a local Ray (CPU),
both answer through Ray Serve's proxy, and action=stop tears Ray down again."""

import time

import httpx
import psutil
import pytest

from runner_helpers import free_port, gone, output, run_cli

pytest.importorskip("ray.serve", reason="Ray Serve not installed (pip install -e '.[ray]')")

pytestmark = pytest.mark.slow

BODY = {
    "instruction": "pick",
    "state": [[0.0] * 14],
    "images": [{"cam_high": None, "cam_left_wrist": None}],
}


def body():
    import numpy as np

    from flagscale.serve.codec import encode_image

    image = encode_image(np.zeros((32, 32, 3), np.uint8))
    return {**BODY, "images": [{"cam_high": image}]}


def replica_ids(url: str, want: int, timeout: float = 120) -> set:
    seen, payload = set(), body()
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        response = httpx.post(f"{url}/infer", json=payload, timeout=60)
        if response.status_code == 200:
            assert response.json()["actions"][0][0]
            seen.add(response.headers["x-replica-id"])
        else:
            time.sleep(0.2)  # a replica still loading answers 503
    return seen


def test_ray_serve_two_replicas_run_and_stop(exp_dir):
    port = free_port()
    args = [
        f"experiment.exp_dir={exp_dir}",
        f"serve.engine.port={port}",
        "serve.engine.warmup=false",
        "experiment.runner.deploy.use_fs_serve=true",
        "+experiment.runner.deploy.num_replicas=2",
        "+experiment.runner.deploy.num_cpus_per_replica=0.5",
        "experiment.runner.stop_timeout=60",
    ]
    started = run_cli(*args, "action=run", timeout=400)
    pid_file = exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid"
    try:
        assert started.returncode == 0, output(started)
        driver = psutil.Process(int(pid_file.read_text().strip()))
        tree = [driver] + driver.children(recursive=True)
        assert len(tree) > 2, "expected the local Ray processes under the driver"
        url = f"http://127.0.0.1:{port}"
        assert len(replica_ids(url, want=2)) == 2
    finally:
        stopped = run_cli(*args, "action=stop", timeout=200)
    assert stopped.returncode == 0, output(stopped)
    assert all(gone(p.pid) for p in tree), [p.pid for p in tree if not gone(p.pid)]
    log = (exp_dir / "serve_logs" / "host_0_localhost.output").read_text()
    assert "stopping Ray Serve" in log and "Ray Serve stopped" in log  # the documented path
    assert "SIGTERM received" not in log  # no crash-handler dump from the driver
    assert "SIGKILL" not in output(stopped)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
