"""The HTTP transport that serves the routes (`routes`): /metrics, /health, /ping, /probes.

Each connection runs in its own thread and only reads snapshots, so a wedged probe worker can never
hold a request. Requests are framed by h11; only GET and HEAD are served (any other method: 405).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import logging
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11

from trt_heartbeat import __version__
from trt_heartbeat.exporter.web.config import BasicAuth, TLSContext, WebConfig
from trt_heartbeat.exporter.web.routes import Reply

log = logging.getLogger("trt_heartbeat.http")

REQUEST_TIMEOUT_SECONDS = 10.0  # a client that sends nothing for this long is dropped
# Once a request has begun (or a TLS handshake), its headers must be complete within this: a
# client dribbling bytes (slowloris) cannot hold a connection longer.
HEADER_TIMEOUT_SECONDS = 5.0
# Open connections at once, idle and half-open included; past it the oldest idle one is dropped.
MAX_CONNECTIONS = 1024
# A request that finds every slot taken waits this long for one before its 503: a burst of
# requests (many clients at the same instant) costs the scraper a few milliseconds, not a
# failed scrape. Waiting holds a connection and a thread, which the connection cap bounds.
SLOT_WAIT_SECONDS = 0.25


class Router(Protocol):
    """What the transport asks of the application: the answer to a GET of `path`."""

    def answer(self, path: str, accept: str | None, gzip: bool) -> Reply: ...


# The request head (request line and every header) is read whole before anything is decided and
# is bounded as a whole: past this, 431 (414 while the request line is not even complete). One
# unfinished connection holds at most this much plus one read, twice (ours and h11's buffer).
MAX_REQUEST_HEAD = 16 * 1024
_RECV_SIZE = 4096
_MAX_HEADERS = 100
# An answer must be written within this, whatever the client's receive window: past it the
# connection is closed and nothing more is written on it. It is separate from the idle timeout.
WRITE_TIMEOUT_SECONDS = 5.0
_ALLOW = {"Allow": "GET, HEAD"}
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


_FOLDED = re.compile(rb"\n[ \t]")  # a header line continued on the next (obs-fold)
_Q_VALUE = re.compile(rb"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


def _wants_gzip(accept_encoding: bytes) -> bool:
    """Whether an Accept-Encoding field value (RFC 9110 §12.5.3) takes gzip: a coding token with
    an optional q-value; `gzip;q=0` refuses it, `*` stands for codings not named."""
    if accept_encoding == b"gzip":  # what Prometheus sends
        return True
    star = False
    for item in accept_encoding.split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip(b" \t").lower()
        weight = True
        for param in params.split(b";") if params else ():
            name, _, value = param.partition(b"=")
            if name.strip(b" \t").lower() == b"q":
                value = value.strip(b" \t")
                # An unreadable q-value is read as a refusal: identity always works.
                weight = _Q_VALUE.fullmatch(value) is not None and float(value) > 0
        if coding in (b"gzip", b"x-gzip"):
            return weight
        if coding == b"*":
            star = weight
    return star


def _request_path(method: str, target: str) -> str | None:
    """The path a request target names (RFC 9112 §3.2), None if the target is malformed."""
    if target.startswith("/"):  # origin-form
        if target.startswith("//"):  # "//host/x" reads as a host to some clients
            target = "/" + target.lstrip("/")
        return target.partition("?")[0].partition("#")[0]
    scheme, sep, _ = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):  # absolute-form
        try:
            parts = urlsplit(target)
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError:
            return None
        if not parts.hostname:
            return None
        path = parts.path or "/"
        return "/" + path.lstrip("/") if path.startswith("//") else path
    if target == "*" and method == "OPTIONS":  # asterisk-form: only OPTIONS, answered 405
        return target
    return None


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    path: str
    head: bool
    fields: dict[bytes, bytes]  # lower-case name -> first value
    accept_encoding: bytes  # every Accept-Encoding value, joined
    close: bool  # the connection closes after the answer
    keep_alive: bool  # an HTTP/1.0 keep-alive to confirm
    head_bytes: bytes  # the request line and headers as received


# Parsed heads by their bytes: few and small, so that varying heads cannot grow it. A head that
# carries credentials is never kept.
_PARSED: dict[bytes, _Request] = {}
_PARSED_SIZE = 64
_PARSED_HEAD_MAX = 2048
_parsed_lock = threading.Lock()


def _remember(request: _Request) -> None:
    key = request.head_bytes
    if (
        len(key) > _PARSED_HEAD_MAX
        or not key.endswith(b"\r\n\r\n")
        or b"authorization" in request.fields
    ):
        return
    with _parsed_lock:
        while len(_PARSED) >= _PARSED_SIZE:
            del _PARSED[next(iter(_PARSED))]  # the oldest
        _PARSED[key] = request


class _Handler(socketserver.BaseRequestHandler):
    """One connection's requests, framed by h11 (a strict HTTP/1.1 parser) and answered one at a
    time, each in one write under the write deadline.

    A request's head is parsed only once it is complete; nothing is read past it while its answer
    is unsent, so a connection pipelining requests holds one request and one read of bytes at
    most. A request slot is held while a request is checked and rendered, never while its answer
    waits on the client's receive window.
    """

    server: ExporterHTTPServer
    request: socket.socket
    protocol_version = "HTTP/1.1"
    server_version = f"trt-heartbeat-exporter/{__version__}"

    def setup(self) -> None:
        self._buffer = b""  # bytes read but not yet parsed (pipelined requests)
        self._timeout = REQUEST_TIMEOUT_SECONDS
        self.request.settimeout(self._timeout)
        # Each answer goes out in one write, but a keep-alive client's delayed ACK must not wait
        # on Nagle either.
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        connections = self.server.connections
        while True:
            # Idle (keep-alive, or a fresh connection): wait for the first byte of a request
            # under the idle timeout; from then on the header deadline runs.
            if not self._buffer:
                self._buffer = self._recv(REQUEST_TIMEOUT_SECONDS)
                if not self._buffer:
                    return
            connections.enter(HEADERS)
            if not self._serve_one():
                return
            connections.enter(IDLE)

    def _recv(self, timeout: float) -> bytes:
        """Up to one read of request bytes; b"" at EOF, on a timeout or when the connection was
        cut."""
        try:
            if self._timeout != timeout:
                self.request.settimeout(timeout)
                self._timeout = timeout
            return self.request.recv(_RECV_SIZE)
        except OSError:
            return b""

    def _serve_one(self) -> bool:
        """Read, check and answer one request; False when the connection is to close."""
        try:
            request = self._read_request()
        except _BadRequest as bad:
            log.debug(
                "bad request", extra={"fields": {"status": bad.status.value, "error": str(bad)}}
            )
            self._write(self._error(bad.status))
            return False
        if request is None:
            return False  # the client hung up, or was cut, before its request was complete
        # A cut connection (header deadline, connection limit) answers nothing, spends no slot
        # and no rendering.
        if not self.server.connections.enter(BUSY):
            return False
        if not self.server.acquire_slot():
            self._write(_TOO_MANY)
            return False
        try:
            answer = self._respond(request)
        finally:
            self.server.release_slot()  # before the write: a client that never reads holds none
        return self._write(answer) and not self._current_close

    def _read_request(self) -> _Request | None:
        """The next request's head, once complete; None at EOF before it is."""
        # A scraper sends the same head every time: its parse is looked up by the exact bytes,
        # which h11 parsed and accepted before (the same bytes always parse the same).
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n") + 4
        if 4 < end <= _PARSED_HEAD_MAX:
            parsed = _PARSED.get(buffer[:end])
            if parsed is not None:
                self._buffer = buffer[end:]
                return parsed
        request = self._parse_request()
        if request is not None:
            _remember(request)
        return request

    def _parse_request(self) -> _Request | None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        received = self._buffer
        parser.receive_data(received)
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                status = HTTPStatus(exc.error_status_hint)
                if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE and b"\n" not in received:
                    status = HTTPStatus.REQUEST_URI_TOO_LONG
                raise _BadRequest(status, str(exc)) from None
            if event is not h11.NEED_DATA:
                break
            more = self._recv(REQUEST_TIMEOUT_SECONDS)
            if not more:
                return None
            received += more
            parser.receive_data(more)
        assert isinstance(event, h11.Request)
        self._buffer = rest = parser.trailing_data[0]
        head = memoryview(received)[: len(received) - len(rest)]
        if len(head) > MAX_REQUEST_HEAD:  # it came complete in one read
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        # h11 unfolds obsolete line folding; guessing what a folded header meant is how
        # requests get smuggled, so it is refused (RFC 9112 §5.2 allows either).
        if _FOLDED.search(head):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "obsolete line folding")
        version = event.http_version
        if not version.startswith(b"1."):
            raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.x is served")
        if len(event.headers) > _MAX_HEADERS:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        method, target = event.method.decode("ascii"), event.target.decode("ascii")
        path = _request_path(method, target)
        if path is None:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed request target")
        fields: dict[bytes, bytes] = {}
        connection: list[bytes] = []
        encodings: list[bytes] = []
        for name, value in event.headers:
            fields.setdefault(name, value)
            if name == b"connection":
                connection += (token.strip(b" \t").lower() for token in value.split(b","))
            elif name == b"accept-encoding":
                encodings.append(value)
        if version == b"1.0":
            keep_alive = b"keep-alive" in connection and b"close" not in connection
        else:
            keep_alive = b"close" not in connection
        # Nothing here reads a request body: after a request that has one, the connection
        # closes rather than read the body as the next request.
        has_body = fields.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in fields
        close = not keep_alive or has_body
        return _Request(
            method,
            target,
            path,
            method == "HEAD",
            fields,
            b",".join(encodings),
            close,
            keep_alive=not close and version == b"1.0",
            head_bytes=bytes(head),
        )

    def _respond(self, request: _Request) -> bytes:
        """The whole answer to a request, head and body."""
        self._current, self._current_close = request, request.close
        if request.method not in ("GET", "HEAD"):
            return self._answer(
                HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain", extra=_ALLOW
            )
        path, head = request.path, request.head
        if not self._authorized(request):
            return self._answer(
                HTTPStatus.UNAUTHORIZED, b"unauthorized\n", "text/plain", head, extra=_CHALLENGE
            )
        try:
            accept = request.fields.get(b"accept")
            reply = self.server.routes.answer(
                path,
                None if accept is None else accept.decode("latin-1"),
                _wants_gzip(request.accept_encoding),
            )
            return self._answer(
                reply.status, reply.body, reply.content_type, head, gzipped=reply.gzipped
            )
        except Exception:
            log.exception("error serving request", extra={"fields": {"path": path}})
            self._current_close = True
            return self._answer(
                HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain", head
            )

    def _authorized(self, request: _Request) -> bool:
        auth = self.server.basic_auth
        if auth is None:
            return True
        credentials = request.fields.get(b"authorization", b"").decode("latin-1")
        scheme, _, encoded = credentials.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user = password = ""
            if user and auth.check(user, password):
                return True
        return False

    def _answer(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        head: bool = False,
        gzipped: bool = False,
        extra: dict[str, str] | None = None,
    ) -> bytes:
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
        request = self._current
        if request is None or self._current_close:
            lines.append("Connection: close")
        elif request.keep_alive:
            lines.append("Connection: keep-alive")
        lines.append("\r\n")
        if log.isEnabledFor(logging.DEBUG) and request is not None:
            log.debug(f'"{request.method} {request.target}" {status.value} {len(body)}')
        # One write (one system call, one GIL hand-off) for the head and the body.
        return "\r\n".join(lines).encode("latin-1") + (b"" if head else body)

    _current: _Request | None = None
    _current_close = True

    def _error(self, status: HTTPStatus) -> bytes:
        """Plain-text errors that never echo the request; the connection closes after them."""
        self._current = None
        return self._answer(status, f"{status.value} {status.phrase}\n".encode(), "text/plain")

    def _write(self, data: bytes) -> bool:
        """Write a whole answer within the write deadline; False if it could not be (the
        connection is then closed and nothing more is written on it)."""
        sock, limit = self.request, self.server.write_timeout
        deadline = time.monotonic() + limit
        try:
            if self._timeout != limit:
                sock.settimeout(limit)
                self._timeout = limit
            sent = sock.send(data)
            if sent == len(data):
                return True
            # The client's receive window is full: the rest goes out under the deadline, and
            # the connection can be cut (connection limit, reaper) while it waits.
            self.server.connections.enter(WRITE)
            view = memoryview(data)[sent:]
            while view:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("write deadline")
                sock.settimeout(left)
                self._timeout = left
                view = view[sock.send(view) :]
            return True
        except OSError as exc:
            log.debug(
                "answer not written; closing",
                extra={"fields": {"error": str(exc) or type(exc).__name__}},
            )
            return False


_CHALLENGE = {"WWW-Authenticate": 'Basic realm="trt-heartbeat-exporter"'}


HANDSHAKE, HEADERS, IDLE, BUSY, WRITE = "handshake", "headers", "idle", "busy", "write"


@dataclass
class _Connection:
    sock: socket.socket
    phase: str
    since: float


class Connections:
    """Every open connection and what it is doing, so that slow or idle ones can be bounded.

    A reaper thread closes connections that spent longer than the header deadline in a TLS
    handshake or in their request headers, or longer than the write deadline waiting for a client
    to take its answer (WRITE); past `limit` open connections, a new one makes room by closing
    the oldest idle, then the oldest unfinished one, then the oldest waiting on its client.
    Requests being answered (BUSY) are never dropped: they are bounded by the request slots.
    """

    def __init__(
        self,
        limit: int,
        header_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
    ) -> None:
        self.limit, self.header_timeout, self.clock = limit, header_timeout, clock
        self.write_timeout = write_timeout
        self._open: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._stop = threading.Event()
        self.dropped = 0

    def add(self, sock: socket.socket, phase: str) -> bool:
        """Register a new connection; False if no room could be made."""
        with self._lock:
            if len(self._open) >= self.limit:
                victim = (
                    self._oldest(IDLE)
                    or self._oldest(HEADERS)
                    or self._oldest(HANDSHAKE)
                    or self._oldest(WRITE)
                )
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
            out = dict.fromkeys((HANDSHAKE, HEADERS, IDLE, BUSY, WRITE), 0)
            for conn in self._open.values():
                out[conn.phase] += 1
            return out

    def reap(self) -> None:
        with self._lock:
            now = self.clock()
            late = [
                c
                for c in self._open.values()
                if c.phase in (HANDSHAKE, HEADERS) and now - c.since > self.header_timeout
            ]
            for conn in late:
                self._drop(conn, "header deadline")
            stuck = [
                c
                for c in self._open.values()
                if c.phase == WRITE and now - c.since > self.write_timeout
            ]
            for conn in stuck:
                self._drop(conn, "write deadline")

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
        routes: Router,
        web: WebConfig | None = None,
        max_requests: int = 40,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
        slot_wait: float = SLOT_WAIT_SECONDS,
    ) -> None:
        self.routes = routes
        self.write_timeout = write_timeout
        self.connections = Connections(max_connections, header_timeout, write_timeout=write_timeout)
        threading.Thread(
            target=self.connections.run_reaper, name="http-reaper", daemon=True
        ).start()
        self.tls = TLSContext(web.tls) if web and web.tls else None
        self.basic_auth = BasicAuth(web.users) if web and web.users else None
        self.headers = dict(web.headers) if web else {}
        # Requests in flight at once (0: unlimited); beyond it a client waits `slot_wait` for
        # one, then gets 503.
        self._slots = threading.BoundedSemaphore(max_requests) if max_requests > 0 else None
        self._slot_wait = slot_wait
        self._dual_stack = host == "" and socket.has_dualstack_ipv6()
        if self._dual_stack or ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(("::" if self._dual_stack else host, port), _Handler)

    def server_bind(self) -> None:
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def acquire_slot(self) -> bool:
        return self._slots is None or self._slots.acquire(timeout=self._slot_wait)

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
            secure = self.tls.context().wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
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

    def start_background(self, poll_interval: float = 0.5) -> threading.Thread:
        """Serve in a daemon thread; shutdown() returns within `poll_interval`."""
        thread = threading.Thread(
            target=self.serve_forever, args=(poll_interval,), name="http", daemon=True
        )
        thread.start()
        return thread


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 28\r\nConnection: close\r\n\r\ntoo many requests in flight\n"
)
