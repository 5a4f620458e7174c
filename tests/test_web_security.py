"""--web.config.file (TLS, client certificates, basic auth), --web.max-requests, and fuzzing of
configuration, flags and HTTP requests."""

from __future__ import annotations

import base64
import gzip
import http.client
import logging
import re
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require, wait_for
from trt_heartbeat.cli import main
from trt_heartbeat.errors import ConfigError
from trt_heartbeat.exporter import config
from trt_heartbeat.exporter.app import Exporter
from trt_heartbeat.exporter.web import config as web_config
from trt_heartbeat.exporter.web.server import HEADERS, IDLE, ExporterHTTPServer

PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")


def openssl(*args: str) -> None:
    subprocess.run([require("openssl"), *args], check=True, capture_output=True, timeout=60)


def issue(pki: Path, name: str, san: str, serial: int) -> None:
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(pki / f"{name}.key"),
        "-out",
        str(pki / f"{name}.csr"),
        "-subj",
        f"/CN={name}",
    )
    (pki / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(pki / f"{name}.csr"),
        "-CA",
        str(pki / "ca.crt"),
        "-CAkey",
        str(pki / "ca.key"),
        "-set_serial",
        str(serial),
        "-days",
        "2",
        "-extfile",
        str(pki / f"{name}.ext"),
        "-out",
        str(pki / f"{name}.crt"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(pki / "ca.key"),
        "-out",
        str(pki / "ca.crt"),
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    issue(pki, "server", "IP:127.0.0.1,DNS:localhost", 1001)
    issue(pki, "client", "DNS:prometheus", 2001)
    issue(pki, "stranger", "DNS:someone-else", 3001)
    return pki


def write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def tls(pki: Path, **extra: Any) -> dict[str, Any]:
    return {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key"), **extra}


# --- the configuration file ------------------------------------------------------------------


def valid_configs(pki: Path) -> dict[str, dict[str, Any]]:
    return {
        "basic-auth": {"basic_auth_users": {"prometheus": HASH}},
        "tls": {"tls_server_config": tls(pki)},
        "everything": {
            "tls_server_config": tls(
                pki,
                client_auth_type="RequireAndVerifyClientCert",
                client_ca_file=str(pki / "ca.crt"),
                min_version="TLS12",
                max_version="TLS13",
                cipher_suites=["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
                curve_preferences=["CurveP256"],
                prefer_server_cipher_suites=True,
            ),
            "http_server_config": {
                "http2": True,
                "headers": {
                    "X-Content-Type-Options": "nosniff",
                    "Strict-Transport-Security": "max-age=3600",
                },
            },
            "basic_auth_users": {"prometheus": HASH},
        },
    }


@pytest.mark.parametrize("name", ["basic-auth", "tls", "everything"])
def test_files_promtool_accepts_are_accepted(pki: Path, tmp_path: Path, name: str) -> None:
    path = write(tmp_path, valid_configs(pki)[name])
    check = subprocess.run(
        [require("promtool"), "check", "web-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    web_config.load(path)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"tls_config": {}},
            "tls_config: unknown key (expected one of: basic_auth_users, "
            "http_server_config, tls_server_config)",
        ),
        (
            {"tls_server_config": {"cert_file": "x"}},
            "tls_server_config: cert_file and key_file are both required",
        ),
        (
            {"tls_server_config": {"cert_file": "/nope.crt", "key_file": "/nope.key"}},
            "tls_server_config.cert_file: file not found: /nope.crt",
        ),
        ({"tls_server_config": {"certfile": "x"}}, "tls_server_config.certfile: unknown key"),
        (
            "TLS:min_version=TLS14",
            "tls_server_config.min_version: expected one of TLS10, TLS11, "
            "TLS12, TLS13, got 'TLS14'",
        ),
        (
            "TLS:min_version=TLS13,max_version=TLS12",
            "tls_server_config.min_version: is above max_version",
        ),
        (
            "TLS:client_auth_type=Always",
            "tls_server_config.client_auth_type: expected one of "
            "NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, "
            "RequireAndVerifyClientCert, got 'Always'",
        ),
        (
            "TLS:client_auth_type=RequireAndVerifyClientCert",
            "tls_server_config.client_ca_file: "
            "required with client_auth_type RequireAndVerifyClientCert",
        ),
        (
            "TLS:cipher_suites=TLS_RSA_WITH_RC4_128_SHA",
            "tls_server_config.cipher_suites: unsupported 'TLS_RSA_WITH_RC4_128_SHA'",
        ),
        (
            {"basic_auth_users": {"prometheus": "plaintext"}},
            "basic_auth_users.prometheus: expected a bcrypt hash ($2y$...)",
        ),
        (
            {"http_server_config": {"headers": {"Server": "x"}}},
            "http_server_config.headers.Server: unknown key",
        ),
        (
            {"http_server_config": {"headers": {"X-Frame-Options": "deny\r\nSet-Cookie: a=b"}}},
            "http_server_config.headers.X-Frame-Options: expected printable ASCII (no line breaks)",
        ),
        (
            {"http_server_config": {"headers": {"Content-Security-Policy": "default-src ☃"}}},
            "http_server_config.headers.Content-Security-Policy: expected printable ASCII",
        ),
    ],
)
def test_invalid_web_configs(pki: Path, tmp_path: Path, document: Any, message: str) -> None:
    if isinstance(document, str):  # "TLS:key=value,...": valid cert files plus these keys
        pairs = dict(item.split("=") for item in document.removeprefix("TLS:").split(","))
        document = {
            "tls_server_config": tls(
                pki, **{k: [v] if k == "cipher_suites" else v for k, v in pairs.items()}
            )
        }
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as info:
        web_config.load(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_bad_web_config_stops_serve_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, {"basic_auth_users": {"x": "nope"}})
    with pytest.raises(SystemExit) as info:
        main(["serve", "--web.config.file", str(path), "--backend", "reference"])
    assert info.value.code == 2


# --- serving -----------------------------------------------------------------------------------


def https(
    server: ExporterHTTPServer,
    pki: Path,
    path: str = "/metrics",
    user: str | None = None,
    password: str = "",
    client: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client:
        ctx.load_cert_chain(pki / f"{client}.crt", pki / f"{client}.key")
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=5)
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    cert = conn.sock.getpeercert() if conn.sock else None
    conn.close()
    return response.status, dict(response.getheaders()), (body, cert)


def test_tls_and_basic_auth(
    serve: Callable[..., ExporterHTTPServer], pki: Path, tmp_path: Path
) -> None:
    web = web_config.load(
        write(
            tmp_path,
            valid_configs(pki)["basic-auth"]
            | {
                "tls_server_config": tls(pki),
                "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
            },
        )
    )
    server = serve(web)
    status, headers, _ = https(server, pki)
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="trt-heartbeat-exporter"'
    assert https(server, pki, user="prometheus", password="wrong")[0] == 401
    assert https(server, pki, user="nobody", password=PASSWORD)[0] == 401
    status, headers, (body, _) = https(server, pki, user="prometheus", password=PASSWORD)
    assert status == 200 and b"trt_heartbeat_interval_seconds" in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Plain HTTP on the TLS port gets no HTTP answer.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/ping")
        conn.getresponse().read()


def test_client_certificates(
    serve: Callable[..., ExporterHTTPServer], pki: Path, tmp_path: Path
) -> None:
    web = web_config.load(
        write(
            tmp_path,
            {
                "tls_server_config": tls(
                    pki,
                    client_auth_type="RequireAndVerifyClientCert",
                    client_ca_file=str(pki / "ca.crt"),
                    client_allowed_sans=["prometheus"],
                )
            },
        )
    )
    server = serve(web)
    assert https(server, pki, "/ping", client="client")[0] == 200
    for client in (None, "stranger"):  # no certificate; a certificate naming someone else
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            https(server, pki, "/ping", client=client)


def test_certificates_are_reloaded_when_rotated(
    serve: Callable[..., ExporterHTTPServer], pki: Path, tmp_path: Path
) -> None:
    for suffix in ("crt", "key"):
        (tmp_path / f"rotating.{suffix}").write_bytes((pki / f"server.{suffix}").read_bytes())
    web = web_config.load(
        write(
            tmp_path,
            {
                "tls_server_config": {
                    "cert_file": str(tmp_path / "rotating.crt"),
                    "key_file": str(tmp_path / "rotating.key"),
                }
            },
        )
    )
    server = serve(web)
    assert https(server, pki, "/ping")[2][1]["serialNumber"] == "03E9"  # 1001
    issue(pki, "renewed", "IP:127.0.0.1,DNS:localhost", 1002)
    for suffix in ("crt", "key"):
        (tmp_path / f"rotating.{suffix}").write_bytes((pki / f"renewed.{suffix}").read_bytes())
    assert https(server, pki, "/ping")[2][1]["serialNumber"] == "03EA"  # 1002, no restart
    (tmp_path / "rotating.crt").write_text("garbage")  # a broken rotation keeps the old one
    assert https(server, pki, "/ping")[0] == 200


class SlowMetrics:
    """The exporter, with /metrics held until released: a request being answered."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter, self.entered, self.release = exporter, threading.Event(), threading.Event()

    @classmethod
    def into(cls, kept: list[SlowMetrics]) -> Callable[[Exporter], SlowMetrics]:
        """A `wrap` for `serve` that also keeps the wrapper in `kept`."""

        def wrap(exporter: Exporter) -> SlowMetrics:
            kept.append(cls(exporter))
            return kept[-1]

        return wrap

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exporter, name)

    def render_metrics(self, accept: str | None, gzip: bool = False) -> tuple[bytes, str]:
        self.entered.set()
        self.release.wait(20)
        return self.exporter.render_metrics(accept, gzip)


def _get(port: int, path: str = "/ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return s.recv(65536)


def test_max_requests_counts_requests_being_answered(
    serve: Callable[..., ExporterHTTPServer],
) -> None:
    slow: list[SlowMetrics] = []
    server = serve(max_requests=1, wrap=SlowMetrics.into(slow))
    held = threading.Thread(target=_get, args=(server.port, "/metrics"), daemon=True)
    held.start()
    assert slow[0].entered.wait(10)  # one request is being answered and holds the one slot
    answer = _get(server.port)
    assert answer.startswith(b"HTTP/1.1 503") and answer.endswith(b"too many requests in flight\n")
    slow[0].release.set()
    held.join(10)
    wait_for(lambda: _get(server.port).startswith(b"HTTP/1.1 200"), what="slot released")


def test_half_open_connections_do_not_shut_prometheus_out(
    serve: Callable[..., ExporterHTTPServer],
) -> None:
    # Regression: 45 unfinished requests used to take all 40 slots until they timed out.
    server = serve()
    half_open = [
        socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(45)
    ]
    try:
        for s in half_open:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line, ever
        wait_for(lambda: server.connections.count()[HEADERS] == 45, what="all half-open")
        assert _get(server.port, "/metrics").startswith(b"HTTP/1.1 200")
    finally:
        for s in half_open:
            s.close()


def test_unfinished_headers_are_cut_at_the_deadline(
    serve: Callable[..., ExporterHTTPServer],
) -> None:
    server = serve(header_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        closed = False
        for _ in range(50):  # slowloris: a header byte every 0.1 s, far within the idle timeout
            time.sleep(0.1)
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            if select.select([s], [], [], 0)[0]:  # the server hung up
                closed = True
                break
        assert closed, "the dribbling connection was cut"
    assert server.connections.dropped == 1


def test_a_slow_tls_handshake_is_cut_at_the_deadline_and_scrapes_go_on(
    serve: Callable[..., ExporterHTTPServer], pki: Path, tmp_path: Path
) -> None:
    server = serve(
        web_config.load(write(tmp_path, {"tls_server_config": tls(pki)})), header_timeout=0.5
    )
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(45)]
    try:
        for s in slow:  # the first bytes of a ClientHello, and nothing more
            s.sendall(b"\x16\x03\x01")
        assert https(server, pki, "/ping")[0] == 200  # while 45 handshakes hang
        wait_for(lambda: server.connections.dropped >= 45, what="handshakes cut")
        assert all(_closed(s) for s in slow)
    finally:
        for s in slow:
            s.close()


def test_a_cut_request_is_never_answered(serve: Callable[..., ExporterHTTPServer]) -> None:
    # Its headers end at the EOF the cut causes, and would parse: no slot, no /metrics render.
    slow: list[SlowMetrics] = []
    server = serve(header_timeout=0.3, wrap=SlowMetrics.into(slow))
    slow[0].release.set()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert _closed(s)
    assert server.connections.dropped == 1
    assert not slow[0].entered.is_set(), "/metrics was rendered for a cut connection"


def _closed(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 400")


def test_past_the_connection_limit_the_oldest_idle_connection_is_dropped(
    serve: Callable[..., ExporterHTTPServer],
) -> None:
    server = serve(max_connections=20)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
    try:
        wait_for(lambda: server.connections.count()[IDLE] == 20, what="20 idle connections")
        assert _get(server.port, "/metrics").startswith(b"HTTP/1.1 200")
        assert _closed(idle[0]), "the oldest idle connection made room"
        assert server.connections.dropped == 1
    finally:
        for s in idle:
            s.close()


# --- odd requests ------------------------------------------------------------------------------

THEN_PING = b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
MANY = "".join(f"X-{i}: y\r\n" for i in range(101))


@pytest.mark.parametrize(
    ("request_bytes", "statuses"),
    [
        # Each request is followed on its connection by THEN_PING: a second answer (200) shows
        # that the connection stayed open and in step, its absence that it was closed.
        (b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", ["200", "200"]),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ["200"]),
        (b"GET /ping HTTP/1.0\r\n\r\n", ["200"]),
        (b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", ["200", "200"]),
        (b"GET /ping\r\n\r\n", ["400"]),  # HTTP/0.9 is not served
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nX y\r\n\r\n", ["400"]),  # no colon
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nX : y\r\n\r\n", ["400"]),  # space before the colon
        (b"GET /ping HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", ["400"]),  # obs-fold
        (b"GET /ping HTTP/1.1 x\r\n\r\n", ["400"]),
        (b"GET /ping HTTP/1.x\r\n\r\n", ["400"]),
        (b"GET /ping HTTP/1.\xb2\r\n\r\n", ["400"]),  # a digit to str.isdigit(), not to int()
        (b"GET /ping HTTP/2.0\r\n\r\n", ["505"]),
        (b"BREW /ping HTTP/1.1\r\nHost: x\r\n\r\n", ["405", "200"]),  # not GET or HEAD
        (f"GET /ping HTTP/1.1\r\nHost: x\r\n{MANY}\r\n".encode(), ["431"]),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", ["431"]),
        (b"GET /" + b"p" * 70_000 + b" HTTP/1.1\r\n\r\n", ["414"]),
        # A body is never read: the connection closes after the answer instead of reading the
        # body as a request of its own (here one that would have been answered).
        (
            b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            ["405"],
        ),
        (b"GET /ping HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ["200"]),
    ],
    ids=lambda value: value.decode(errors="replace")[:40] if isinstance(value, bytes) else None,
)
def test_odd_requests(
    serve: Callable[..., ExporterHTTPServer], request_bytes: bytes, statuses: list[str]
) -> None:
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(request_bytes + THEN_PING)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    answered = re.findall(rb"^HTTP/1\.1 (\d{3}) ", reply, re.MULTILINE)
    assert [status.decode() for status in answered] == statuses
    assert b"Traceback" not in reply
    if len(statuses) == 1:
        assert b"\r\nConnection: close\r\n" in reply


def test_header_names_are_case_insensitive_and_the_first_one_counts(
    serve: Callable[..., ExporterHTTPServer],
) -> None:
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\naccept-ENCODING: gzip\r\n"
            b"Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head.split(b"\r\n")
    assert gzip.decompress(body).startswith(b"# HELP ")


# --- fuzzing -----------------------------------------------------------------------------------

KEYS = [
    "backend",
    "precision",
    "interval",
    "timeout",
    "max_age",
    "jitter",
    "history",
    "gpus",
    "web",
    "log",
    "nvml",
    "constant_labels",
    "gpu_memory_low_threshold",
    "bogus",
]
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from([*KEYS, "listen_address", "level", "enabled"]), inner, max_size=3
        )
    ),
    max_leaves=6,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5))
def test_fuzz_config_documents(document: dict[str, Any]) -> None:
    try:
        config.validate(document)
        config.load(None, document)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flag=st.sampled_from(
        [
            "--interval",
            "--timeout",
            "--web.listen-address",
            "--gpus",
            "--precision",
            "--backend",
            "--web.max-requests",
            "--log.level",
        ]
    ),
    value=st.text(max_size=20),
)
def test_fuzz_flag_values(
    flag: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text("{}")
    if "\x00" in value:
        return  # not representable in argv
    with pytest.raises(SystemExit) as info:
        main(["check-config", str(path), flag, value])
    _, err = capsys.readouterr()
    assert info.value.code in (0, 2), (flag, value)
    assert "Traceback" not in err
    if info.value.code == 2:
        assert err.startswith("Error: ") and err.count("\n") == 1


def test_fuzz_http_requests(
    serve: Callable[..., ExporterHTTPServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = serve()
    caplog.set_level(logging.ERROR, logger="trt_heartbeat.http")

    @settings(max_examples=120, deadline=None)
    @given(
        st.binary(max_size=300)
        | st.builds(
            lambda m, p, v, h: f"{m} {p} {v}\r\n{h}\r\n\r\n".encode("latin-1", "replace"),
            st.sampled_from(["GET", "HEAD", "POST", "BREW", "G\x00T", ""]),
            st.text(max_size=60),
            st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.\xb2", "HTTP/\xb9.1", "HTTP/1"]),
            st.text(max_size=200),
        )
    )
    def one(request: bytes) -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.settimeout(5)
            try:
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)
                reply = s.recv(65536)
            except OSError:
                reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/")
        # Nothing echoes the request unescaped.
        if b"<script" in request.lower():
            assert b"<script" not in reply.lower()

    one()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200"), "the server survived"
    # Every odd request was answered or dropped on purpose: none broke its handler.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
