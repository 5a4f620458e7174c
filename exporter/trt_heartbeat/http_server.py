"""The HTTP server: /metrics, /health, /ping, /probes and a landing page.

Each request runs in its own thread and only reads snapshots, so a wedged probe worker can never
hold a request. Only GET and HEAD are served.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import html
import json
import logging
import re
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


_MAX_LINE = 65536  # bytes in the request line or one header line
_MAX_HEADERS = 100
_METHODS_NOT_ALLOWED = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_VERSION = re.compile(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})")
_date = (0, "")  # (second, HTTP-date of it): formatting the date costs more than a cached read


def _http_date(now: float) -> str:
    global _date
    second = int(now)
    if _date[0] != second:
        _date = (second, email.utils.formatdate(second, usegmt=True))
    return _date[1]


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests, read and answered without the standard library's per-request
    parsing (`email.parser` for headers): a scrape is a GET with a few headers, and under
    concurrent scrapers that parsing was a third of the CPU a scrape cost."""

    server: ExporterHTTPServer
    timeout = REQUEST_TIMEOUT_SECONDS
    protocol_version = "HTTP/1.1"
    # Each answer goes out in one write, but a keep-alive client's delayed ACK must not wait on
    # Nagle either.
    disable_nagle_algorithm = True
    server_version = f"trt-heartbeat-exporter/{__version__}"
    fields: dict[str, str]  # the request's headers: lower-case name -> first value
    _slot = False  # this request holds one of the server's request slots

    def handle_one_request(self) -> None:
        # Idle (keep-alive, or a fresh connection): wait for the first byte of a request under
        # the idle timeout; from then on the header deadline runs. A request whose headers are
        # complete takes a slot (--web.max-requests) until its answer is written.
        self.close_connection = True
        try:
            if not self.rfile.peek(1):  # type: ignore[attr-defined]
                return
        except (TimeoutError, OSError):
            return
        self._slot = False
        self.server.connections.enter(HEADERS)
        try:
            self._serve_request()
        except TimeoutError:
            self.close_connection = True
        finally:
            if self._slot:
                self.server.release_slot()
                self._slot = False
            self.server.connections.enter(IDLE)

    def _serve_request(self) -> None:
        self.command, self.path, self.requestline = "", "", ""
        self.request_version = "HTTP/1.0"  # until the request line says otherwise
        try:
            if not self._read_request():
                return  # the client hung up before its request was complete
        except _BadRequest as bad:
            self.send_error(bad.status, str(bad))
            return
        # A cut connection (header deadline, connection limit) answers nothing, spends no slot
        # and no rendering.
        if not self.server.connections.enter(BUSY):
            self.close_connection = True
            return
        if not self.server.acquire_slot():
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.write(_TOO_MANY)
            return
        self._slot = True
        if self.command in ("GET", "HEAD"):
            self._dispatch(head=self.command == "HEAD")
        elif self.command in _METHODS_NOT_ALLOWED:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain",
                       extra={"Allow": "GET, HEAD"})  # fmt: skip
        else:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {self.command!r}")

    def _read_request(self) -> bool:
        """Read the request line and headers; False at EOF before they are complete."""
        line = self._line(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
        if line is None:
            return False
        self.requestline = line = line.rstrip("\r\n")
        words = line.split()
        http09 = len(words) == 2 and words[0] == "GET"  # answered as HTTP/1.0, then closed
        if http09:
            words.append("HTTP/1.0")
        if len(words) != 3:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad request line")
        self.command, self.path, version = words
        # ASCII digits only: str.isdigit() takes "²", which int() then refuses.
        number = _VERSION.fullmatch(version)
        if number is None:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad HTTP version")
        major, minor = int(number[1]), int(number[2])
        if major >= 2:
            raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/2 is not served here")
        self.request_version = version
        if self.path.startswith("//"):  # "//host/x" reads as a host to some clients
            self.path = "/" + self.path.lstrip("/")
        fields: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            line = self._line(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long")
            if line is None:
                return False
            if line in ("\r\n", "\n"):
                break
            name, colon, value = line.partition(":")
            # No name, whitespace in or around it, or a folded continuation line: RFC 9112
            # lets a server reject these, and guessing what the client meant is how requests
            # get smuggled.
            if not colon or not name or name != name.strip() or " " in name or "\t" in name:
                raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad header line")
            fields.setdefault(name.lower(), value.strip(" \t\r\n"))
        else:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        self.fields = fields
        connection = fields.get("connection", "").lower()
        keep_alive = (major, minor) >= (1, 1) or connection == "keep-alive"
        # Nothing here reads a request body: after a request that has one, the connection
        # closes rather than read the body as the next request.
        has_body = fields.get("content-length", "0") != "0" or "transfer-encoding" in fields
        self.close_connection = http09 or not keep_alive or connection == "close" or has_body
        return True

    def _line(self, too_long: HTTPStatus, detail: str) -> str | None:
        """The next line with its line break; None at EOF before one."""
        raw = self.rfile.readline(_MAX_LINE + 1)
        if raw.endswith(b"\n"):
            return raw.decode("iso-8859-1")
        if len(raw) > _MAX_LINE:
            raise _BadRequest(too_long, detail)
        return None

    def _authorized(self) -> bool:
        auth = self.server.basic_auth
        if auth is None:
            return True
        scheme, _, encoded = self.fields.get("authorization", "").partition(" ")
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
                gzipped = "gzip" in self.fields.get("accept-encoding", "")
                body, content_type = app.render_metrics(self.fields.get("accept"), gzipped)
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
        lines = [
            f"{self.protocol_version} {status.value} {status.phrase}",
            f"Server: {self.server_version}",
            f"Date: {_http_date(time.time())}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
        ]
        if gzipped:
            lines.append("Content-Encoding: gzip")
        fields = {**self.server.headers, **extra} if extra else self.server.headers
        lines += [f"{key}: {value}" for key, value in fields.items()]
        if self.close_connection:
            lines.append("Connection: close")
        lines.append("\r\n")
        # One write (one system call, one GIL hand-off) for the head and the body.
        self.wfile.write("\r\n".join(lines).encode("latin-1") + (b"" if head else body))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(f'"{self.requestline}" {status.value} {len(body)}')

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Plain-text errors that never echo the request (the stdlib page quotes it)."""
        status = HTTPStatus(code)
        self.close_connection = True
        if message:
            log.debug("bad request", extra={"fields": {"status": code, "error": message}})
        body = f"{status.value} {status.phrase}\n".encode()
        with contextlib.suppress(OSError):
            self._send(status, body, "text/plain", head=self.command == "HEAD")

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
