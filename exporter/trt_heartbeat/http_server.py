"""The HTTP server: /metrics, /health, /ping, /probes and a landing page.

Each request runs in its own thread and only reads snapshots, so a wedged probe worker can never
hold a request. Only GET and HEAD are served.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from . import __version__
from .web_config import BasicAuth, TLSContext, WebConfig

log = logging.getLogger("trt_heartbeat.http")

REQUEST_TIMEOUT_SECONDS = 10.0  # a client that sends nothing for this long is dropped
# Once a request has begun (or a TLS handshake), its headers must be complete within this: a
# client dribbling bytes (slowloris) cannot hold a connection longer.
HEADER_TIMEOUT_SECONDS = 5.0
# Open connections at once, idle and half-open included; past it the oldest idle one is dropped.
MAX_CONNECTIONS = 1024


class App(Protocol):
    @property
    def telemetry_path(self) -> str: ...

    def render_metrics(self, accept: str | None, gzip: bool = False) -> tuple[bytes, str]:
        """The exposition for this Accept header; gzip-compressed when `gzip`."""

    def health_report(self) -> tuple[dict[str, Any], bool]: ...

    def probe_report(self) -> dict[str, Any]: ...

    def alive(self) -> bool: ...


def _landing_page(telemetry_path: str) -> bytes:
    links = [
        (telemetry_path, "Metrics"),
        ("/health", "Health (readiness, JSON)"),
        ("/ping", "Ping (liveness)"),
        ("/probes", "Last probes per target (debug, JSON)"),
    ]
    items = "".join(
        f'<li><a href="{html.escape(path)}">{html.escape(text)}</a></li>' for path, text in links
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>trt-heartbeat-exporter</title>'
        "</head><body><h1>trt-heartbeat-exporter</h1>"
        f"<p>Version {html.escape(__version__)}. Runs a canonical inference on every GPU on a "
        f"timer and exports the heartbeat.</p><ul>{items}</ul></body></html>\n"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    server: ExporterHTTPServer
    timeout = REQUEST_TIMEOUT_SECONDS
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, a keep-alive client's delayed ACK
    # adds ~40 ms to every scrape.
    disable_nagle_algorithm = True
    # Malformed request lines still get a status line (the stdlib would answer HTTP/0.9-style).
    default_request_version = "HTTP/1.0"
    server_version = f"trt-heartbeat-exporter/{__version__}"
    _slot = False  # this request holds one of the server's request slots

    def handle_one_request(self) -> None:
        # Idle (keep-alive, or a fresh connection): wait for the first byte of a request under
        # the idle timeout; from then on the header deadline runs. A request whose headers are
        # complete takes a slot (--web.max-requests) until its answer is written.
        try:
            if not self.rfile.peek(1):  # type: ignore[attr-defined]
                self.close_connection = True
                return
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        self._slot = False
        self.server.connections.enter(HEADERS)
        try:
            super().handle_one_request()
        finally:
            if self._slot:
                self.server.release_slot()
                self._slot = False
            self.server.connections.enter(IDLE)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        # A cut connection's headers end at its EOF and would parse: answer nothing, spend no
        # slot and no rendering on it.
        if not self.server.connections.enter(BUSY):
            self.close_connection = True
            return False
        if not self.server.acquire_slot():
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.write(_TOO_MANY)
            return False
        self._slot = True
        return True

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain",
                   extra={"Allow": "GET, HEAD"})  # fmt: skip

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _authorized(self) -> bool:
        auth = self.server.basic_auth
        if auth is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user = password = ""
            if user and auth.check(user, password):
                return True
        self._send(HTTPStatus.UNAUTHORIZED, b"unauthorized\n", "text/plain",
                   extra={"WWW-Authenticate": 'Basic realm="trt-heartbeat-exporter"'})  # fmt: skip
        return False

    def _dispatch(self, head: bool) -> None:
        app = self.server.app
        path = urlsplit(self.path).path
        if not self._authorized():
            return
        try:
            if path == app.telemetry_path:
                gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
                body, content_type = app.render_metrics(self.headers.get("Accept"), gzipped)
                self._send(HTTPStatus.OK, body, content_type, head, gzipped=gzipped)
            elif path == "/health":
                report, ready = app.health_report()
                status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
                self._send_json(status, report, head)
            elif path == "/ping":
                if app.alive():
                    self._send(HTTPStatus.OK, b"OK\n", "text/plain", head)
                else:
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"probe loop stalled\n",
                               "text/plain", head)  # fmt: skip
            elif path == "/probes":
                self._send_json(HTTPStatus.OK, app.probe_report(), head)
            elif path == "/":
                self._send(HTTPStatus.OK, _landing_page(app.telemetry_path), "text/html", head)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head)
        except ConnectionError:  # the client went away mid-response
            self.close_connection = True
        except Exception:
            log.exception("error serving request", extra={"fields": {"path": path}})
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain", head)

    def _send_json(self, status: HTTPStatus, document: dict[str, Any], head: bool) -> None:
        body = (json.dumps(document, indent=2, sort_keys=False) + "\n").encode()
        self._send(status, body, "application/json", head)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        head: bool = False,
        gzipped: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        if "charset" not in content_type and not content_type.startswith("application/json"):
            content_type += "; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        for key, value in {**self.server.headers, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Plain-text errors that never echo the request (the stdlib page quotes it)."""
        status = HTTPStatus(code)
        self.close_connection = True
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format % args)


HANDSHAKE, HEADERS, IDLE, BUSY = "handshake", "headers", "idle", "busy"


@dataclass
class _Connection:
    sock: socket.socket
    phase: str
    since: float


class Connections:
    """Every open connection and what it is doing, so that slow or idle ones can be bounded.

    A reaper thread closes connections that spent longer than the header deadline in a TLS
    handshake or in their request headers; past `limit` open connections, a new one makes room
    by closing the oldest idle, then the oldest unfinished one. Requests being answered (BUSY)
    are never dropped: they are bounded by the request slots.
    """

    def __init__(self, limit: int, header_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.limit, self.header_timeout, self.clock = limit, header_timeout, clock
        self._open: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._stop = threading.Event()
        self.dropped = 0

    def add(self, sock: socket.socket, phase: str) -> bool:
        """Register a new connection; False if no room could be made."""
        with self._lock:
            if len(self._open) >= self.limit:
                victim = self._oldest(IDLE) or self._oldest(HEADERS) or self._oldest(HANDSHAKE)
                if victim is None:
                    return False
                self._drop(victim, "connection limit")
            self._open[id(sock)] = _Connection(sock, phase, self.clock())
            return True

    def remove(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(id(sock), None)

    def bind(self, sock: socket.socket) -> None:
        """The connection the calling thread serves."""
        self._local.sock = sock

    def rebind(self, old: socket.socket, new: socket.socket) -> None:
        """The connection now lives in `new` (a TLS socket wrapping `old`)."""
        with self._lock:
            conn = self._open.pop(id(old), None)
            if conn is not None:
                conn.sock = new
                self._open[id(new)] = conn
        self._local.sock = new

    def enter(self, phase: str) -> bool:
        """Move the calling thread's connection to `phase`; False if it was dropped meanwhile."""
        sock = getattr(self._local, "sock", None)
        with self._lock:
            conn = self._open.get(id(sock)) if sock is not None else None
            if conn is None:
                return False
            if conn.phase != phase:
                conn.phase, conn.since = phase, self.clock()
            return True

    def count(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys((HANDSHAKE, HEADERS, IDLE, BUSY), 0)
            for conn in self._open.values():
                out[conn.phase] += 1
            return out

    def reap(self) -> None:
        with self._lock:
            now = self.clock()
            late = [c for c in self._open.values() if c.phase in (HANDSHAKE, HEADERS)
                    and now - c.since > self.header_timeout]  # fmt: skip
            for conn in late:
                self._drop(conn, "header deadline")

    def run_reaper(self, every: float = 0.25) -> None:
        while not self._stop.wait(every):
            self.reap()

    def stop(self) -> None:
        self._stop.set()

    def _oldest(self, phase: str) -> _Connection | None:
        candidates = [c for c in self._open.values() if c.phase == phase]
        return min(candidates, key=lambda c: c.since) if candidates else None

    def _drop(self, conn: _Connection, why: str) -> None:
        # Shutting the socket down wakes its thread, blocked in a read, which then ends.
        self._open.pop(id(conn.sock), None)
        self.dropped += 1
        log.debug("dropping connection", extra={"fields": {"why": why, "phase": conn.phase}})
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)


class ExporterHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # bursts of connections wait in the kernel, not refused

    def __init__(
        self,
        host: str,
        port: int,
        app: App,
        web: WebConfig | None = None,
        max_requests: int = 40,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
    ) -> None:
        self.app = app
        self.connections = Connections(max_connections, header_timeout)
        threading.Thread(target=self.connections.run_reaper, name="http-reaper",
                         daemon=True).start()  # fmt: skip
        self.tls = TLSContext(web.tls) if web and web.tls else None
        self.basic_auth = BasicAuth(web.users) if web and web.users else None
        self.headers = dict(web.headers) if web else {}
        # Requests in flight at once (0: unlimited); beyond it a client gets 503 at once.
        self._slots = threading.BoundedSemaphore(max_requests) if max_requests > 0 else None
        self._dual_stack = host == "" and socket.has_dualstack_ipv6()
        if self._dual_stack or ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(("::" if self._dual_stack else host, port), _Handler)

    def server_bind(self) -> None:
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def acquire_slot(self) -> bool:
        return self._slots is None or self._slots.acquire(blocking=False)

    def release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        # In the accepting thread: register before the connection's thread exists, so the
        # limit holds however fast connections arrive.
        if not self.connections.add(request, HANDSHAKE if self.tls else IDLE):
            with contextlib.suppress(OSError):
                request.sendall(_TOO_MANY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the connection's own thread: a slow TLS handshake holds that thread only, and
        # the header deadline bounds it.
        self.connections.bind(request)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(REQUEST_TIMEOUT_SECONDS)
        try:
            # Wrapping detaches the raw socket: track the TLS one before the handshake starts,
            # so that the header deadline can still cut a handshake that never ends.
            secure = self.tls.context().wrap_socket(request, server_side=True,
                                                    do_handshake_on_connect=False)  # fmt: skip
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake failed", extra={"fields": {"error": str(exc)}})
            return
        self.connections.rebind(request, secure)
        try:
            secure.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake failed", extra={"fields": {"error": str(exc)}})
            self._close_tls(secure)
            return
        self.connections.enter(IDLE)
        try:
            if self.tls.peer_allowed(secure):
                super().finish_request(secure, client_address)
            else:
                log.debug("client certificate names no allowed SAN")
        finally:
            self._close_tls(secure)

    def _close_tls(self, secure: ssl.SSLSocket) -> None:
        self.connections.remove(secure)
        with contextlib.suppress(OSError):
            secure.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; a client hanging up is routine, not an error.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("client connection lost", extra={"fields": {"error": str(exc)}})
        else:
            log.error("error handling connection", exc_info=exc)

    def shutdown_request(self, request: Any) -> None:
        self.connections.remove(request)
        with contextlib.suppress(OSError):
            super().shutdown_request(request)

    def server_close(self) -> None:
        self.connections.stop()
        super().server_close()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 28\r\nConnection: close\r\n\r\ntoo many requests in flight\n"
)
