"""The HTTP server: /metrics, /health, /ping, /probes and a landing page.

Each request runs in its own thread and only reads snapshots, so a wedged probe worker can never
hold a request. Only GET and HEAD are served.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import html
import json
import logging
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from . import __version__
from .web_config import BasicAuth, TLSContext, WebConfig

log = logging.getLogger("trt_heartbeat.http")

REQUEST_TIMEOUT_SECONDS = 10.0  # a client that sends nothing for this long is dropped


class App(Protocol):
    @property
    def telemetry_path(self) -> str: ...

    def render_metrics(self, accept: str | None) -> tuple[bytes, str]: ...

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
                body, content_type = app.render_metrics(self.headers.get("Accept"))
                self._send(HTTPStatus.OK, body, content_type, head, compress=True)
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
        compress: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        if "charset" not in content_type and not content_type.startswith("application/json"):
            content_type += "; charset=utf-8"
        accept_encoding = self.headers.get("Accept-Encoding", "") if self.headers else ""
        encoded = compress and "gzip" in accept_encoding
        if encoded:
            body = gzip.compress(body, compresslevel=1)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if encoded:
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


class ExporterHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        host: str,
        port: int,
        app: App,
        web: WebConfig | None = None,
        max_requests: int = 40,
    ) -> None:
        self.app = app
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

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the request's own thread: a slow TLS handshake holds that thread only.
        if self._slots is not None and not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_TOO_MANY)
            return
        try:
            if self.tls is None:
                super().finish_request(request, client_address)
                return
            request.settimeout(REQUEST_TIMEOUT_SECONDS)
            try:
                secure = self.tls.context().wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake failed", extra={"fields": {"error": str(exc)}})
                return
            try:
                if self.tls.peer_allowed(secure):
                    super().finish_request(secure, client_address)
                else:
                    log.debug("client certificate names no allowed SAN")
            finally:
                with contextlib.suppress(OSError):
                    secure.close()
        finally:
            if self._slots is not None:
                self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; a client hanging up is routine, not an error.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("client connection lost", extra={"fields": {"error": str(exc)}})
        else:
            log.error("error handling connection", exc_info=exc)

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            super().shutdown_request(request)

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
