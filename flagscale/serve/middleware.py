"""ASGI middleware for HTTP requests: request id, API-key check, metrics and the access log.

X-Request-ID: a client's id (1..128 of [A-Za-z0-9._:-]) is echoed, otherwise one is generated; it
is returned on every response and written to the access log (one JSON line per request).
Websocket connections pass through (the openpi route checks keys and counts messages itself).
"""

import json
import re
import time
import uuid

from flagscale.logger import get_logger
from flagscale.serve.auth import OPEN_PATHS, UNAUTHORIZED, authorized

access_logger = get_logger("flagscale.serve.access")

ROUTES = ("/infer", "/health", "/healthz", "/info", "/metrics", "/openapi.json", "/docs")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(headers: dict) -> str:
    given = headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def endpoint_label(path: str) -> str:
    """Bounded label set for metrics: known routes, else 'other'."""
    return path if path in ROUTES else "other"


class ServeMiddleware:
    def __init__(self, app, *, metrics, keys: tuple, access_log: bool, replica_id=None):
        self.app = app
        self.metrics = metrics
        self.keys = keys
        self.access_log = access_log
        self.replica_id = replica_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = request_id(headers)
        scope.setdefault("state", {})["request_id"] = rid
        extra = [(b"x-request-id", rid.encode())]
        if self.replica_id:
            extra.append((b"x-replica-id", str(self.replica_id).encode()))
        status = {"code": 500}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        start = time.perf_counter()
        try:
            if self._allowed(scope["path"], headers):
                await self.app(scope, receive, send_with_headers)
            else:
                await _unauthorized(send_with_headers)
        finally:
            self._record(scope, headers, rid, status["code"], time.perf_counter() - start)

    def _allowed(self, path: str, headers: dict) -> bool:
        return path in OPEN_PATHS or authorized(headers.get("authorization"), self.keys)

    def _record(self, scope, headers, rid: str, status: int, seconds: float) -> None:
        self.metrics.observe_request(endpoint_label(scope["path"]), status, seconds)
        if not self.access_log:
            return
        client = scope.get("client") or ("", 0)
        line = {
            "request_id": rid,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(seconds * 1000.0, 2),
            "client": f"{client[0]}:{client[1]}",
            "user_agent": headers.get("user-agent", "")[:200],
        }
        access_logger.info(json.dumps(line))


async def _unauthorized(send) -> None:
    body = json.dumps({"success": False, "error": UNAUTHORIZED}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="pi0"'),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
