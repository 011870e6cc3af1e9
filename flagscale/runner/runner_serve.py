"""Serve runner: resolve the config, pre-flight checks, start the Pi0 server, wait, stop.

Layout under ``<exp_dir>/serve_logs`` (FlagScale's): ``scripts/serve.yaml`` (resolved config the
server reads), ``host_0_localhost.output`` (server stdout+stderr, appended),
``pids/host_0_localhost.pid`` (+ ``.pid.json`` with the create time, see ``process.py``).
"""

import importlib.util
import os
import secrets
import subprocess
import sys
import time

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import psutil

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flagscale.logger import get_logger
from flagscale.runner import redact
from flagscale.runner.launch import build_env, exec_foreground, parse_cmds, run_cmds
from flagscale.runner.lock import exp_dir_lock
from flagscale.runner.preflight import check_device, check_use_flaggems
from flagscale.runner.probe import base_url, check_port_free, health, http_json, is_ready
from flagscale.runner.process import (
    PidRecord,
    exit_status,
    file_size,
    live_process,
    read_pid_record,
    remove_pid_record,
    session_orphans,
    start_background,
    stop_procs,
    stop_tree,
    tail,
    write_pid_record,
)
from flagscale.runner.runner_base import RunnerBase, RunnerError
from flagscale.runner.smoke import check_infer_response, sample_request
from flagscale.serve.config import ServeConfig
from flagscale.serve.flagscale_compat import ENTRYPOINTS, raw_engine

logger = get_logger("flagscale.runner")

HOST_TAG = "host_0_localhost"
LOCK_NAME = "run.lock"
DEFAULT_ENTRYPOINT = "flagscale/serve/run_serve_pi0.py"
START_TOKEN_ENV = "PI0_START_TOKEN"
POLL_S = 0.5
REPORT_EVERY_S = 5.0
HEALTH_PROBE = '"path": "/health"'  # the server's access-log line for a /health request


def seconds(key: str, value) -> float:
    """experiment.runner.<key>: a number of seconds >= 0 (RunnerError naming the key otherwise)."""
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= 0 or number == float("inf"):
        raise RunnerError(
            f"experiment.runner.{key}: expected a number of seconds >= 0, got {value!r}"
        )
    return number


def plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class ServeRunner(RunnerBase):
    def __init__(self, cfg, repo_root: Path):
        super().__init__(cfg, repo_root)
        self.log_dir = self.exp_dir / "serve_logs"
        self.config_path = self.log_dir / "scripts" / "serve.yaml"
        self.log_path = self.log_dir / f"{HOST_TAG}.output"
        self.pid_file = self.log_dir / "pids" / f"{HOST_TAG}.pid"
        self.foreground = bool(self.runner_cfg.get("foreground", False))
        self.ready_timeout = seconds("ready_timeout", self.runner_cfg.get("ready_timeout", 600))
        self.stop_timeout = self._stop_timeout(self.runner_cfg.get("stop_timeout"))
        cmds = plain(cfg.experiment.get("cmds")) or {}
        self.before_start = parse_cmds(cmds.get("before_start"), "before_start")
        self.after_stop = parse_cmds(cmds.get("after_stop"), "after_stop")
        self.serve_cfg = None  # ServeConfig once run() validated it
        self.start_token = secrets.token_hex(16)  # echoed by our child's /health
        self.log_start = 0  # offset of this start's lines in the (appended) server log
        deploy = plain(self.runner_cfg.get("deploy")) or {}
        self.use_ray = bool(deploy.get("use_fs_serve", False))
        self.requires_token = not self.use_ray  # and the entry point is ours (see _check_token)
        self._scrub_hydra_record()

    def _stop_timeout(self, configured) -> float:
        """SIGTERM -> SIGKILL wait. After SIGTERM a server drains in-flight requests for up to
        serve.engine.drain_timeout_s, then needs at most DRAIN_MARGIN_S to exit: the default
        (null) is their sum; a shorter stop_timeout is warned about."""
        from flagscale.serve.config import DRAIN_MARGIN_S, ServeConfig

        drain = raw_engine(plain(self.cfg.get("serve"))).get("drain_timeout_s")
        drain = drain if isinstance(drain, (int, float)) else ServeConfig.drain_timeout_s
        needed = float(drain) + DRAIN_MARGIN_S
        if configured is None:
            return needed
        value = seconds("stop_timeout", configured)
        if value < needed:
            logger.warning(
                "experiment.runner.stop_timeout (%gs) is shorter than serve.engine.drain_timeout_s "
                "(%gs) + %gs: action=stop may SIGKILL the server while it drains requests "
                "(leave stop_timeout unset to derive it)",
                value,
                drain,
                DRAIN_MARGIN_S,
            )
        return value

    # ----- action=run -------------------------------------------------------------------------
    def run(self) -> int:
        rc = self._launch()
        if rc == 0:
            logger.info("stop it with the same command and action=stop")
        return rc

    def _launch(self) -> int:
        with self._lock():  # a concurrent run for this exp_dir waits, then finds our server
            self._refuse_if_running()
            entrypoint = self._check_supported()
            resolved = self._write_resolved_config()
            check_use_flaggems(plain(self.cfg.experiment.get("envs")) or {}, os.environ)
            env = redact.with_keys(self._env(), redact.api_keys(resolved))
            env[START_TOKEN_ENV] = self.start_token
            self.serve_cfg = self._preflight(resolved, env)
            run_cmds(self.before_start, "before_start", self.repo_root, env)
            argv = [sys.executable, str(entrypoint), "--config-path", str(self.config_path)]
            argv += ["--log-dir", str(self.log_dir)]
            if self.foreground:
                exec_foreground(argv, self.repo_root, env, self.pid_file)
            proc = self._start(argv, env)
        return self._wait_or_abort(proc, self._url())

    def _lock(self):
        return exp_dir_lock(self.log_dir / "pids" / LOCK_NAME, self.exp_dir)

    def _check_supported(self) -> Path:
        """Refuse what this launcher cannot do; return the absolute server entry point."""
        if self.use_ray:
            return self._check_ray()
        if self.runner_cfg.get("hostfile"):
            raise RunnerError(
                "experiment.runner.hostfile is set, but multi-host serving is not supported; "
                "set it to null (the server runs on this machine)"
            )
        task = self.cfg.experiment.task
        entry = Path(str(task.get("entrypoint") or DEFAULT_ENTRYPOINT))
        if str(entry) in ENTRYPOINTS:
            logger.info("experiment.task.entrypoint %s: FlagScale's server; running ours", entry)
            entry = Path(DEFAULT_ENTRYPOINT)
        entry = entry if entry.is_absolute() else self.repo_root / entry
        if entry.suffix != ".py":
            raise RunnerError(f"experiment.task.entrypoint: {entry} is not a .py file")
        if not entry.is_file():
            raise RunnerError(f"experiment.task.entrypoint: {entry} does not exist")
        self.requires_token = entry.resolve() == (self.repo_root / DEFAULT_ENTRYPOINT).resolve()
        return entry

    def _check_ray(self) -> Path:
        """use_fs_serve=true: validate experiment.runner.deploy; the driver is ray_serve.py."""
        from flagscale.runner.ray_serve import DeployError, deploy_options

        if self.runner_cfg.get("hostfile"):
            raise RunnerError(
                "experiment.runner.hostfile: with use_fs_serve the Ray cluster places replicas; "
                "set deploy.ray_address instead (see docs/ray_serve.md)"
            )
        deploy = plain(self.runner_cfg.get("deploy")) or {}
        engine = raw_engine(plain(self.cfg.get("serve")))
        if (engine.get("lerobot_grpc") or {}).get("enabled"):
            raise RunnerError(
                "serve.engine.lerobot_grpc.enabled: not with use_fs_serve (Ray Serve routes HTTP "
                "only; every replica would bind the gRPC port); serve lerobot robots without Ray"
            )
        device = str(engine.get("device", ""))
        try:
            deploy_options(deploy, device)
        except DeployError as err:
            raise RunnerError(str(err)) from err
        if importlib.util.find_spec("ray") is None:
            raise RunnerError(
                "experiment.runner.deploy.use_fs_serve=true needs Ray Serve: "
                "pip install -e '.[ray]'"
            )
        return Path(__file__).resolve().with_name("ray_serve.py")

    def _refuse_if_running(self) -> None:
        record = read_pid_record(self.pid_file)
        if record is None:
            return
        proc = live_process(record)
        if proc is not None:
            raise RunnerError(
                f"a server started for exp_dir {self.exp_dir} is still running (pid {proc.pid}); "
                "stop it first with the same command and action=stop"
            )
        logger.warning("removing stale pid file %s: %s", self.pid_file, self._why_stale(record))
        remove_pid_record(self.pid_file)

    def _write_resolved_config(self) -> Dict[str, Any]:
        """Write serve.yaml without API keys (owner-only); returns the full resolved config."""
        resolved = self._resolved()
        text = OmegaConf.to_yaml(OmegaConf.create(redact.redacted(resolved)))
        try:
            redact.write_private(self.config_path, text)
        except OSError as err:
            raise RunnerError(
                f"experiment.exp_dir: cannot write {self.config_path}: {err.strerror or err}"
            ) from None
        logger.info("resolved config written to %s", self.config_path)
        return resolved

    def _resolved(self) -> Dict[str, Any]:
        try:
            return OmegaConf.to_container(self.cfg, resolve=True)
        except OmegaConfBaseException as err:
            raise RunnerError(f"cannot resolve the config: {err}") from err

    def _scrub_hydra_record(self) -> None:
        """Hydra wrote the config and the command line (keys included) before this runs."""
        try:
            keys = redact.api_keys(self._resolved())
        except RunnerError:
            return
        if keys:
            redact.scrub_files(redact.hydra_record(), keys)

    def _preflight(self, resolved: Dict[str, Any], env: Dict[str, str]):
        """Validate the serve config with the server's own loader; check the port is free."""
        try:
            from flagscale.serve.config import ConfigError, load_serve_config
        except ImportError as err:
            raise RunnerError(f"cannot import the server config loader: {err}") from err
        from flagscale.serve.auth import resolve_keys

        try:
            serve_cfg = load_serve_config(resolved, env=env)
            resolve_keys(serve_cfg.api_keys, env)  # PI0_API_KEYS too
        except ConfigError as err:
            raise RunnerError(f"invalid serve config: {err}") from err
        check_device(serve_cfg, env)
        check_port_free(serve_cfg.host, serve_cfg.port)
        grpc = serve_cfg.lerobot_grpc
        if grpc.enabled and grpc.port:
            try:
                check_port_free(grpc.host or serve_cfg.host, grpc.port)
            except RunnerError as err:
                raise RunnerError(f"serve.engine.lerobot_grpc.port: {err}") from err
        return serve_cfg

    def _url(self) -> str:
        return base_url(self.serve_cfg.host, self.serve_cfg.port)

    def _env(self) -> Dict[str, str]:
        return build_env(plain(self.cfg.experiment.get("envs")), os.environ, self.repo_root)

    def _start(self, argv: List[str], env: Dict[str, str]) -> subprocess.Popen:
        self.log_start = file_size(self.log_path)  # this start's lines follow (log is appended)
        proc = start_background(argv, self.repo_root, env, self.log_path)
        write_pid_record(self.pid_file, proc.pid)
        logger.info("server started: pid %d, log %s", proc.pid, self.log_path)
        return proc

    def _wait_or_abort(self, proc: subprocess.Popen, url: str) -> int:
        try:
            elapsed = self._wait_ready(proc, url)
        except (RunnerError, KeyboardInterrupt) as err:
            self._abort(proc)
            if isinstance(err, KeyboardInterrupt):
                logger.error("interrupted; the server was stopped")
                return 130
            raise
        logger.info("server ready at %s after %.1fs (pid %d)", url, elapsed, proc.pid)
        return 0

    def _wait_ready(self, proc, url: str) -> float:
        start = time.monotonic()
        next_report = start + REPORT_EVERY_S
        while True:
            code = exit_status(proc)
            if code is not None:
                raise RunnerError(f"the server exited with code {code} before it was ready")
            status, body = health(url)
            elapsed = time.monotonic() - start
            if is_ready(status, body):
                self._check_token(url, body)
                return elapsed
            if elapsed > self.ready_timeout:
                raise RunnerError(
                    f"the server was not ready after {self.ready_timeout:.0f}s "
                    f"(experiment.runner.ready_timeout); last /health: {status} {body}"
                )
            if time.monotonic() >= next_report:
                last = (self._log_tail(1) or ["(empty)"])[0]
                logger.info("waiting for %s/health: %.0fs elapsed; log: %s", url, elapsed, last)
                next_report += REPORT_EVERY_S
            time.sleep(POLL_S)

    def _check_token(self, url: str, body) -> None:
        """The server answering must be the child we started (the port may have been taken by
        another server between the pre-flight check and our child's bind). Ray Serve replicas
        do not see the launcher's environment, and a custom entry point may not echo the token:
        there a missing token is accepted."""
        token = body.get("start_token") if isinstance(body, dict) else None
        if token is None and not self.requires_token:  # Ray Serve, a custom entry point
            return
        if token != self.start_token:
            raise RunnerError(
                f"the server answering at {url} is not the one this command started (its /health "
                f"start_token is {token!r}): another server holds the port; stop it or choose "
                "another serve.engine.port"
            )

    def _log_tail(self, lines: int = 40) -> List[str]:
        """This start's last log lines, without the access-log lines of our own /health probes."""
        return tail(self.log_path, lines, self.log_start, lambda line: HEALTH_PROBE in line)

    def _abort(self, proc: subprocess.Popen) -> None:
        """Show the log tail; stop the child we started and anything left in its session.

        The child is reaped only at the end, so its pid (= session id) cannot be reused meanwhile.
        """
        lines = self._log_tail()
        logger.error("last %d lines of %s:\n%s", len(lines), self.log_path, "\n".join(lines))
        stop_tree(psutil.Process(proc.pid), self.stop_timeout)
        proc.wait()
        remove_pid_record(self.pid_file)

    # ----- action=test ------------------------------------------------------------------------
    def test(self) -> int:
        if self.foreground:
            raise RunnerError("action=test starts the server in the background; unset foreground")
        images = self._sample_images()
        rc = self._launch()
        if rc != 0:
            return rc
        try:
            self._check_inference(images)
        except BaseException:
            self.stop()
            raise
        return self.stop()

    def _sample_images(self) -> List[Path]:
        names = ("orbbec_0_latest.jpg", "orbbec_1_latest.jpg", "orbbec_2_latest.jpg")
        images = [self.repo_root / "examples" / "pi0" / name for name in names]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise RunnerError(f"action=test needs the sample images, missing: {missing}")
        return images

    def _check_inference(self, images: List[Path]) -> None:
        cfg = self.serve_cfg
        payload = sample_request(images, list(cfg.cameras), cfg.state_dim, cfg.instruction)
        url = self._url()
        started = time.monotonic()
        status, body = http_json(url + "/infer", payload, timeout=300)
        elapsed_ms = (time.monotonic() - started) * 1000
        actions = check_infer_response(status, body)
        flat = np.round(actions.reshape(-1)[:6], 4).tolist()
        logger.info(
            "test /infer: HTTP %d in %.0f ms, actions shape %s, first values %s",
            status,
            elapsed_ms,
            list(actions.shape),
            flat,
        )

    # ----- action=stop ------------------------------------------------------------------------
    def stop(self) -> int:
        """Stop the recorded server tree. Nothing running is not an error (exit 0)."""
        with self._lock():
            return self._stop()

    def _stop(self) -> int:
        record = read_pid_record(self.pid_file)
        leader = live_process(record) if record else None
        rc = 0
        if record is None:
            logger.info(
                "no server running for exp_dir %s (no pid file %s)", self.exp_dir, self.pid_file
            )
            rc = self._report_server_elsewhere()
        elif leader is None:
            logger.info(
                "no server running for exp_dir %s: %s; removing the stale pid file",
                self.exp_dir,
                self._why_stale(record),
            )
            rc = self._stop_orphans(record)
            if rc == 0:
                remove_pid_record(self.pid_file)
        else:
            rc = self._stop_leader(leader)
        run_cmds(self.after_stop, "after_stop", self.repo_root, self._env())
        return rc

    def _report_server_elsewhere(self) -> int:
        """A server answering on the configured host:port was started for another exp_dir (its
        /info says which): name it and return 1, rather than report that nothing runs."""
        engine = raw_engine(plain(self.cfg.get("serve")))
        host, port = engine.get("host") or ServeConfig.host, engine.get("port") or ServeConfig.port
        try:
            url = base_url(str(host), int(port))
            status, info = http_json(url + "/info")
        except (OSError, TypeError, ValueError):  # nothing answers (or no usable port): no server
            return 0
        log_dir = info.get("log_dir") if isinstance(info, dict) else None
        started = f"exp_dir {Path(log_dir).parent}" if log_dir else "an unknown exp_dir"
        hint = f"experiment.exp_dir={Path(log_dir).parent}" if log_dir else "the same overrides"
        logger.error(
            "but a server answers on %s (HTTP %s on /info), started for %s: stop it with the "
            "config it was started with (%s, action=stop)",
            url,
            status,
            started,
            hint,
        )
        return 1

    def _stop_leader(self, leader) -> int:
        procs, survivors = stop_tree(leader, self.stop_timeout)
        if survivors:
            pids = [p.pid for p in survivors]
            logger.error("could not stop %s; pid file kept at %s", pids, self.pid_file)
            return 1
        remove_pid_record(self.pid_file)
        others = sorted(p.pid for p in procs if p.pid != leader.pid)
        extra = f" and {len(others)} other process(es) {others}" if others else ""
        logger.info("stopped the server for exp_dir %s: pid %d%s", self.exp_dir, leader.pid, extra)
        return 0

    def _stop_orphans(self, record: PidRecord) -> int:
        """The server leader died but left processes in its session: stop those."""
        orphans = session_orphans(record)
        if not orphans:
            return 0
        pids = sorted(p.pid for p in orphans)
        logger.info("stopping %d process(es) left in the server's session: %s", len(pids), pids)
        survivors = stop_procs(orphans, self.stop_timeout)
        if survivors:
            logger.error(
                "could not stop %s; pid file kept at %s", [p.pid for p in survivors], self.pid_file
            )
            return 1
        return 0

    def _why_stale(self, record: PidRecord) -> str:
        if record.pid <= 0:
            return f"{self.pid_file} does not hold a pid"
        if record.create_time < 0:
            return f"pid {record.pid} has no matching start record, so it is not known to be ours"
        return f"pid {record.pid} is not running (or is another process now)"
