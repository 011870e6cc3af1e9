"""Connection limits around uvicorn's httptools protocol (the parser the server runs on).

uvicorn alone never times out a connection before its first request completes, has no limit on
header size with httptools, and answers a pipelined request followed by garbage with a 400 that
loses the good request's reply. `guarded_protocol(limits)` returns a protocol class that adds:

- a header deadline: the headers of each request must arrive within `header_timeout_s` of the
  connection opening (or of the request's first byte on a kept-alive connection), else 408;
- a body deadline: the body must arrive within `body_timeout_s` after the headers, else 408;
- a header size limit: more than `max_header_bytes` before the end of the headers is a 431;
- a connection cap (`max_connections`, websockets included): a new connection beyond it closes
  the oldest connection that has no request in progress, or, if every connection is busy with
  one, is itself answered 503;
- a parse error after complete requests: those requests are answered first, then the 400.

Each refusal is a JSON error {"success": false, "error": ...} with `Connection: close`, and is
logged (at most one line per 10 s, with counts).
"""

import collections
import dataclasses
import json
import time

import httptools

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from flagscale.logger import get_logger

logger = get_logger("flagscale.serve.limits")

LOG_EVERY_S = 10.0
LINGER_S = 1.0


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512
    max_header_bytes: int = 64 * 1024

    @classmethod
    def from_config(cls, cfg) -> "ConnectionLimits":
        return cls(
            header_timeout_s=cfg.header_timeout_s,
            body_timeout_s=cfg.body_timeout_s,
            max_connections=cfg.max_connections,
            max_header_bytes=int(cfg.max_header_kb * 1024),
        )


class LimitLog:
    """One warning for the first refusal, then at most one per LOG_EVERY_S with the counts."""

    def __init__(self):
        self.counts = collections.Counter()
        self.next_at = 0.0

    def note(self, reason: str, client) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now < self.next_at:
            return
        parts = ", ".join(f"{r} x{n}" for r, n in self.counts.items())
        peer = f"{client[0]}:{client[1]}" if client else "unknown"
        logger.warning("connection limits applied: %s (latest: %s)", parts, peer)
        self.counts.clear()
        self.next_at = now + LOG_EVERY_S


def error_response(status: int, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"success": False, "error": message}).encode()
    head = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
    return STATUS_LINE[status] + head + extra + b"connection: close\r\n\r\n" + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `limits`; `guarded_protocol` binds one per server."""

    limits: ConnectionLimits
    # connections with no request in progress, oldest first
    idle: "collections.OrderedDict[HttpToolsProtocol, None]"
    limit_log: LimitLog

    def connection_made(self, transport) -> None:
        full = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        self._timer = None
        self._head_bytes, self._in_head, self._refusal = 0, True, None
        self._head_size = 0  # bytes of the current request's URL and headers
        if full and not self._evict_oldest_idle():
            self._close_with(503, CONNECTIONS_FULL, b"retry-after: 1\r\n")
            return
        self.idle[self] = None
        self._arm(self.limits.header_timeout_s, HEADER_TIMEOUT)

    def connection_lost(self, exc) -> None:
        self.idle.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # refused: nothing more is parsed on this connection
            return
        if self._in_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._head_size > self.limits.max_header_bytes:  # raised by on_url / on_header
                self._refuse(431, HEADERS_TOO_LARGE, "header size")
            else:
                self._refuse(400, "invalid HTTP request", "invalid request")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        else:
            if self._in_head and self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, HEADERS_TOO_LARGE, "header size")

    def handle_websocket_upgrade(self) -> None:
        self.idle.pop(self, None)
        self._disarm()
        super().handle_websocket_upgrade()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        self._head_size = 0
        super().on_message_begin()
        if self._timer is None:  # a kept-alive connection's next request
            self._arm(self.limits.header_timeout_s, HEADER_TIMEOUT)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.idle.pop(self, None)
        self._disarm()
        super().on_headers_complete()
        self._arm(self.limits.body_timeout_s, BODY_TIMEOUT)

    def on_message_complete(self) -> None:
        self._disarm()
        self._head_bytes, self._in_head = 0, True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._refusal is not None and not self.pipeline:
            self.server_state.total_requests += 1
            self._close_with(*self._refusal)
            return
        super().on_response_complete()
        if not self.pipeline and not self.transport.is_closing():
            self.idle[self] = None

    # -------------------------------------------------------------- helpers

    def _count_head(self, size: int) -> None:
        """Parsed head bytes; beyond the limit parsing stops (data_received answers 431)."""
        self._head_size += size
        if self._head_size > self.limits.max_header_bytes:
            raise ValueError("request headers too large")

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, reason)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, reason: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if reason == HEADER_TIMEOUT:  # after the replies to earlier pipelined requests
            message = f"{reason} not received within {self.limits.header_timeout_s:g} s"
            self._refuse(408, f"{message} (engine.header_timeout_s)", reason)
            return
        self.limit_log.note(reason, self.client)
        if self.cycle.response_started:  # answered already (e.g. 401); the body never came
            self.transport.close()
            return
        message = f"{reason} not received within {self.limits.body_timeout_s:g} s"
        self._close_with(408, f"{message} (engine.body_timeout_s)")

    def _refuse(self, status: int, message: str, reason: str) -> None:
        """Answer `status` now, or after the requests already received on this connection."""
        self.limit_log.note(reason, self.client)
        self._refusal = (status, message)
        self._disarm()
        if self.cycle is None or self.cycle.response_complete:
            self._close_with(status, message)

    def _close_with(self, status: int, message: str, extra: bytes = b"") -> None:
        """Reply, then read and drop what the client still sends for up to LINGER_S before
        closing: closing with unread data would reset the connection, and the client would
        not see the reply."""
        self.idle.pop(self, None)
        if self.transport.is_closing():
            return
        self._refusal = self._refusal or (status, message)
        self.transport.write(error_response(status, message, extra))
        try:
            self.transport.write_eof()
        except (NotImplementedError, RuntimeError, OSError):
            pass
        self.loop.call_later(LINGER_S, self.transport.close)

    def _evict_oldest_idle(self) -> bool:
        for victim in self.idle:  # closed without a reply, as an idle keep-alive connection is
            self.limit_log.note("connection cap: closed an idle connection", victim.client)
            self.idle.pop(victim)
            victim.transport.close()
            return True
        self.limit_log.note("connection cap: refused a connection", None)
        return False


def guarded_protocol(limits: ConnectionLimits) -> type:
    """A uvicorn `http` protocol class enforcing `limits` (one class per server: it holds the
    connections that have no request in progress, oldest first)."""
    state = {"limits": limits, "idle": collections.OrderedDict(), "limit_log": LimitLog()}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), state)


HEADER_TIMEOUT = "request headers"
BODY_TIMEOUT = "request body"
HEADERS_TOO_LARGE = "request headers too large (engine.max_header_kb)"
CONNECTIONS_FULL = "server busy: too many open connections (engine.max_connections); retry later"


def uvicorn_config(app, cfg, **options):
    """uvicorn.Config for `app` served with `cfg`'s connection limits (httptools protocol)."""
    import uvicorn

    protocol = guarded_protocol(ConnectionLimits.from_config(cfg))
    return uvicorn.Config(app, http=protocol, ws_max_size=cfg.max_body_bytes, **options)
