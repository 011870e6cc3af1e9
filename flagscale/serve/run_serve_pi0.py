"""Pi0 / Pi0.5 server entry (FlagScale v1 name and CLI; engine.model_variant picks or checks the
variant).

    python flagscale/serve/run_serve_pi0.py --config-path <resolved serve.yaml> [--log-dir <dir>]
    python -m flagscale.serve.run_serve_pi0 --config-path examples/pi0/conf/serve/pi0_demo.yaml

The port opens at once; /health answers "loading" (503) while the policy loads and warms up in the
inference thread, then "healthy". SIGTERM / SIGINT shut down gracefully: the port closes at once,
in-flight requests finish (at most engine.drain_timeout_s), then exit 0; a failed load exits 1.
Logs go to stdout/stderr (the launcher redirects them).
"""

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from pathlib import Path

import uvicorn

if __package__ in (None, ""):  # run as a script path: make the repo root importable
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from flagscale.logger import get_logger  # noqa: E402
from flagscale.serve.config import ConfigError, ServeConfig, load_serve_config  # noqa: E402
from flagscale.serve.engine import set_environment  # noqa: E402

logger = get_logger("flagscale.serve.run_serve_pi0")

# after the drain: uvicorn's graceful shutdown (SHUTDOWN_S) and the inference thread's join
# (app.STOP_JOIN_S); the launcher's default stop_timeout leaves config.DRAIN_MARGIN_S for them
SHUTDOWN_S = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="FlagScale Pi0 inference server")
    parser.add_argument(
        "--config-path",
        required=True,
        help="YAML with a top-level `serve` section (the launcher's resolved config) "
        "or a serve task file with an `engine` block",
    )
    parser.add_argument(
        "--log-dir", default=None, help="directory for serve_pi0_config.json (effective config)"
    )
    return parser.parse_args(argv)


def ensure_file_limit(cfg: ServeConfig) -> None:
    """engine.max_connections open sockets need as many file descriptors (plus the model's
    files, logs, pipes): raise the soft limit up to the hard one if needed, else warn."""
    import resource

    needed = cfg.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        logger.warning(
            "open-file limit %d is below engine.max_connections=%d + 256: new connections may "
            "be refused before the cap applies (raise ulimit -n or lower max_connections)",
            target,
            cfg.max_connections,
        )


def write_effective_config(cfg: ServeConfig, log_dir: str | None) -> None:
    if not log_dir:
        return
    path = Path(log_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / "serve_pi0_config.json"
    target.write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    target.chmod(0o600)


def serve(cfg: ServeConfig, log_dir: str | None = None) -> int:
    from flagscale.serve.app import create_app
    from flagscale.serve.protocol import uvicorn_config

    exit_code = {"value": 0}
    server = None

    def on_failure(error: BaseException) -> None:
        exit_code["value"] = 1
        if server is not None:
            server.should_exit = True

    app = create_app(None, cfg, on_failure=on_failure)  # the engine builds the policy
    app.state.log_dir = log_dir  # in /info: action=stop with another exp_dir can name this one
    config = uvicorn_config(
        app,
        cfg,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.uvicorn_log_level,
        access_log=False,  # our middleware writes JSON access lines with request ids
        timeout_graceful_shutdown=SHUTDOWN_S,  # requests are answered by then (drain)
    )
    server = DrainingServer(config, app, cfg.drain_timeout_s)
    _install_signal_handlers(server)
    logger.info(
        "serving on http://%s:%d (ops=%s, device=%s)", cfg.host, cfg.port, cfg.ops, cfg.device
    )
    server.run()
    if not server.started:
        logger.error("the server did not start (is %s:%d free?)", cfg.host, cfg.port)
        return 1
    if app.state.worker.busy_since is not None:  # a model call that outlived the drain
        logger.warning("exiting with a model call still running (its requests were answered)")
        logging.shutdown()
        os._exit(exit_code["value"])  # no interpreter teardown under a running torch call
    return exit_code["value"]


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: new requests get 503 with Retry-After (and /health says
    "draining") at once; requests in flight, HTTP and openpi, are answered for at most `drain_s`;
    those still unanswered then get a 503 "shutting down" (the model call running cannot be
    interrupted; its result is dropped); then uvicorn's own shutdown closes the port. Worst case
    from the signal to exit: drain_s + a few seconds (see DRAIN_MARGIN_S). uvicorn alone would
    close open websockets at once and answer unfinished HTTP requests with a plain 500."""

    def __init__(self, config, app, drain_s: float):
        super().__init__(config)
        self.app_state, self.drain_s = app.state, drain_s

    def handle_exit(self, sig, frame):
        if self.app_state.draining or self.should_exit:  # a second signal: uvicorn's own path
            return super().handle_exit(sig, frame)
        self.app_state.draining = True
        logger.info("draining: finishing in-flight requests (at most %g s)", self.drain_s)
        threading.Thread(target=self._drain, args=(sig, frame), daemon=True).start()

    def _in_flight(self) -> int:
        return self.app_state.ws_in_flight + self.app_state.http_in_flight

    def _wait_in_flight(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._in_flight() > 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    def _drain(self, sig, frame):
        self._wait_in_flight(self.drain_s)
        if self._in_flight() > 0:
            failed = self.app_state.worker.abort(
                f"server is shutting down: the request did not finish within "
                f"engine.drain_timeout_s={self.drain_s:g}; retry"
            )
            logger.warning("drain timeout: %d request(s) answered 503", failed)
            self._wait_in_flight(1.0)  # their replies go out
        super().handle_exit(sig, frame)


def _install_signal_handlers(server) -> None:
    """uvicorn handles SIGTERM/SIGINT while serving, then re-raises them after shutdown; these
    handlers receive that re-raise (and any signal before serving starts) so we exit 0."""

    def handle(signum, frame):
        server.should_exit = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_serve_config(args.config_path)
    except ConfigError as e:
        logger.error("invalid serve config %s: %s", args.config_path, e)
        return 2
    set_environment(cfg)
    ensure_file_limit(cfg)
    write_effective_config(cfg, args.log_dir)
    try:
        return serve(cfg, args.log_dir)
    except ConfigError as e:  # e.g. a malformed key in PI0_API_KEYS
        logger.error("invalid serve config: %s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
