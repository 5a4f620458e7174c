"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit format.

Every key the exporter-toolkit (and `promtool check web-config`) knows is accepted. Certificates
are re-read when their files change, so rotation needs no restart; a rotation that fails to load
keeps the previous certificate in force and is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_heartbeat.documents import read_file, read_regular
from trt_heartbeat.errors import ConfigError

log = logging.getLogger("trt_heartbeat")

CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's names of the TLS 1.2 suites Go enables, in OpenSSL's spelling (TLS 1.3 suites are fixed).
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
}
CURVES = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}
SECURITY_HEADERS = (
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
)
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "cipher_suites",
    "curve_preferences",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
}


class WebConfigError(ConfigError):
    pass


@dataclass(frozen=True)
class TLSSettings:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    curve_preferences: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebConfig:
    tls: TLSSettings | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)


def _fail(path: Path, key: str, message: str) -> WebConfigError:
    return WebConfigError(f"{path}: {key}: {message}")


def _mapping(path: Path, key: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, "expected a mapping")
    for name in value:
        if name not in allowed:
            raise _fail(
                path,
                f"{key}.{name}" if key else str(name),
                f"unknown key (expected one of: {', '.join(sorted(allowed))})",
            )
    return value


def _file(path: Path, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, "expected a file path")
    resolved = (path.parent / value) if not os.path.isabs(value) else Path(value)
    try:
        mode = resolved.stat().st_mode
    except OSError:
        raise _fail(path, key, f"file not found: {resolved}") from None
    if not stat.S_ISREG(mode):
        raise _fail(path, key, f"not a regular file: {resolved}")
    return resolved


def _names(path: Path, key: str, value: Any, known: dict[str, str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, key, "expected a list of names")
    for name in value:
        if name not in known:
            raise _fail(path, key, f"unsupported {name!r} (supported: {', '.join(known)})")
    return tuple(value)


def load(path: Path) -> WebConfig:
    """Parse and check a web configuration file; every problem is one line naming the key."""
    try:
        document = read_file(path, what="web config file", keys="web configuration")
    except ConfigError as exc:
        raise WebConfigError(str(exc)) from exc
    top = _mapping(
        path, "", document, {"tls_server_config", "http_server_config", "basic_auth_users"}
    )
    users: dict[str, bytes] = {}
    listed = top.get("basic_auth_users") or {}
    if not isinstance(listed, dict):
        raise _fail(path, "basic_auth_users", "expected a mapping of user names to bcrypt hashes")
    for user, hashed in listed.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise _fail(path, f"basic_auth_users.{user}", "expected a bcrypt hash ($2y$...)")
        users[str(user)] = hashed.encode()
    http = _mapping(path, "http_server_config", top.get("http_server_config"), {"http2", "headers"})
    headers = _mapping(
        path, "http_server_config.headers", http.get("headers"), set(SECURITY_HEADERS)
    )
    for name, value in headers.items():
        # Sent on every answer as they are: a line break would end the header (or start
        # another), a character outside Latin-1 cannot be sent at all.
        text = str(value)
        if not text.isprintable() or not text.isascii():
            raise _fail(
                path,
                f"http_server_config.headers.{name}",
                "expected printable ASCII (no line breaks)",
            )
    tls_doc = _mapping(path, "tls_server_config", top.get("tls_server_config"), _TLS_KEYS)
    tls = _tls(path, tls_doc) if tls_doc else None
    config = WebConfig(tls, users, {str(k): str(v) for k, v in headers.items()})
    if tls is not None:
        TLSContext(tls).context()  # fail now, not at the first scrape
    return config


def _tls(path: Path, doc: dict[str, Any]) -> TLSSettings:
    key = "tls_server_config"
    if "cert_file" not in doc or "key_file" not in doc:
        raise _fail(path, key, "cert_file and key_file are both required")
    auth = doc.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH_TYPES:
        raise _fail(
            path,
            f"{key}.client_auth_type",
            f"expected one of {', '.join(CLIENT_AUTH_TYPES)}, got {auth!r}",
        )
    ca = (
        _file(path, f"{key}.client_ca_file", doc["client_ca_file"])
        if doc.get("client_ca_file")
        else None
    )
    # Python verifies client certificates against a CA, so every mode that asks for one needs
    # it (the exporter-toolkit's RequireAnyClientCert without a CA is the one form not supported).
    if auth != "NoClientCert" and ca is None:
        raise _fail(path, f"{key}.client_ca_file", f"required with client_auth_type {auth}")
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = doc.get(name, default)
        if value not in TLS_VERSIONS:
            raise _fail(
                path, f"{key}.{name}", f"expected one of {', '.join(TLS_VERSIONS)}, got {value!r}"
            )
        versions[name] = value
    if TLS_VERSIONS[versions["min_version"]] > TLS_VERSIONS[versions["max_version"]]:
        raise _fail(path, f"{key}.min_version", "is above max_version")
    sans = doc.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise _fail(path, f"{key}.client_allowed_sans", "expected a list of names")
    return TLSSettings(
        cert_file=_file(path, f"{key}.cert_file", doc["cert_file"]),
        key_file=_file(path, f"{key}.key_file", doc["key_file"]),
        client_auth_type=auth,
        client_ca_file=ca,
        min_version=versions["min_version"],
        max_version=versions["max_version"],
        cipher_suites=_names(path, f"{key}.cipher_suites", doc.get("cipher_suites"), CIPHER_SUITES),
        curve_preferences=_names(
            path, f"{key}.curve_preferences", doc.get("curve_preferences"), CURVES
        ),
        prefer_server_cipher_suites=bool(doc.get("prefer_server_cipher_suites", True)),
        client_allowed_sans=tuple(sans),
    )


class TLSContext:
    """An SSLContext rebuilt when the certificate, key or CA files change on disk."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] | None = None
        self._context: ssl.SSLContext | None = None

    def _files(self) -> list[Path]:
        s = self.settings
        return [s.cert_file, s.key_file, *([s.client_ca_file] if s.client_ca_file else [])]

    def _build(self) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[s.min_version]
        ctx.maximum_version = TLS_VERSIONS[s.max_version]
        # Each file is read once, bounded, and only if it is a regular file: a path turned into
        # a FIFO would otherwise block this load, and every handshake waiting on it, for good.
        with _in_memory(s.cert_file) as cert, _in_memory(s.key_file) as key:
            ctx.load_cert_chain(cert, key)
        if s.client_ca_file is not None:
            with _in_memory(s.client_ca_file) as ca:
                ctx.load_verify_locations(ca)
        ctx.verify_mode = {
            "NoClientCert": ssl.CERT_NONE,
            "RequestClientCert": ssl.CERT_OPTIONAL,
            "RequireAnyClientCert": ssl.CERT_REQUIRED,
            "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
            "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
        }[s.client_auth_type]
        if s.cipher_suites:
            ctx.set_ciphers(":".join(CIPHER_SUITES[c] for c in s.cipher_suites))
        if s.curve_preferences:
            ctx.set_ecdh_curve(CURVES[s.curve_preferences[0]])  # OpenSSL's API takes one
        if s.prefer_server_cipher_suites:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        return ctx

    def context(self) -> ssl.SSLContext:
        stamp = tuple(p.stat().st_mtime_ns for p in self._files() if p.exists())
        with self._lock:
            if self._context is None or stamp != self._stamp:
                try:
                    self._context = self._build()
                    self._stamp = stamp
                except (OSError, ssl.SSLError) as exc:
                    if self._context is None:
                        raise WebConfigError(
                            f"tls_server_config: cannot load certificate: {exc}"
                        ) from exc
                    log.error(
                        "certificate reload failed; keeping the previous one",
                        extra={"fields": {"error": str(exc)}},
                    )
                    self._stamp = stamp
            return self._context

    def peer_allowed(self, sock: ssl.SSLSocket) -> bool:
        """client_allowed_sans: the client certificate must name one of them."""
        allowed = self.settings.client_allowed_sans
        if not allowed:
            return True
        cert = sock.getpeercert() or {}
        names = {str(entry[1]) for entry in cert.get("subjectAltName", ())}
        return bool(names & set(allowed))


@contextmanager
def _in_memory(path: Path) -> Iterator[str]:
    """A path to a copy of the file that nothing else can turn into a FIFO: an anonymous
    in-memory file (memfd) where the system has them, the checked file itself elsewhere."""
    data = read_regular(path)
    if not hasattr(os, "memfd_create"):
        yield str(path)
        return
    fd = os.memfd_create("trt-heartbeat-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _bcrypt_checkpw(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    return bool(bcrypt.checkpw(password, hashed))


BCRYPT_MAX_PASSWORD = 72  # bytes bcrypt reads; Go's bcrypt (the exporter-toolkit) refuses more
AUTH_CONCURRENCY = 2  # bcrypt checks at once: each takes a CPU for ~0.1 s at cost 10
AUTH_WAIT = 0.2  # seconds a check waits for one of them before it counts as a failure


class BasicAuth:
    """Checks credentials against bcrypt hashes; a successful check is cached (bcrypt is slow
    by design, and Prometheus sends the same credentials every scrape).

    Every check that is not cached costs one bcrypt hash, for an unknown user too (against
    another user's hash, so at the same cost): the answer's time does not tell which users
    exist. At most `concurrency` hashes run at once; a check that cannot start one within
    `wait` seconds fails, so a flood of wrong passwords holds each request slot for a bounded
    time instead of queueing for the CPU. Passwords longer than bcrypt reads fail unhashed.
    """

    def __init__(
        self,
        users: dict[str, bytes],
        checkpw: Callable[[bytes, bytes], bool] = _bcrypt_checkpw,
        concurrency: int = AUTH_CONCURRENCY,
        wait: float = AUTH_WAIT,
    ) -> None:
        self.users = users
        self._checkpw, self._wait = checkpw, wait
        self._slots = threading.BoundedSemaphore(concurrency)
        # An unknown user's password is checked against this (and the answer is no).
        self._decoy = max(users.values(), key=_cost) if users else b""
        self._cache: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, user: str, password: str) -> bool:
        """Whether the credentials are right; never raises, whatever the client sent."""
        secret = password.encode("utf-8", "surrogateescape")
        known = self.users.get(user)
        hashed = known if known is not None else self._decoy
        if not hashed:
            return False
        key = hashlib.sha256(
            user.encode("utf-8", "surrogateescape") + b"\0" + secret + b"\0" + hashed
        ).digest()
        if known is not None:
            with self._lock:
                if any(hmac.compare_digest(key, k) for k in self._cache):
                    return True
        if len(secret) > BCRYPT_MAX_PASSWORD:
            return False
        if not self._slots.acquire(timeout=self._wait):
            return False
        try:
            matched = self._checkpw(secret, hashed.replace(b"$2y$", b"$2b$", 1))
        except ValueError:  # a NUL byte, or whatever a bcrypt version refuses
            matched = False
        finally:
            self._slots.release()
        if not matched or known is None:
            return False
        with self._lock:
            self._cache.add(key)
        return True


def _cost(hashed: bytes) -> int:
    """The cost factor of a bcrypt hash ($2b$10$...), 0 where unreadable."""
    parts = hashed.split(b"$")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
