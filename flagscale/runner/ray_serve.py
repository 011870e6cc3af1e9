"""Ray Serve deployment of the same Pi0 app (experiment.runner.deploy.use_fs_serve=true).

    python flagscale/runner/ray_serve.py --config-path <resolved serve.yaml> [--log-dir <dir>]

The launcher starts this driver exactly like the plain server (own session, pid file, /health
wait). It connects to `deploy.ray_address` (null: starts a local Ray instance that it owns), runs
`deploy.num_replicas` replicas of the FastAPI app (each with its own inference worker, batching and
queue) behind Ray Serve's HTTP proxy on serve.engine.host:port, and blocks. SIGTERM/SIGINT:
serve.shutdown() (replicas drain for up to engine.drain_timeout_s; on a cluster given by ray_address
only our application is deleted), then ray.shutdown(), which stops the local Ray processes this
driver started (and nothing else); exit 0. Each response carries
X-Replica-ID. Websockets (openpi) go through the proxy too.
"""

import argparse
import dataclasses
import os
import signal
import sys
import threading

from pathlib import Path

if __package__ in (None, ""):  # run as a script path: make the repo root importable
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from flagscale.logger import get_logger  # noqa: E402

logger = get_logger("flagscale.runner.ray_serve")

APP_NAME = "pi0"
DEPLOY_KEYS = (
    "use_fs_serve",
    "num_replicas",
    "ray_address",
    "num_gpus_per_replica",
    "num_cpus_per_replica",
)


class DeployError(ValueError):
    """experiment.runner.deploy holds an unknown key or a bad value."""


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    num_replicas: int = 1
    ray_address: str | None = None
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0


def deploy_options(deploy: dict, device: str) -> DeployOptions:
    """Validate experiment.runner.deploy; num_gpus_per_replica defaults to 1 on CUDA devices."""
    unknown = [k for k in deploy if k not in DEPLOY_KEYS]
    if unknown:
        raise DeployError(f"experiment.runner.deploy.{unknown[0]}: unknown key")
    replicas = deploy.get("num_replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 1024:
        raise DeployError(f"experiment.runner.deploy.num_replicas: 1..1024, got {replicas!r}")
    address = deploy.get("ray_address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise DeployError(f"experiment.runner.deploy.ray_address: a string, got {address!r}")
    default_gpus = 1.0 if device.startswith("cuda") else 0.0
    gpus = _number("num_gpus_per_replica", deploy.get("num_gpus_per_replica"), default_gpus)
    cpus = _number("num_cpus_per_replica", deploy.get("num_cpus_per_replica"), 1.0)
    return DeployOptions(replicas, address, gpus, cpus)


def _number(key: str, value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1024:
        raise DeployError(f"experiment.runner.deploy.{key}: a number in 0..1024, got {value!r}")
    return float(value)


def build_deployment(serve_section: dict, options: DeployOptions, drain_s: float):
    from ray import serve

    @serve.ingress()
    class Pi0Replica:
        def __init__(self, section: dict):
            self._section = section
            self._app = None

        def __serve_build_asgi_app__(self):
            from flagscale.serve.app import create_app
            from flagscale.serve.config import load_serve_config
            from flagscale.serve.engine import set_environment

            cfg = load_serve_config(self._section)
            set_environment(cfg)
            replica_id = serve.get_replica_context().replica_id.unique_id
            self._app = create_app(None, cfg, replica_id=replica_id)
            return self._app

        def check_health(self):
            worker = None if self._app is None else self._app.state.worker
            if worker is not None and worker.state == "failed":
                raise RuntimeError(f"model failed: {worker.error}")

    actor_options = {"num_cpus": options.num_cpus_per_replica}
    if options.num_gpus_per_replica:
        actor_options["num_gpus"] = options.num_gpus_per_replica
    deployment = serve.deployment(
        Pi0Replica,
        name="Pi0Replica",
        num_replicas=options.num_replicas,
        ray_actor_options=actor_options,
        graceful_shutdown_timeout_s=drain_s,
        max_ongoing_requests=1000,  # the app's own queue (engine.max_queue) answers 503 when full
    )
    return deployment.bind(serve_section)


def runtime_env() -> dict:
    """Replicas import flagscale from this checkout and see the API keys given by env."""
    from flagscale.ops import FLAGGEMS_ENV
    from flagscale.serve.auth import ENV_VAR as KEYS_ENV

    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for name in (KEYS_ENV, FLAGGEMS_ENV, "CUDA_DEVICE_MAX_CONNECTIONS"):
        if name in os.environ:
            env[name] = os.environ[name]
    return {"env_vars": env}


def serve_forever(config: dict) -> int:
    import ray

    from ray import serve

    from flagscale.serve.auth import resolve_keys, warn_if_exposed
    from flagscale.serve.config import load_serve_config

    cfg = load_serve_config(config)
    runner = (config.get("experiment") or {}).get("runner") or {}
    options = deploy_options(dict(runner.get("deploy") or {}), cfg.device)
    warn_if_exposed(cfg.host, resolve_keys(cfg.api_keys, os.environ))
    stop = threading.Event()
    _handle_stop_signals(stop)
    logger.info("ray: %s; %s", options.ray_address or "starting a local instance", options)
    ray.init(
        address=options.ray_address,
        runtime_env=runtime_env(),
        include_dashboard=False,
        log_to_driver=True,
    )
    _handle_stop_signals(stop)  # again: ray.init installs its own crash handler for SIGTERM
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        app = build_deployment(config["serve"], options, cfg.drain_timeout_s)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        logger.info(
            "Ray Serve: %d replica(s) on http://%s:%d", options.num_replicas, cfg.host, cfg.port
        )
        while not stop.wait(1.0):
            pass
        _stop_serve(serve, owned=options.ray_address is None)
    finally:
        ray.shutdown()
    logger.info("Ray Serve stopped")
    return 0


def _handle_stop_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def _stop_serve(serve, owned: bool) -> None:
    """Our own local Ray: shut Serve down. A shared cluster: delete only our application."""
    if owned:
        logger.info("stopping Ray Serve")
        serve.shutdown()
    else:
        logger.info("deleting the Serve application %r from the cluster", APP_NAME)
        serve.delete(APP_NAME)


def main(argv=None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description="Pi0 server on Ray Serve")
    parser.add_argument("--config-path", required=True, help="the launcher's resolved serve.yaml")
    parser.add_argument("--log-dir", default=None)
    args = parser.parse_args(argv)
    with open(args.config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    return serve_forever(config)


if __name__ == "__main__":
    sys.exit(main())
