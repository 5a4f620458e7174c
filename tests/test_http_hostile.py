"""Hostile HTTP clients (issue #25): framing, bounds and deadlines, on a real server on loopback.

Every test asserts behaviour (answers, statuses, what a normal client gets while an attack runs),
never timing.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest
import yaml

from conftest import wait_for
from trt_heartbeat.exporter.web import config as web_config
from trt_heartbeat.exporter.web import server as http_server
from trt_heartbeat.exporter.web.server import MAX_REQUEST_HEAD, ExporterHTTPServer

THEN_PING = b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture
def no_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The test's requests log nothing at ERROR (no traceback) from the HTTP server."""
    caplog.set_level(logging.DEBUG, logger="trt_heartbeat.http")
    yield
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name == "trt_heartbeat.http" and r.levelno >= logging.ERROR
    ]
    assert errors == []


def exchange(server: ExporterHTTPServer, request: bytes) -> bytes:
    """Send `request` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(request)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                reply += chunk
    return reply


def statuses(reply: bytes) -> list[str]:
    return [s.decode() for s in re.findall(rb"^HTTP/1\.1 (\d{3}) ", reply, re.MULTILINE)]


def get(server: ExporterHTTPServer, path: str) -> bytes:
    return exchange(server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


# --- (2) clients that never read ---------------------------------------------------------------

PIPELINED = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 150


def stuck(server: ExporterHTTPServer) -> int:
    """Connections whose answer waits on its client (or, before #25, held a slot meanwhile)."""
    count = server.connections.count()
    return count.get("write", 0) + count.get("busy", 0)


def test_clients_that_never_read_lock_no_endpoint_out(
    serve: Callable[..., ExporterHTTPServer], no_errors: None, capfd: pytest.CaptureFixture[str]
) -> None:
    # Forty (= the request slots) connections pipeline 150 scrapes each on a tiny receive window
    # and never read: each answer's write stalls.
    server = serve(max_requests=40, write_timeout=3.0)
    attackers = []
    for _ in range(40):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.settimeout(10)
        s.connect(("127.0.0.1", server.port))
        s.sendall(PIPELINED)
        attackers.append(s)
    try:
        wait_for(lambda: stuck(server) == 40, what="40 answers stalled on their clients")
        # Liveness and Prometheus are answered while every stalled answer waits.
        assert statuses(get(server, "/ping")) == ["200"]
        assert statuses(get(server, "/metrics")) == ["200"]
        # At the write deadline each stalled connection is closed: nothing more is written on
        # it (no 500 after the stall), and what it did get are whole answers.
        received = []
        for s in attackers:
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    data += chunk
            received.append(statuses(data))
        # 503: the forty raced for the forty slots with this test's own requests.
        assert all(set(answers) <= {"200", "503"} for answers in received), received
        wait_for(lambda: stuck(server) == 0, what="no connection left stalled")
    finally:
        for s in attackers:
            s.close()
    assert statuses(get(server, "/metrics")) == ["200"]
    err = capfd.readouterr().err
    assert "Traceback" not in err


def test_an_answer_waiting_on_its_client_holds_no_request_slot(
    serve: Callable[..., ExporterHTTPServer], no_errors: None
) -> None:
    server = serve(max_requests=1, write_timeout=30.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", server.port))
        s.sendall(PIPELINED)
        wait_for(lambda: stuck(server) == 1, what="the answer stalled")
        assert statuses(get(server, "/ping")) == ["200"]  # the one slot is free


# --- (3) the request head is bounded as a whole ---------------------------------------------------

KIB_HEADERS = "".join(f"X-{i}: {'y' * 1020}\r\n" for i in range(40)).encode()  # 40 KiB, 40 lines


def test_the_whole_request_head_is_bounded(
    serve: Callable[..., ExporterHTTPServer], no_errors: None
) -> None:
    assert MAX_REQUEST_HEAD <= 64 * 1024
    server = serve(header_timeout=60.0)  # no cut at the deadline can pass for a refusal
    # Each line is short and they are few, but together past the bound: 431, closed.
    reply = exchange(
        server, b"GET /ping HTTP/1.1\r\nHost: x\r\n" + KIB_HEADERS + b"\r\n" + THEN_PING
    )
    assert statuses(reply) == ["431"] and b"\r\nConnection: close\r\n" in reply
    # An unfinished head is refused as soon as it passes the bound, not held until it ends:
    # what one connection makes the server keep is bounded by MAX_REQUEST_HEAD.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n" + KIB_HEADERS)  # and never a blank line
        assert s.recv(65536).startswith(b"HTTP/1.1 431 ")
    # Under the bound is served.
    small = b"".join(KIB_HEADERS.splitlines(keepends=True)[: MAX_REQUEST_HEAD // 2 // 1030])
    assert statuses(
        exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n" + small + b"\r\n" + THEN_PING)
    ) == ["200", "200"]


# --- (4) malformed targets ---------------------------------------------------------------------


@pytest.fixture
def with_auth(tmp_path: Path) -> web_config.WebConfig:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": hashed}}))
    return web_config.load(path)


@pytest.mark.parametrize(
    "target",
    [
        "http://[::1/x",  # urlsplit raises: used to be no answer and a traceback
        "http://[::1]:99999/x",  # port out of range
        "http://h:port/x",
        "http:///metrics",  # no host
        "ftp://h/metrics",
        "metrics",
        "*",  # asterisk-form is for OPTIONS only
        "h:443",  # authority-form is for CONNECT only
    ],
)
def test_a_malformed_target_is_400_before_auth(
    serve: Callable[..., ExporterHTTPServer],
    with_auth: web_config.WebConfig,
    no_errors: None,
    target: str,
) -> None:
    server = serve(with_auth)
    reply = exchange(server, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + THEN_PING)
    assert statuses(reply) == ["400"]
    assert target.encode() not in reply  # never echoed


def test_absolute_form_targets_are_served(
    serve: Callable[..., ExporterHTTPServer], no_errors: None
) -> None:
    server = serve()
    for target in ("http://x/ping", "http://[::1]:9/ping?a=b", "HTTPS://x//ping"):
        reply = exchange(server, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + THEN_PING)
        assert statuses(reply) == ["200", "200"], target


# --- (7) Content-Length ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        # The body (here a request of its own) used to be read as a second request: smuggling.
        b"Content-Length: 0\r\nContent-Length: 39\r\n",
        b"Content-Length: 39\r\nContent-Length: 0\r\n",
        b"Content-Length: 0, 39\r\n",
        b"Content-Length: abc\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: +39\r\n",
    ],
)
def test_differing_or_invalid_content_lengths_are_400(
    serve: Callable[..., ExporterHTTPServer], no_errors: None, fields: bytes
) -> None:
    server = serve()
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n" + smuggled)
    assert statuses(reply) == ["400"] and b"\r\nConnection: close\r\n" in reply


def test_identical_content_lengths_are_one(
    serve: Callable[..., ExporterHTTPServer], no_errors: None
) -> None:
    server = serve()
    fields = b"Content-Length: 0\r\nContent-Length: 0\r\n"
    reply = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n" + THEN_PING)
    assert statuses(reply) == ["200", "200"]


# --- (9) HEAD answered 401 ---------------------------------------------------------------------


def test_head_answered_401_sends_no_body(
    serve: Callable[..., ExporterHTTPServer], with_auth: web_config.WebConfig, no_errors: None
) -> None:
    server = serve(with_auth)
    reply = exchange(server, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n" + THEN_PING)
    assert statuses(reply) == ["401", "401"]
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 13\r\n" in first  # what a GET would carry
    assert rest.startswith(b"HTTP/1.1 401 ")  # the next answer follows at once: no body


# --- (10) strict request lines and header values -------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /ping HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",  # bare CR in a value
        b"GET /ping HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",  # NUL in a value
        b"GET /ping HTTP/1.1\r\nHost: x\r\nX\x00: a\r\n\r\n",  # NUL in a name
        b"GET\xa0/ping HTTP/1.1\r\nHost: x\r\n\r\n",  # NBSP is not SP
        b"GET\x0b/ping HTTP/1.1\r\nHost: x\r\n\r\n",  # nor VT
        b"GET /ping\x85HTTP/1.1\r\nHost: x\r\n\r\n",  # nor NEL
        b"GET\t/ping HTTP/1.1\r\nHost: x\r\n\r\n",  # nor HTAB
        b"GET  /ping HTTP/1.1\r\nHost: x\r\n\r\n",  # one SP, not two
        b"GET /ping  HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ping HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /ping HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",  # two Hosts
        b"GET /ping HTTP/1.1\r\nHost: x\r\nHOST: x\r\n\r\n",
        b"GET /p\xe9 HTTP/1.1\r\nHost: x\r\n\r\n",  # a target is ASCII
    ],
)
def test_request_lines_and_headers_are_strict(
    serve: Callable[..., ExporterHTTPServer], no_errors: None, request_bytes: bytes
) -> None:
    server = serve()
    reply = exchange(server, request_bytes + THEN_PING)
    assert statuses(reply) == ["400"] and b"\r\nConnection: close\r\n" in reply


def test_http_1_0_needs_no_host(serve: Callable[..., ExporterHTTPServer], no_errors: None) -> None:
    assert statuses(exchange(serve(), b"GET /ping HTTP/1.0\r\n\r\n")) == ["200"]


# --- (11) Accept-Encoding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("gzip;q=0.5", True),
        ("deflate, gzip ; q=1.0", True),
        ("x-gzip", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("nogzip", False),
        ("gzipped", False),
        ("identity", False),
        ("identity, *;q=0", False),
        ("*, gzip;q=0", False),
        ("gzip;q=2", False),  # not a q-value: read as a refusal
    ],
)
def test_accept_encoding_is_parsed(
    serve: Callable[..., ExporterHTTPServer], accept_encoding: str, gzipped: bool
) -> None:
    server = serve()
    fields = f"Host: x\r\nAccept-Encoding: {accept_encoding}\r\nConnection: close\r\n"
    reply = exchange(server, f"GET /metrics HTTP/1.1\r\n{fields}\r\n".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert (b"Content-Encoding: gzip" in head.split(b"\r\n")) is gzipped
    assert (gzip.decompress(body) if gzipped else body).startswith(b"# HELP ")


# --- (13) Connection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "answers", "connection"),
    [
        (
            b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close, TE\r\nTE: trailers\r\n\r\n",
            ["200"],
            b"close",
        ),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: TE,Close\r\n\r\n", ["200"], b"close"),
        (
            b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: TE\r\nConnection: close\r\n\r\n",
            ["200"],
            b"close",
        ),
        (b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", ["200", "200"], b"keep-alive"),
        (
            b"GET /ping HTTP/1.0\r\nConnection: Keep-Alive, TE\r\n\r\n",
            ["200", "200"],
            b"keep-alive",
        ),
        (b"GET /ping HTTP/1.0\r\n\r\n", ["200"], b"close"),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: TE\r\n\r\n", ["200", "200"], None),
    ],
)
def test_connection_lists_and_http_1_0_keep_alive(
    serve: Callable[..., ExporterHTTPServer],
    no_errors: None,
    request_bytes: bytes,
    answers: list[str],
    connection: bytes | None,
) -> None:
    reply = exchange(serve(), request_bytes + THEN_PING)
    assert statuses(reply) == answers
    first = reply.partition(b"\r\n\r\n")[0].split(b"\r\n")
    said = [line.partition(b": ")[2] for line in first if line.startswith(b"Connection: ")]
    assert said == ([connection] if connection else [])


# --- methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW", "get"]
)
def test_every_method_but_get_and_head_is_405_with_allow(
    serve: Callable[..., ExporterHTTPServer], no_errors: None, method: str
) -> None:
    reply = exchange(serve(), f"{method} /metrics HTTP/1.1\r\nHost: x\r\n\r\n".encode() + THEN_PING)
    assert statuses(reply) == ["405", "200"]
    assert b"\r\nAllow: GET, HEAD\r\n" in reply.partition(b"\r\n\r\n")[0] + b"\r\n"


def test_options_asterisk_is_405(serve: Callable[..., ExporterHTTPServer], no_errors: None) -> None:
    reply = exchange(serve(), b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n" + THEN_PING)
    assert statuses(reply) == ["405", "200"]


# --- the parsed-head cache ---------------------------------------------------------------------


def test_parsed_heads_kept_are_few_and_hold_no_credentials(
    serve: Callable[..., ExporterHTTPServer], no_errors: None
) -> None:
    server = serve()
    distinct = b"".join(
        f"GET /ping HTTP/1.1\r\nHost: x\r\nX-N: {i}\r\n\r\n".encode() for i in range(300)
    )
    credentials = b"GET /ping HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eDp5\r\n\r\n"
    reply = exchange(server, distinct + credentials + THEN_PING)
    assert statuses(reply) == ["200"] * 302
    assert 0 < len(http_server._PARSED) <= http_server._PARSED_SIZE
    assert not any(b"authorization" in key.lower() for key in http_server._PARSED)


def test_a_head_seen_before_is_answered_as_the_first_time(
    serve: Callable[..., ExporterHTTPServer], no_errors: None
) -> None:
    server = serve()
    keep_alive = b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    for _ in range(3):  # parsed by h11 once, then looked up
        reply = exchange(server, keep_alive * 3 + b"GET /ping HTTP/1.0\r\n\r\n")
        assert statuses(reply) == ["200"] * 4
        assert reply.count(b"\r\nConnection: keep-alive\r\n") == 3
    head = b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = exchange(server, head * 3 + THEN_PING)
    assert statuses(reply) == ["200"] * 4 and b"# HELP" not in reply
    bad = b"GET /ping HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n"
    assert statuses(exchange(server, head + bad + THEN_PING)) == ["200", "400"]
