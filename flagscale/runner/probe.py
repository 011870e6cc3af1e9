"""Port and health probes (stdlib only; proxies are bypassed: the server is local)."""

import errno
import json
import socket
import urllib.error
import urllib.request

from typing import Any, Optional, Tuple

from flagscale.runner.runner_base import RunnerError

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_WILDCARD_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def check_port_free(host: str, port: int) -> None:
    """Raise RunnerError if ``host:port`` cannot be bound (in use, or not a local address)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise RunnerError(f"serve.engine.host={host!r}: cannot resolve: {err}") from err
    with socket.socket(family, kind, proto) as sock:
        # Same option uvicorn sets: sockets in TIME_WAIT from a just-stopped server do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise RunnerError(
                    f"port {port} on {host} is already in use: stop what listens there "
                    f"or choose another port (e.g. serve.engine.port={port + 1})"
                ) from err
            raise RunnerError(f"cannot bind {host}:{port}: {err}") from err


def base_url(host: str, port: int) -> str:
    host = _WILDCARD_TO_LOOPBACK.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def http_json(url: str, payload: Any = None, timeout: float = 2.0) -> Tuple[int, Any]:
    """GET (or POST ``payload`` as JSON); returns (status, parsed body or text)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, _parse(response.read())
    except urllib.error.HTTPError as err:
        return err.code, _parse(err.read())


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def health(url: str) -> Tuple[Optional[int], Any]:
    """``GET <url>/health`` → (status, body); (None, reason) when nothing answers."""
    try:
        return http_json(url + "/health")
    except (urllib.error.URLError, OSError) as err:
        return None, str(getattr(err, "reason", err))


def is_ready(status: Optional[int], body: Any) -> bool:
    if status != 200:
        return False
    if isinstance(body, dict):
        return body.get("model_loaded", True) is not False and body.get("ready", True) is not False
    return True
